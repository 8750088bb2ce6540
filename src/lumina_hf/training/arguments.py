"""Recipe configuration: the YAML keys of `recipes/**.yaml` and the dataclasses they map onto.

A recipe is one flat YAML mapping (alignment-handbook style). Every key belongs to exactly one of:

- `ModelArguments`: which model to start from and how to load it (dtype, attention, residual dropout);
- `DataArguments`: the tokenized datasets and their mixture weights, the image target size (for the `max_length` check);
- `LoraArguments`: PEFT LoRA (`use_peft: true`) and the optional trainable image rows of `lm_head`;
- `LuminaTrainingArguments`: TRL's `SFTConfig` (so every `transformers.TrainingArguments` key) with the published
  Lumina-mGPT defaults (the paper's FP-SFT / Omni-SFT recipe) and a few training keys of ours (`z_loss_weight`, `loss_chunk_size`, ...).

`parse_recipe(path_or_dict, overrides)` loads the YAML, applies overrides (`["--learning_rate", "1e-4"]`,
`["--set", "key=value"]` or a dict), refuses unknown keys with a `ValueError` that names them, converts values to the
field types and returns a `Recipe` with the four dataclass instances.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from trl import SFTConfig

from ..unirep import UniRepLayout

logger = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"
# the image target sizes of the published models (FP-SFT trains at 512, then 768, then 1024)
PUBLISHED_TARGET_SIZES = (512, 768, 1024)


@dataclass
class ModelArguments:
    """Which model to fine-tune and how to load it."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A lumina_hf pipeline folder (model/ + processor/, what `lumina-hf convert` and every training "
            "stage write), a model folder with processor files, a Hub id, or 'tiny-random' (a random tiny model, for "
            "smoke tests)."
        },
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    processor_name_or_path: str | None = field(
        default=None, metadata={"help": "Where the processor is, when it is not next to the model."}
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype of the loaded weights: 'auto' = bfloat16 for LoRA on a GPU with bf16, else float32 (full "
            "fine-tuning keeps fp32 master weights and computes in bf16 through `bf16: true`); or 'bfloat16', "
            "'float16', 'float32'. The VQGAN always stays float32."
        },
    )
    attn_implementation: str | None = field(
        default="sdpa", metadata={"help": "'sdpa', 'eager' or 'flash_attention_2' (None: the model's default)."}
    )
    dropout: float | None = field(
        default=0.05,
        metadata={
            "help": "Residual dropout on the attention and MLP outputs during training (published: 0.05 for 7B, 0.0 for "
            "34B). None keeps the model config's value."
        },
    )
    zero_image_head_rows: bool = field(
        default=False,
        metadata={
            "help": "Zero the lm_head rows of the image-code tokens before training (done once, as published, when "
            "starting from Chameleon, whose image logits were masked). Only for the first stage."
        },
    )
    tiny_target_size: int = field(
        default=64, metadata={"help": "Bucket target size of the processor built for model_name_or_path='tiny-random'."}
    )


@dataclass
class DataArguments:
    """Pre-tokenized training data (`lumina-hf tokenize` output) and how to mix it."""

    dataset_mixture: list[dict[str, Any]] | None = field(
        default=None,
        metadata={
            "help": "List of datasets, each a mapping with `path` (a `save_to_disk` folder or Hub id of a tokenized "
            "dataset; 'synthetic:tiny' builds a small text-to-image set with the tiny model, for smoke tests), "
            "`weight` (share of that dataset per epoch: 0.5 = a seeded half of its rows, 2.0 = every row twice; "
            "default 1.0), optional `split` (default 'train') and `name` (a label for logs)."
        },
    )
    target_size: int | None = field(
        default=None,
        metadata={
            "help": "Image target size of the data (512, 768, 1024, ...): `max_length` must fit the UniRep span of its "
            "tallest bucket plus `prompt_room`."
        },
    )
    prompt_room: int = field(
        default=512, metadata={"help": "Tokens kept for BOS, prompt text and separators in the max_length check."}
    )
    eval_split_size: float = field(
        default=0.0, metadata={"help": "Fraction of the mixture held out for evaluation (0 = none)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training items (debugging)."})
    mixture_seed: int = field(default=42, metadata={"help": "Seed of the mixture subsampling and shuffling."})
    check_data: bool = field(
        default=False, metadata={"help": "In a dry run, check that local dataset folders exist."}
    )


@dataclass
class LoraArguments:
    """PEFT LoRA, with the key names of TRL's `ModelConfig` (TRL's `get_peft_config` builds the `LoraConfig` from
    them) plus `lora_train_image_head`. Not a `ModelConfig` subclass: that class also carries model-loading keys that
    `ModelArguments` owns with other defaults (and a processor), and its key set changes between TRL releases, while
    a recipe's keys must not. PEFT has no default targets for Chameleon: the decoder's seven projections are named."""

    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={
            "help": "Module names to adapt, or 'all-linear' (every nn.Linear of the decoder; lm_head and the VQGAN are "
            "always excluded)."
        },
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling (alpha / sqrt(r))."})
    lora_train_image_head: bool = field(
        default=False,
        metadata={
            "help": "Also train the lm_head rows of the 8192 image-code tokens (PEFT `trainable_token_indices` on "
            "lm_head: only those rows are trained and saved with the adapter)."
        },
    )


def _auto_bf16() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@dataclass
class LuminaTrainingArguments(SFTConfig):
    """TRL `SFTConfig` with the published Lumina-mGPT training recipe as defaults: AdamW betas
    (0.9, 0.95), weight decay 0.1 (not on norms, embeddings or biases), lr 2e-5 constant after 1% warmup, grad clip
    4.0, batch 8 per device, 2 epochs, z-loss 1e-5, length-grouped batches, activation checkpointing, bf16 on GPUs
    that support it. The data is pre-tokenized, so TRL's dataset preparation is skipped and no column is removed.

    Extra keys: `z_loss_weight`, `loss_chunk_size`, `save_merged`, and the aliases `warmup_ratio` (-> `warmup_steps`,
    which takes a ratio below 1 in transformers 5) and `group_by_length` (-> `train_sampling_strategy`)."""

    output_dir: str | None = field(default=None, metadata={"help": "Where checkpoints and the final model go."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (AdamW)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay, applied to weight matrices only (not norms, embeddings, biases)."}
    )
    lr_scheduler_type: str = field(default="constant_with_warmup", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.01, metadata={"help": "Warmup steps, or a ratio of all steps when < 1."})
    warmup_ratio: float | None = field(default=None, metadata={"help": "Alias: sets warmup_steps to this ratio."})
    max_grad_norm: float = field(default=4.0, metadata={"help": "Gradient clipping."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size per device."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs."})
    train_sampling_strategy: str = field(
        default="group_by_length", metadata={"help": "'group_by_length' (uses the `length` column), 'random', ..."}
    )
    group_by_length: bool | None = field(
        default=None, metadata={"help": "Alias: true -> train_sampling_strategy='group_by_length', false -> 'random'."}
    )
    max_length: int | None = field(
        default=4096, metadata={"help": "Longest item in tokens. Longer items are dropped (never truncated)."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the pre-tokenized columns."})
    dataset_kwargs: dict[str, Any] | str | None = field(
        default_factory=lambda: {"skip_prepare_dataset": True},
        metadata={"help": "TRL dataset preparation is skipped: the data is already tokenized."},
    )
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Deprecated alias of activation_checkpointing."})
    activation_checkpointing: bool | None = field(default=True, metadata={"help": "Checkpoint each decoder layer."})
    activation_checkpointing_kwargs: dict[str, Any] | str | None = field(
        default_factory=lambda: {"use_reentrant": False}, metadata={"help": "torch.utils.checkpoint options."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; default: on where CUDA supports bf16, else fp32."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=500, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep at most N checkpoints."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Trackers ('none', 'wandb', ...)."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "DDP: every trainable parameter is used (the VQGAN is frozen)."}
    )
    seed: int = field(default=42, metadata={"help": "Random seed."})
    dataloader_pin_memory: bool | None = field(default=None, metadata={"help": "Pin host memory (default: on with CUDA)."})
    resume_from_checkpoint: str | bool | None = field(
        default=None,
        metadata={"help": "A checkpoint-N folder, or true to resume from the latest checkpoint in output_dir."},
    )
    # ours
    z_loss_weight: float = field(
        default=1e-5, metadata={"help": "Weight of mean(logsumexp(logits)^2) over trained positions (1e-5 as published)."}
    )
    loss_chunk_size: int = field(
        default=4096, metadata={"help": "Tokens per chunk of the LM-head loss (never the full fp32 logits at once)."}
    )
    save_merged: bool = field(
        default=True,
        metadata={"help": "LoRA: also merge the adapter and save a full pipeline folder in output_dir."},
    )
    use_liger_loss: bool = field(
        default=True,
        metadata={"help": "On CUDA with liger-kernel installed, compute the loss with its fused linear cross-entropy "
                  "(z-loss as its lse_square_scale); else the chunked loss."},
    )

    def __post_init__(self):
        if self.output_dir is None:
            raise ValueError("output_dir is required (set it in the recipe or with --output_dir).")
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
            self.warmup_steps = float(self.warmup_ratio)
        if self.group_by_length is not None:
            self.train_sampling_strategy = "group_by_length" if self.group_by_length else "random"
        if self.gradient_checkpointing is not None:
            self.activation_checkpointing = self.gradient_checkpointing
        if self.bf16 is None:
            self.bf16 = _auto_bf16() and not self.fp16
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = torch.cuda.is_available()
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if not self.learning_rate >= 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}.")
        if self.z_loss_weight < 0:
            raise ValueError(f"z_loss_weight must be >= 0, got {self.z_loss_weight}.")
        if self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be >= 1, got {self.loss_chunk_size}.")
        super().__post_init__()
        # TRL would re-tokenize and apply chat templates otherwise: the data is token ids already.
        kwargs = dict(self.dataset_kwargs or {})
        kwargs["skip_prepare_dataset"] = True
        self.dataset_kwargs = kwargs
        self.remove_unused_columns = False


ARGUMENT_CLASSES = (ModelArguments, DataArguments, LoraArguments, LuminaTrainingArguments)


@dataclass
class Recipe:
    """A parsed recipe: the four argument groups, plus where it came from."""

    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    training: LuminaTrainingArguments
    source: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)  # the keys as given (YAML + overrides), for the run record


def _field_owner() -> dict[str, type]:
    owner: dict[str, type] = {}
    for cls in ARGUMENT_CLASSES:
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.name in owner and owner[f.name] is not cls:
                raise RuntimeError(f"recipe key {f.name!r} is defined by both {owner[f.name].__name__} and {cls.__name__}.")
            owner[f.name] = cls
    return owner


def recipe_keys() -> list[str]:
    """Every key a recipe may set."""
    return sorted(_field_owner())


# ----------------------------------------------------------------------------------------------- value conversion
def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a forward reference that does not resolve: fall back to the raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _members(tp: Any) -> list[Any]:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return [m for a in typing.get_args(tp) for m in _members(a)]
    return [tp]


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML / command-line value to the field type `tp` where it is unambiguous (strings such as "2e-5",
    which YAML reads as a string, become floats; "true" becomes a bool; JSON strings become lists/dicts)."""
    members = _members(tp)
    if value is None or not members:
        return value
    names = {getattr(m, "__name__", str(m)) for m in members}
    origins = {typing.get_origin(m) or m for m in members}
    if isinstance(value, str):
        v = value.strip()
        if v.lower() in ("none", "null") and type(None) in members and str not in members:
            return None
        if bool in members and v.lower() in ("true", "false", "yes", "no", "1", "0"):
            return v.lower() in ("true", "yes", "1")
        if int in members and str not in members:
            try:
                return int(v)
            except ValueError:
                pass
        if float in members and str not in members:
            try:
                return float(v)
            except ValueError:
                pass
        if (list in origins or dict in origins or {"Any"} & names) and v[:1] in ("[", "{"):
            try:
                return json.loads(v)
            except json.JSONDecodeError:
                return yaml.safe_load(v)
        if str not in members and not ({"Any"} & names) and (int in members or float in members or bool in members):
            raise ValueError(f"recipe key {key!r}: {value!r} is not a valid {tp}.")
        return value
    if isinstance(value, bool):
        if bool not in members and str in members:
            # YAML 1.1 reads a bare `no` / `yes` as a boolean (e.g. `save_strategy: no`)
            return "no" if value is False else "yes"
        return value
    if isinstance(value, int) and float in members and int not in members:
        return float(value)
    if isinstance(value, float) and int in members and float not in members and value.is_integer():
        return int(value)
    return value


# ----------------------------------------------------------------------------------------------- overrides
def _parse_scalar(text: str) -> Any:
    """Command-line values stay strings; `_coerce` converts them to the field's type (so "no" stays "no" for
    `save_strategy`, while YAML would read it as false)."""
    return text


def parse_overrides(argv: list[str] | None) -> dict[str, Any]:
    """`["--learning_rate", "1e-4", "--bf16", "--set", "lora_r=16", "--output_dir=x"]` -> a dict of recipe keys.

    A flag without a value (followed by another flag or the end) is `true`. `--no_<key>` is `false`."""
    out: dict[str, Any] = {}
    args = list(argv or [])
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == "--set":
            if i + 1 >= len(args) or "=" not in args[i + 1]:
                raise ValueError("--set needs key=value (e.g. --set learning_rate=1e-4).")
            key, _, val = args[i + 1].partition("=")
            out[key.strip().replace("-", "_")] = _parse_scalar(val)
            i += 2
            continue
        if not tok.startswith("--") or tok == "--":
            raise ValueError(f"unexpected argument {tok!r}: recipe overrides are --key value, --key=value or --set key=value.")
        body = tok[2:]
        if "=" in body:
            key, _, val = body.partition("=")
            out[key.replace("-", "_")] = _parse_scalar(val)
            i += 1
            continue
        key = body.replace("-", "_")
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[key] = _parse_scalar(args[i + 1])
            i += 2
        elif key.startswith("no_"):
            out[key[3:]] = False
            i += 1
        else:
            out[key] = True
            i += 1
    return out


def load_recipe_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML mapping of a recipe file (a ValueError if it is missing, not YAML or not a mapping)."""
    if not os.path.isfile(path):
        raise ValueError(f"recipe {path} does not exist: give the path of a recipe YAML (recipes/<model>/<stage>/*.yaml).")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise ValueError(f"recipe {path} is not valid YAML{line}: {getattr(err, 'problem', None) or err}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping of keys to values, got {type(data).__name__}.")
    return data


def check_keys(config: dict[str, Any], source: str | None = None) -> None:
    """ValueError naming every key of `config` that no argument class knows (with close matches)."""
    owner = _field_owner()
    unknown = [k for k in config if k not in owner]
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, owner, n=2, cutoff=0.75)
        hints.append(f"{k!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
    where = f" in {source}" if source else ""
    raise ValueError(
        f"unknown recipe key{'s' if len(unknown) > 1 else ''}{where}: {', '.join(hints)}. Recipe keys are the fields of "
        "ModelArguments, DataArguments, LoraArguments and LuminaTrainingArguments (TRL SFTConfig); see "
        "`lumina_hf.training.recipe_keys()`."
    )


# Why not `trl.TrlParser` (argparse over the dataclasses): a recipe is also given as a Python dict; YAML 1.1 values
# must be converted by field type before TrainingArguments sees them (`save_strategy: no` reads as False, `2e-5` as a
# string); argparse reports a bad value by exiting the process instead of raising an error the caller can show; and
# `lumina-hf train --help` would list the ~200 TrainingArguments options instead of the recipe workflow. The keys, the
# dataclasses and their validation are TRL's and transformers' own (`SFTConfig`).
def parse_recipe(
    config: str | os.PathLike | dict[str, Any] | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Recipe:
    """Load a recipe (a YAML path or a dict), apply `overrides` (CLI-style list or dict; they win over the YAML),
    check the keys and build the four argument dataclasses."""
    source = None
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, dict):
        data = dict(config)
    else:
        source = os.fspath(config)
        data = load_recipe_dict(source)
    check_keys(data, source)
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    check_keys(extra, "the command-line overrides")
    data.update(extra)

    owner = _field_owner()
    per_class: dict[type, dict[str, Any]] = {cls: {} for cls in ARGUMENT_CLASSES}
    hints = {cls: _type_hints(cls) for cls in ARGUMENT_CLASSES}
    for key, value in data.items():
        cls = owner[key]
        per_class[cls][key] = _coerce(key, value, hints[cls].get(key, Any))
    try:
        built = [cls(**per_class[cls]) for cls in ARGUMENT_CLASSES]
    except TypeError as err:
        raise ValueError(f"recipe {source or ''}: {err}") from err
    model, data_args, lora, training = built
    _validate(model, data_args, lora, training, source)
    return Recipe(model=model, data=data_args, lora=lora, training=training, source=source, raw=data)


# ----------------------------------------------------------------------------------------------- checks
def unirep_length(width: int, height: int) -> int:
    """Tokens of one `width x height` image in UniRep: start, 2 size tokens, rows of W/16 codes + row end, end."""
    return UniRepLayout().span_length(height, width)


def longest_unirep_length(target_size: int) -> tuple[int, tuple[int, int]]:
    """(UniRep length, (width, height)) of the longest bucket of `target_size` (the tallest one)."""
    from ..image_processing_lumina_mgpt import generate_buckets

    best = max(generate_buckets(target_size), key=lambda wh: unirep_length(*wh))
    return unirep_length(*best), best


def minimum_max_length_for(target_size: int, prompt_room: int) -> int:
    return longest_unirep_length(target_size)[0] + prompt_room


def _validate(model: ModelArguments, data: DataArguments, lora: LoraArguments, training: LuminaTrainingArguments, source) -> None:
    where = f" (recipe {source})" if source else ""
    if not model.model_name_or_path:
        raise ValueError(f"model_name_or_path is required{where}.")
    if model.torch_dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ValueError(f"torch_dtype must be auto, bfloat16, float16 or float32, got {model.torch_dtype!r}{where}.")
    if model.dropout is not None and not 0 <= model.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {model.dropout}{where}.")
    if not data.dataset_mixture:
        raise ValueError(f"dataset_mixture is empty{where}: list at least one tokenized dataset (path + weight).")
    if not isinstance(data.dataset_mixture, list):
        raise ValueError(f"dataset_mixture must be a list of {{path, weight}} mappings{where}.")
    allowed = {"path", "weight", "split", "name"}
    for i, entry in enumerate(data.dataset_mixture):
        if isinstance(entry, str):
            data.dataset_mixture[i] = entry = {"path": entry}
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f"dataset_mixture[{i}] must be a mapping with a `path`{where}, got {entry!r}.")
        bad = sorted(set(entry) - allowed)
        if bad:
            raise ValueError(f"dataset_mixture[{i}] has unknown keys {bad}{where}; allowed: {sorted(allowed)}.")
        w = entry.get("weight", 1.0)
        if isinstance(w, str):
            w = _coerce("weight", w, float)
        if not isinstance(w, (int, float)) or isinstance(w, bool) or w <= 0:
            raise ValueError(f"dataset_mixture[{i}].weight must be a positive number{where}, got {w!r}.")
        entry["weight"] = float(w)
    if not 0 <= data.eval_split_size < 1:
        raise ValueError(f"eval_split_size must be in [0, 1), got {data.eval_split_size}{where}.")
    if data.target_size is not None:
        if data.target_size % 32 or data.target_size <= 0:
            raise ValueError(f"target_size must be a positive multiple of 32, got {data.target_size}{where}.")
        if training.max_length is not None:
            need = minimum_max_length_for(data.target_size, data.prompt_room)
            if training.max_length < need:
                length, (w, h) = longest_unirep_length(data.target_size)
                raise ValueError(
                    f"max_length={training.max_length} is too short for target_size={data.target_size}{where}: its "
                    f"tallest bucket {w}x{h} is {length} UniRep tokens, plus prompt_room={data.prompt_room} gives a "
                    f"minimum of {need}. Raise max_length to at least {need}."
                )
    if lora.use_peft:
        if lora.lora_r < 1 or lora.lora_alpha <= 0:
            raise ValueError(f"lora_r must be >= 1 and lora_alpha > 0{where}.")
        targets = lora.lora_target_modules
        if isinstance(targets, str) and targets != "all-linear":
            lora.lora_target_modules = [t.strip() for t in targets.split(",") if t.strip()]
        if isinstance(lora.lora_target_modules, list) and "lm_head" in lora.lora_target_modules:
            raise ValueError(
                f"lora_target_modules must not contain lm_head{where}: TRL and the generation loop read lm_head.weight "
                "directly, so a LoRA on it would be ignored. Use lora_train_image_head: true to train its image rows."
            )
    elif lora.lora_train_image_head:
        raise ValueError(f"lora_train_image_head needs use_peft: true{where} (full fine-tuning trains lm_head anyway).")


__all__ = [
    "ARGUMENT_CLASSES",
    "DataArguments",
    "LoraArguments",
    "LuminaTrainingArguments",
    "ModelArguments",
    "Recipe",
    "check_keys",
    "load_recipe_dict",
    "longest_unirep_length",
    "minimum_max_length_for",
    "parse_overrides",
    "parse_recipe",
    "recipe_keys",
    "unirep_length",
]
