"""Run a recipe: load the model and processor, build the data mixture, the PEFT config and the trainer, train, save.

`run_recipe(recipe)` is what `lumina-hf train` and `python -m lumina_hf.train` call; `run_recipe(recipe,
dry_run=True)` builds everything except the model weights (recipe, SFTConfig, PEFT config, dataset paths), so every
recipe YAML can be checked in CI.

Outputs (`output_dir`):
- full fine-tuning: a pipeline folder (`model_index.json`, `model/`, `processor/`) that the next stage or
  `LuminaMGPTPipeline.from_pretrained` loads; `checkpoint-N/` folders next to it;
- LoRA: the adapter in `output_dir/adapter/` (PEFT format: `adapter_config.json`, `adapter_model.safetensors`) and,
  with `save_merged: true`, the merged pipeline folder in `output_dir` (a model with an adapter attached would save
  only the adapter, so the adapter is merged with `merge_and_unload()` first).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any

import torch

from .arguments import TINY_RANDOM, LoraArguments, LuminaTrainingArguments, ModelArguments, Recipe
from .collator import LuminaMGPTDataCollator
from .identity import model_vq_sha256, vq_identity
from .mixture import add_length, build_datasets, check_dataset_columns, check_dataset_paths
from .trainer import LuminaSFTTrainer, SignatureCallback, check_resume_checkpoint, model_signature

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


# ----------------------------------------------------------------------------------------------- model
def _resolve_folders(model_args: ModelArguments) -> tuple[str, str]:
    """(model folder or id, processor folder or id): a pipeline folder holds them in model/ and processor/."""
    path = model_args.model_name_or_path
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
        model_dir, proc_dir = os.path.join(path, "model"), os.path.join(path, "processor")
    else:
        model_dir, proc_dir = path, path
    return model_dir, model_args.processor_name_or_path or proc_dir


def resolve_dtype(model_args: ModelArguments, lora_args: LoraArguments, training_args: LuminaTrainingArguments) -> torch.dtype:
    """'auto': bf16 weights for LoRA when training in bf16 (the frozen base needs no fp32 master copy), else fp32
    (full fine-tuning keeps fp32 master weights; bf16 is the autocast compute dtype)."""
    if model_args.torch_dtype != "auto":
        return getattr(torch, model_args.torch_dtype)
    return torch.bfloat16 if (lora_args.use_peft and training_args.bf16) else torch.float32


def set_residual_dropout(model, p: float) -> None:
    """Set the residual dropout of every decoder layer (its `attn_dropout` and `mlp_dropout` modules) to `p`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.dropout = float(p)
    for layer in base.model.layers:
        layer.attn_dropout.p = float(p)
        layer.mlp_dropout.p = float(p)


def load_config_and_processor(model_args: ModelArguments):
    """The model's config and its processor, without loading any weights (enough to check the data first)."""
    from ..configuration_lumina_mgpt import LuminaMGPTConfig
    from ..processing_lumina_mgpt import LuminaMGPTProcessor

    if model_args.model_name_or_path == TINY_RANDOM:
        from ..testing_utils import build_tiny_processor, tiny_config

        return tiny_config(), build_tiny_processor(model_args.tiny_target_size)
    model_dir, proc_dir = _resolve_folders(model_args)
    revision = {"revision": model_args.model_revision} if model_args.model_revision else {}
    return LuminaMGPTConfig.from_pretrained(model_dir, **revision), LuminaMGPTProcessor.from_pretrained(proc_dir, **revision)


def load_model_and_processor(
    model_args: ModelArguments, lora_args: LoraArguments, training_args: LuminaTrainingArguments
):
    """The model to train (VQGAN frozen, residual dropout set, cache off) and its processor."""
    from ..modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration
    from ..processing_lumina_mgpt import LuminaMGPTProcessor

    dtype = resolve_dtype(model_args, lora_args, training_args)
    if model_args.model_name_or_path == TINY_RANDOM:
        from ..testing_utils import build_tiny_model, build_tiny_processor

        logger.warning("Training the random tiny model ('%s'): a smoke test, not a useful model.", TINY_RANDOM)
        model = build_tiny_model(seed=training_args.seed).to(dtype)
        model.model.vqmodel.to(torch.float32)
        processor = build_tiny_processor(model_args.tiny_target_size)
    else:
        model_dir, proc_dir = _resolve_folders(model_args)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if model_args.attn_implementation:
            kwargs["attn_implementation"] = model_args.attn_implementation
        if model_args.model_revision:
            kwargs["revision"] = model_args.model_revision
        model = LuminaMGPTForConditionalGeneration.from_pretrained(model_dir, **kwargs)
        processor = LuminaMGPTProcessor.from_pretrained(proc_dir, **({"revision": model_args.model_revision} if model_args.model_revision else {}))
    if model_args.dropout is not None:
        set_residual_dropout(model, model_args.dropout)
    if model_args.zero_image_head_rows:
        zero_image_head_rows(model)
    model.model.vqmodel.requires_grad_(False)
    model.config.use_cache = False
    return model, processor


def zero_image_head_rows(model) -> None:
    """Zero the lm_head rows of the image-code tokens (the first FP-SFT stage does this to a Chameleon start)."""
    cfg = model.config
    with torch.no_grad():
        model.lm_head.weight[cfg.image_code_id_start : cfg.image_code_id_end + 1].zero_()
    logger.info("zeroed lm_head rows %d..%d (image codes)", cfg.image_code_id_start, cfg.image_code_id_end)


def unirep_token_ids(config) -> list[int]:
    """The lm_head rows of everything inside a UniRep image: image codes, image start/end, row end, size tokens."""
    ids = set(range(config.image_code_id_start, config.image_code_id_end + 1))
    ids.update((config.image_start_token_id, config.image_end_token_id, config.image_row_end_token_id))
    ids.update(range(config.size_token_base_id + 1, config.size_token_base_id + config.max_size_units + 1))
    return sorted(i for i in ids if 0 <= i < config.vocab_size)


def build_peft_config(lora_args: LoraArguments, model_config=None):
    """The PEFT `LoraConfig` of a recipe (None for full fine-tuning), built by TRL's `get_peft_config` from the
    recipe's LoRA keys (the names of TRL's `ModelConfig`), then given what TRL does not know about Lumina-mGPT: the
    VQGAN is never adapted, and with `lora_train_image_head` the UniRep rows of lm_head become trainable through
    PEFT's `trainable_token_indices` (lm_head gets no LoRA: TRL and the generation loop read `lm_head.weight`
    directly). `model_config` defaults to the published token ids."""
    if not lora_args.use_peft:
        return None
    from trl import ModelConfig, get_peft_config

    from ..configuration_lumina_mgpt import LuminaMGPTConfig

    config = get_peft_config(ModelConfig(
        use_peft=True,
        lora_r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        lora_target_modules=lora_args.lora_target_modules,
        use_rslora=lora_args.use_rslora,
        lora_task_type="CAUSAL_LM",
    ))
    config.exclude_modules = r".*\bvqmodel\b.*"
    if lora_args.lora_train_image_head:
        # without a model (dry run): the published ids, from the default config (no weights are built)
        cfg = model_config if model_config is not None else LuminaMGPTConfig()
        config.trainable_token_indices = {"lm_head": unirep_token_ids(cfg)}
    return config


# ----------------------------------------------------------------------------------------------- resume
def resolve_resume(training_args: LuminaTrainingArguments) -> str | None:
    """`resume_from_checkpoint`: True/'latest' -> the newest *complete* checkpoint-N of output_dir (a checkpoint cut
    short by a kill is skipped, with a warning); a path must be a complete checkpoint. ValueError otherwise."""
    value = training_args.resume_from_checkpoint
    if value is None or value is False or str(value).lower() in ("", "false", "no"):
        return None
    if value is True or str(value).lower() in ("true", "yes", "latest"):
        out = training_args.output_dir
        found = sorted(checkpoint_folders(out), key=lambda item: item[0], reverse=True)
        incomplete = []
        for step, folder in found:
            if is_complete_checkpoint(folder):
                if incomplete:
                    logger.warning("skipped incomplete checkpoint(s) %s (cut short while saving)", ", ".join(incomplete))
                logger.info("resuming from %s (step %d)", folder, step)
                return folder
            incomplete.append(os.path.basename(folder))
        if incomplete:
            raise ValueError(
                f"resume_from_checkpoint=true but every checkpoint of {out} is incomplete ({', '.join(incomplete)}: "
                "their saves were cut short): start over, or remove them."
            )
        raise ValueError(f"resume_from_checkpoint=true but {out} has no checkpoint-N folder to resume from.")
    folder = str(value)
    if not is_complete_checkpoint(folder):
        raise ValueError(
            f"{folder} is not a complete checkpoint (no readable trainer_state.json: its save was cut short): "
            "resume from an earlier checkpoint-N, or use resume_from_checkpoint: true to take the newest complete one."
        )
    logger.info("resuming from %s", folder)
    return folder


def checkpoint_folders(output_dir: str) -> list[tuple[int, str]]:
    """`(step, path)` of every checkpoint-N folder in `output_dir`."""
    if not os.path.isdir(output_dir):
        return []
    out = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            out.append((int(m.group(1)), os.path.join(output_dir, name)))
    return out


def is_complete_checkpoint(folder: str) -> bool:
    """A checkpoint is complete when the Trainer finished writing it: `trainer_state.json` comes after the weights,
    optimizer, scheduler and RNG states, so a save cut short has none (or a partial one that does not parse)."""
    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as fh:
            json.load(fh)
    except (OSError, ValueError):
        return False
    return True


def _fsdp_activation_checkpointing() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and (
        os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true"
    )


# ----------------------------------------------------------------------------------------------- saving
def save_pipeline_folder(model, processor, output_dir: str) -> None:
    """Save `model` + `processor` as a `LuminaMGPTPipeline` folder (model_index.json, model/, processor/)."""
    from ..pipeline_lumina_mgpt import LuminaMGPTPipeline

    LuminaMGPTPipeline(model=model, processor=processor).save_pretrained(output_dir, safe_serialization=True)


def write_pipeline_index(output_dir: str) -> None:
    """The `model_index.json` of a pipeline folder whose model/ and processor/ were written separately."""
    import diffusers

    index = {
        "_class_name": "LuminaMGPTPipeline",
        "_diffusers_version": diffusers.__version__,
        "model": ["lumina_hf.modeling_lumina_mgpt", "LuminaMGPTForConditionalGeneration"],
        "processor": ["lumina_hf.processing_lumina_mgpt", "LuminaMGPTProcessor"],
    }
    with open(os.path.join(output_dir, "model_index.json"), "w", encoding="utf-8") as fh:
        json.dump(index, fh, indent=2)


# ----------------------------------------------------------------------------------------------- entry point
@dataclasses.dataclass
class TrainingResult:
    """What `run_recipe` did: the trainer (None in a dry run), where things were written, the train metrics."""

    recipe: Recipe
    trainer: Any = None
    peft_config: Any = None
    output_dir: str | None = None
    adapter_dir: str | None = None
    pipeline_dir: str | None = None
    metrics: dict | None = None
    dry_run: bool = False
    is_main_process: bool = True  # False on the other ranks of a distributed launch


def build_trainer(recipe: Recipe, model=None, processor=None, train_dataset=None, eval_dataset=None, callbacks=None):
    """A ready `LuminaSFTTrainer` for `recipe` (the model, processor and data are loaded unless given)."""
    training = recipe.training
    if model is None:
        model, processor = load_model_and_processor(recipe.model, recipe.lora, training)
    elif recipe.model.dropout is not None:
        set_residual_dropout(model, recipe.model.dropout)
    if processor is None:
        raise ValueError("a processor is needed with a model passed in.")
    if recipe.data.target_size is not None:
        # the stage's output generates at the size it was trained at (FP-SFT 512 -> 768 -> 1024)
        from .items import with_target_size

        processor = with_target_size(processor, recipe.data.target_size)
    model.model.vqmodel.requires_grad_(False)
    if train_dataset is None:
        train_dataset, eval_dataset = build_datasets(recipe.data, training, model.config, processor,
                                                     vq_identity(model)["sha256"])
    else:
        check_dataset_columns(train_dataset, "train_dataset")
        train_dataset = add_length(train_dataset)
    peft_config = build_peft_config(recipe.lora, model.config)
    collator = LuminaMGPTDataCollator(
        pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 1,
        pad_to_multiple_of=training.pad_to_multiple_of,
        max_length=training.max_length,
    )
    signature = model_signature(model, recipe.lora.use_peft, recipe.lora.lora_r)
    trainer = LuminaSFTTrainer(
        model=model,
        args=training,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[SignatureCallback(signature), *(callbacks or [])],
    )
    return trainer


def run_recipe(recipe: Recipe, dry_run: bool = False, callbacks=None) -> TrainingResult:
    """Train (or, with `dry_run`, only check) one recipe; see the module docstring for what is written."""
    training = recipe.training
    if _fsdp_activation_checkpointing() and training.activation_checkpointing:
        logger.info("FSDP activation checkpointing is on (accelerate config): the trainer's own checkpointing is turned off.")
        training.activation_checkpointing = training.gradient_checkpointing = False
    # `push_to_hub: true` publishes through lumina_hf.hub (what `lumina-hf push` does), checked before any work
    from ..hub import trainer_push

    hub_push = trainer_push(training, recipe.model.model_name_or_path,
                            adapter_only=bool(recipe.lora.use_peft and not training.save_merged))
    if dry_run:
        return _dry_run(recipe)

    resume = resolve_resume(training)
    from transformers import set_seed

    set_seed(training.seed)
    # the data is checked against the model's config before any weight is loaded
    config, processor = load_config_and_processor(recipe.model)
    if recipe.data.target_size is not None:
        from .items import with_target_size

        processor = with_target_size(processor, recipe.data.target_size)
    vqgan_sha256 = model_vq_sha256(_resolve_folders(recipe.model)[0], training.seed)
    train_dataset, eval_dataset = build_datasets(recipe.data, training, config, processor, vqgan_sha256)
    model, processor = load_model_and_processor(recipe.model, recipe.lora, training)
    if resume is not None:
        check_resume_checkpoint(resume, model_signature(model, recipe.lora.use_peft, recipe.lora.lora_r))
    trainer = build_trainer(recipe, model, processor, train_dataset, eval_dataset, callbacks=callbacks)
    train_out = trainer.train(resume_from_checkpoint=resume)
    trainer.restore_model_config()
    peft_config = trainer.model.peft_config.get("default") if recipe.lora.use_peft else None
    result = TrainingResult(recipe=recipe, trainer=trainer, peft_config=peft_config, output_dir=training.output_dir,
                            metrics=dict(train_out.metrics), is_main_process=trainer.accelerator.is_main_process)
    save_outputs(trainer, recipe, trainer.processing_class, result)  # the processor at the stage's target size
    if hub_push is not None and result.is_main_process:
        hub_push.push(result.pipeline_dir or result.adapter_dir)
    return result


def save_outputs(trainer: LuminaSFTTrainer, recipe: Recipe, processor, result: TrainingResult) -> None:
    out = recipe.training.output_dir
    if recipe.lora.use_peft:
        adapter_dir = os.path.join(out, ADAPTER_DIR)
        trainer.save_model(adapter_dir)  # PEFT: adapter_config.json + adapter_model.safetensors (+ the processor)
        result.adapter_dir = adapter_dir
        if recipe.training.save_merged and trainer.accelerator.is_main_process:
            peft_model = trainer.accelerator.unwrap_model(trainer.model)
            merged = peft_model.merge_and_unload()
            trainer.model = merged
            save_pipeline_folder(merged, processor, out)
            result.pipeline_dir = out
    else:
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            # the full state dict is gathered by the trainer; the pipeline index and processor are written beside it
            trainer.save_model(os.path.join(out, "model"))
            if trainer.accelerator.is_main_process:
                processor.save_pretrained(os.path.join(out, "processor"))
                write_pipeline_index(out)
        elif trainer.accelerator.is_main_process:
            save_pipeline_folder(trainer.accelerator.unwrap_model(trainer.model), processor, out)
        result.pipeline_dir = out
    if trainer.accelerator.is_main_process:
        # the final folders hold safetensors + json only: drop the pickled TrainingArguments that save_model adds
        for folder in (result.adapter_dir, os.path.join(out, "model")):
            if folder and os.path.isfile(os.path.join(folder, "training_args.bin")):
                os.remove(os.path.join(folder, "training_args.bin"))
        write_run_record(recipe, out)
    trainer.accelerator.wait_for_everyone()
    logger.info("saved to %s", out)


def write_run_record(recipe: Recipe, output_dir: str) -> None:
    """`output_dir/training_recipe.yaml`: the recipe keys the run used (YAML + command-line overrides)."""
    import yaml

    record = json.loads(json.dumps(recipe.raw, default=str))
    with open(os.path.join(output_dir, "training_recipe.yaml"), "w", encoding="utf-8") as fh:
        fh.write(f"# keys of the recipe this model was trained with ({recipe.source or 'given as a dict'} + overrides)\n")
        yaml.safe_dump(record, fh, sort_keys=False)


def _dry_run(recipe: Recipe) -> TrainingResult:
    """Everything but the weights: the recipe was parsed (SFTConfig built), the PEFT config is built from the model's
    config.json when it is local (else the published ids), dataset folders are checked with `check_data`."""
    model_config = None
    path = recipe.model.model_name_or_path
    if path != TINY_RANDOM:
        model_dir, _ = _resolve_folders(recipe.model)
        if os.path.isfile(os.path.join(model_dir, "config.json")):
            from ..configuration_lumina_mgpt import LuminaMGPTConfig

            model_config = LuminaMGPTConfig.from_pretrained(model_dir)
    else:
        from ..testing_utils import tiny_config

        model_config = tiny_config()
    peft_config = build_peft_config(recipe.lora, model_config)
    if recipe.data.check_data:
        missing = check_dataset_paths(recipe.data)
        if missing:
            raise ValueError(
                f"dataset folder(s) not found: {', '.join(missing)}" + (f" (recipe {recipe.source})" if recipe.source else "")
                + ". Tokenize the data first with `lumina-hf tokenize`, or fix the paths."
            )
    logger.info("dry run OK: %s", recipe.source or "recipe")
    return TrainingResult(recipe=recipe, peft_config=peft_config, output_dir=recipe.training.output_dir, dry_run=True)


__all__ = [
    "ADAPTER_DIR",
    "TrainingResult",
    "build_peft_config",
    "build_trainer",
    "load_model_and_processor",
    "resolve_dtype",
    "run_recipe",
    "save_pipeline_folder",
    "set_residual_dropout",
    "unirep_token_ids",
]
