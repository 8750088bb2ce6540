"""Training (issue 6, trainer half): TRL SFTTrainer on pre-tokenized data with z-loss, LoRA / full fine-tuning,
saving / merging / loading adapters into the pipeline, resuming, the recipes, and the errors raised before training.

Everything runs on CPU with the tiny model (real token ids, 65536-token vocabulary)."""

import glob
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import TrainerCallback

from lumina_hf import LuminaMGPTPipeline, LuminaMGPTProcessor, text_to_image_prompt
from lumina_hf.generation_lumina_mgpt import generate_image_tokens
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor, tiny_config
from lumina_hf.training import (
    LuminaMGPTDataCollator,
    build_datasets,
    build_trainer,
    parse_recipe,
    recipe_keys,
    run_recipe,
    synthetic_dataset,
)
from lumina_hf.training.arguments import longest_unirep_length, unirep_length
from lumina_hf.training.runner import load_model_and_processor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "recipes")
SEED = 42
TARGET = 32  # 2x2 code grids: 10 UniRep tokens per image keeps the 65536-wide LM head cheap on CPU


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_recipe(output_dir, **overrides):
    cfg = {
        "model_name_or_path": "tiny-random",
        "tiny_target_size": TARGET,
        "dropout": 0.0,
        "dataset_mixture": [{"path": "synthetic:tiny:8", "weight": 1.0}],
        "target_size": TARGET,
        "prompt_room": 128,
        "output_dir": str(output_dir),
        "max_length": 256,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "warmup_ratio": 0.0,
        "max_steps": 6,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": SEED,
        "disable_tqdm": True,
    }
    cfg.update(overrides)
    return cfg


def losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def t2i_prompt(processor, caption="a red square"):
    return processor(text=text_to_image_prompt(caption, TARGET, TARGET), return_tensors=None)["input_ids"][0]


def image_tokens(model, prompt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = generate_image_tokens(model, [prompt], height=TARGET, width=TARGET, guidance_scale=3.0, generator=gen)
    return out.sequences[0] if isinstance(out.sequences, list) else out.sequences[0]


# ----------------------------------------------------------------------------------------------- collator
def test_collator_pads_right_with_pad_id_and_ignore_labels():
    coll = LuminaMGPTDataCollator(pad_token_id=1)
    batch = coll([
        {"input_ids": [0, 5, 6, 8710], "labels": [-100, -100, 6, 8710], "length": 4, "source_index": 3},
        {"input_ids": [0, 7], "labels": [-100, 7]},
    ])
    assert batch["input_ids"].tolist() == [[0, 5, 6, 8710], [0, 7, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 8710], [-100, 7, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert LuminaMGPTDataCollator(pad_to_multiple_of=8)([{"input_ids": [0, 1, 2], "labels": [0, 1, 2]}])["input_ids"].shape == (1, 8)
    with pytest.raises(ValueError, match="labels"):
        coll([{"input_ids": [0, 1]}])
    with pytest.raises(ValueError, match="never"):
        LuminaMGPTDataCollator(max_length=3)([{"input_ids": [0, 1, 2, 3], "labels": [0, 1, 2, 3]}])


# ----------------------------------------------------------------------------------------------- LoRA end to end
def test_lora_training_learns_changes_generation_saves_reloads_and_merges(tmp_path):
    processor = build_tiny_processor(TARGET)
    base = build_tiny_model(seed=SEED)  # the same weights run_recipe starts from
    prompt = t2i_prompt(processor)
    before = image_tokens(base, prompt)

    recipe = parse_recipe(tiny_recipe(
        tmp_path / "lora", use_peft=True, lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules="all-linear",
        lora_train_image_head=True, dropout=0.05, max_steps=24, z_loss_weight=1e-4,
    ))
    result = run_recipe(recipe)
    log = losses(result.trainer)
    first, last = log[1], log[24]
    assert last < 0.5 * first, f"LoRA did not learn: loss {first:.3f} -> {last:.3f}"
    z = [h["z_loss"] for h in result.trainer.state.log_history if "z_loss" in h]
    assert z and all(v > 0 for v in z)

    # saved: the PEFT adapter (with the trained lm_head image rows) and a merged pipeline folder
    adapter_dir, pipe_dir = result.adapter_dir, result.pipeline_dir
    cfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and "lm_head" in cfg["trainable_token_indices"]
    assert not any("lm_head" in t or "vqmodel" in t for t in cfg["target_modules"])  # all-linear minus head and VQGAN
    assert os.path.isfile(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(pipe_dir, "model_index.json"))
    # the final model config keeps Lumina's ids and z-loss weight (not the tokenizer's eos, not the training 0)
    saved_cfg = json.load(open(os.path.join(pipe_dir, "model", "config.json")))
    assert saved_cfg["eos_token_id"] == 8710 and saved_cfg["z_loss_weight"] == base.config.z_loss_weight
    assert not any(p.requires_grad for p in result.trainer.model.model.vqmodel.parameters())

    # the adapter, loaded into a pipeline around a fresh base model, gives the trained model back
    pipe = LuminaMGPTPipeline(model=build_tiny_model(seed=SEED), processor=processor)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(adapter_dir)
    assert type(pipe.model).__name__ == "LuminaMGPTForConditionalGeneration"
    batch = LuminaMGPTDataCollator()([synthetic_dataset(tiny_config(), processor, 2)[i] for i in range(2)])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        adapter_logits = pipe.model(input_ids=ids, attention_mask=mask).logits
        base_logits = base(input_ids=ids, attention_mask=mask).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-2

    # generation with the adapter attached works and differs from the base model's (same generator)
    after = image_tokens(pipe.model, prompt)
    assert not torch.equal(before, after)
    out = pipe("a red square", height=TARGET, width=TARGET, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert tuple(out.images.shape) == (1, 2, 2)

    # merging gives the adapter model's logits: the merged pipeline folder, and fuse_lora() in place
    merged = LuminaMGPTPipeline.from_pretrained(pipe_dir)
    # only the UniRep rows of lm_head were trained (PEFT trainable tokens); the text rows are the base model's
    changed = (merged.model.lm_head.weight - base.lm_head.weight).abs().sum(-1) > 0
    unirep = torch.zeros_like(changed)
    unirep[json.load(open(os.path.join(adapter_dir, "adapter_config.json")))["trainable_token_indices"]["lm_head"]] = True
    assert changed[unirep].any() and not changed[~unirep].any()
    assert set(os.listdir(adapter_dir)).isdisjoint({"training_args.bin"})
    assert "use_peft" in open(os.path.join(pipe_dir, "training_recipe.yaml")).read()
    with torch.no_grad():
        merged_logits = merged.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=0)
    pipe.fuse_lora()
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(input_ids=ids, attention_mask=mask).logits, adapter_logits, atol=1e-4, rtol=0)
    assert torch.equal(image_tokens(pipe.model, prompt), after)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(input_ids=ids, attention_mask=mask).logits, base_logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- z-loss
def vq_encoded_dataset(model, processor):
    """Two items tokenized by the processor with the tiny VQGAN (the offline path of `lumina-hf tokenize`)."""
    import PIL.Image

    images = [PIL.Image.new("RGB", (TARGET, TARGET), c) for c in ("red", "blue")]
    convs = [
        [{"role": "user", "content": text_to_image_prompt("a red square", TARGET, TARGET)}, {"role": "assistant", "content": "<|image|>"}],
        {"conversations": [{"from": "human", "value": "Describe the image in detail. <|image|>"}, {"from": "gpt", "value": "blue."}]},
    ]
    out = processor(conversations=convs, images=[[images[0]], [images[1]]], vq_model=model, return_labels=True, return_tensors=None)
    rows = {"input_ids": [], "labels": []}
    for ids, labels, mask in zip(out["input_ids"], out["labels"], out["attention_mask"]):
        n = sum(mask)
        rows["input_ids"].append(ids[:n])
        rows["labels"].append(labels[:n])
    return Dataset.from_dict(rows)


def test_trainer_z_loss_equals_the_formula(tmp_path):
    processor = build_tiny_processor(TARGET)
    model = build_tiny_model(seed=1)
    data = vq_encoded_dataset(model, processor)
    weight = 0.5  # large, so the z term is clearly visible next to the cross-entropy
    recipe = parse_recipe(tiny_recipe(tmp_path / "z", z_loss_weight=weight))
    trainer = build_trainer(recipe, model, processor, train_dataset=data)
    assert model.config.z_loss_weight == 0.0  # the model's own z-loss is off: counted once, in the trainer

    batch = trainer.data_collator([data[0], data[1]])
    model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))

    # independent: full logits, shift, positions with label >= 0
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    shift, target = logits[:, :-1], batch["labels"][:, 1:]
    keep = target >= 0
    ce = F.cross_entropy(shift[keep], target[keep])
    z = (torch.logsumexp(shift[keep], dim=-1) ** 2).mean()
    torch.testing.assert_close(loss.detach(), ce + weight * z, rtol=1e-5, atol=1e-5)
    assert trainer.last_loss_parts["z_loss"] == pytest.approx(float(z), rel=1e-5)
    assert trainer.last_loss_parts["ce"] == pytest.approx(float(ce), rel=1e-5)

    # the full-logits path (used under DeepSpeed ZeRO-3) gives the same loss
    trainer.full_logits_loss = True
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(trainer.model, dict(batch)), loss.detach(), rtol=1e-5, atol=1e-5)
    trainer.full_logits_loss = False

    # the same number as the model's own forward z-loss (SPEC.md section 1) when that is switched on
    model.config.z_loss_weight = weight
    with torch.no_grad():
        own = model(**batch).loss
    model.config.z_loss_weight = 0.0
    torch.testing.assert_close(own, loss.detach(), rtol=1e-5, atol=1e-5)

    # gradients reach the decoder but never the frozen VQGAN
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.vqmodel.parameters())


def test_weight_decay_only_on_weight_matrices(tmp_path):
    processor = build_tiny_processor(TARGET)
    model = build_tiny_model(seed=1)
    recipe = parse_recipe(tiny_recipe(tmp_path / "wd"))
    trainer = build_trainer(recipe, model, processor, train_dataset=synthetic_dataset(model.config, processor, 4))
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    assert "model.layers.0.self_attn.q_proj.weight" in decay and "lm_head.weight" in decay
    no_decay = [n for n in dict(model.named_parameters()) if n not in decay and not n.startswith("model.vqmodel.")]
    assert "model.embed_tokens.weight" in no_decay
    assert "model.layers.0.self_attn.q_norm.weight" in no_decay and "model.layers.0.self_attn.k_norm.bias" in no_decay
    assert "model.layers.0.input_layernorm.weight" in no_decay and "model.norm.weight" in no_decay


# ----------------------------------------------------------------------------------------------- resume
class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, caplog):
    common = dict(max_steps=6, save_steps=3, save_strategy="steps", dropout=0.0, dataloader_num_workers=0, learning_rate=3e-3)
    processor = build_tiny_processor(TARGET)

    def trainer_for(out, callbacks=()):
        recipe = parse_recipe(tiny_recipe(out, **common))
        model, proc = load_model_and_processor(recipe.model, recipe.lora, recipe.training)
        return build_trainer(recipe, model, proc, callbacks=list(callbacks))

    full = trainer_for(tmp_path / "a")
    full.train()
    reference = losses(full)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    interrupted = trainer_for(tmp_path / "b", [_StopAt(3)])
    interrupted.train()
    assert sorted(losses(interrupted)) == [1, 2, 3]
    assert os.path.isdir(tmp_path / "b" / "checkpoint-3")

    # a later checkpoint cut short by a kill while saving (only config.json written) is skipped, and an explicit
    # resume from it is refused
    broken = tmp_path / "b" / "checkpoint-5"
    broken.mkdir()
    (broken / "config.json").write_text((tmp_path / "b" / "checkpoint-3" / "config.json").read_text())
    with pytest.raises(ValueError, match="checkpoint-5 is not a complete checkpoint"):
        run_recipe(parse_recipe(tiny_recipe(tmp_path / "b", resume_from_checkpoint=str(broken), **common)))
    # resume_from_checkpoint: true picks the latest complete checkpoint-N of output_dir, and says which
    with caplog.at_level(logging.INFO, logger="lumina_hf"):
        resumed = run_recipe(parse_recipe(tiny_recipe(tmp_path / "b", resume_from_checkpoint=True, **common)))
    assert any("resuming from" in r.message and r.message.rstrip(")").endswith("(step 3") for r in caplog.records)
    assert any("skipped incomplete checkpoint(s) checkpoint-5" in r.message for r in caplog.records)
    after = losses(resumed.trainer)  # the checkpoint's history (steps 1-3) plus the steps trained after resuming
    assert sorted(after) == [1, 2, 3, 4, 5, 6] and resumed.trainer.state.global_step == 6
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(reference[step], abs=1e-5), (step, after, reference)

    # full training keeps the grouped q/k-norm layout (one weight per model-parallel group, shared by the heads)
    attn = resumed.trainer.model.model.layers[0].self_attn
    assert tuple(attn.q_norm.weight.shape) == (1, 16) and tuple(attn.k_norm.bias.shape) == (1, 16)

    # full fine-tuning writes a pipeline folder with the trained weights and Lumina's own ids
    pipe = LuminaMGPTPipeline.from_pretrained(str(tmp_path / "b"))
    assert pipe.model.config.eos_token_id == 8710 and pipe.model.generation_config.eos_token_id in (8710, [8710])
    batch = LuminaMGPTDataCollator()([synthetic_dataset(tiny_config(), processor, 2)[i] for i in range(2)])
    trained = resumed.trainer.accelerator.unwrap_model(resumed.trainer.model).eval()
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(**batch).logits, trained(**batch).logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- recipes
def training_recipes():
    """Every recipe of `lumina-hf train`: all YAML under recipes/ except the accelerate configs and the VQGAN
    trainer's own recipes (vqgan*.yaml)."""
    files = sorted(glob.glob(os.path.join(RECIPES, "**", "*.yaml"), recursive=True))
    return [
        f for f in files
        if os.sep + "accelerate_configs" + os.sep not in f and not os.path.basename(f).startswith("vqgan")
    ]


def test_expected_recipes_exist():
    names = {os.path.relpath(f, RECIPES) for f in training_recipes()}
    for expected in (
        "lumina-mgpt-7b/lora/config_t2i.yaml",
        "lumina-mgpt-7b/fp_sft/config_512.yaml",
        "lumina-mgpt-7b/fp_sft/config_768.yaml",
        "lumina-mgpt-7b/fp_sft/config_1024.yaml",
        "lumina-mgpt-7b/omni_sft/config_full.yaml",
        "tiny/config_lora.yaml",
        "tiny/config_full.yaml",
    ):
        assert expected in names
    for name in ("single_gpu", "multi_gpu", "fsdp2", "zero3"):
        assert os.path.isfile(os.path.join(RECIPES, "accelerate_configs", f"{name}.yaml"))
    assert os.path.isfile(os.path.join(RECIPES, "launch.slurm")) and os.path.isfile(os.path.join(RECIPES, "README.md"))


@pytest.mark.parametrize("path", training_recipes(), ids=lambda p: os.path.relpath(p, RECIPES))
def test_every_recipe_dry_runs(path):
    recipe = parse_recipe(path)
    result = run_recipe(recipe, dry_run=True)
    assert result.dry_run and result.output_dir
    training = recipe.training
    assert training.dataset_kwargs["skip_prepare_dataset"] and training.remove_unused_columns is False
    assert training.train_sampling_strategy == "group_by_length"
    assert (training.adam_beta1, training.adam_beta2, training.max_grad_norm) == (0.9, 0.95, 4.0)
    # the published schedule; the toy nano model's later stages anneal instead (cosine)
    nano_annealed = "nano" in str(path) and training.lr_scheduler_type == "cosine"
    assert training.lr_scheduler_type == "constant_with_warmup" or nano_annealed
    if recipe.data.target_size:
        assert training.max_length >= longest_unirep_length(recipe.data.target_size)[0]
    if recipe.lora.use_peft:
        targets = result.peft_config.target_modules
        assert "lm_head" not in (targets if isinstance(targets, (set, list)) else [targets])


def test_published_recipes_keep_the_published_hyperparameters():
    for stage in ("512", "768", "1024"):
        t = parse_recipe(os.path.join(RECIPES, "lumina-mgpt-7b", "fp_sft", f"config_{stage}.yaml"))
        tr = t.training
        assert (tr.learning_rate, tr.weight_decay, tr.per_device_train_batch_size, tr.num_train_epochs) == (2e-5, 0.1, 8, 2)
        assert tr.warmup_steps == 0.01 and tr.z_loss_weight == 1e-5 and t.model.dropout == 0.05
        assert not t.lora.use_peft
    # each stage starts from the previous stage's output, and max_length rises
    c512, c768, c1024 = (parse_recipe(os.path.join(RECIPES, "lumina-mgpt-7b", "fp_sft", f"config_{s}.yaml")) for s in (512, 768, 1024))
    assert c768.model.model_name_or_path == c512.training.output_dir
    assert c1024.model.model_name_or_path == c768.training.output_dir
    assert c512.training.max_length < c768.training.max_length < c1024.training.max_length
    omni = parse_recipe(os.path.join(RECIPES, "lumina-mgpt-7b", "omni_sft", "config_full.yaml"))
    assert omni.model.model_name_or_path == c768.training.output_dir and len(omni.data.dataset_mixture) > 5


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import ClusterConfig

    for path in glob.glob(os.path.join(RECIPES, "accelerate_configs", "*.yaml")):
        ClusterConfig.from_yaml_file(path)  # raises on unknown keys
    fsdp = ClusterConfig.from_yaml_file(os.path.join(RECIPES, "accelerate_configs", "fsdp2.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and "LuminaMGPTDecoderLayer" in fsdp["fsdp_transformer_layer_cls_to_wrap"]
    assert fsdp["fsdp_activation_checkpointing"] is True


def test_overrides_and_cli(tmp_path, capsys):
    from lumina_hf import cli
    from lumina_hf import train as train_module

    path = os.path.join(RECIPES, "tiny", "config_lora.yaml")
    r = parse_recipe(path, ["--learning_rate", "1e-4", "--output_dir", str(tmp_path / "x"), "--set", "lora_r=4",
                            "--save_strategy", "no", "--no_group_by_length"])
    assert r.training.learning_rate == 1e-4 and r.lora.lora_r == 4 and r.training.output_dir == str(tmp_path / "x")
    assert r.training.save_strategy.value == "no" and r.training.train_sampling_strategy == "random"
    assert cli.main(["train", "--config", path, "--dry_run", "--learning_rate", "1e-4", "--set", "lora_r=4"]) == 0
    assert train_module.main(["--config", path, "--dry_run", "--per_device_train_batch_size=2"]) == 0
    with pytest.raises(SystemExit, match="learning_rat"):
        cli.main(["train", "--config", path, "--dry_run", "--learning_rat", "1e-4"])
    assert len(recipe_keys()) > 100 and "z_loss_weight" in recipe_keys()


# ----------------------------------------------------------------------------------------------- bad input
def test_unknown_recipe_keys_are_named(tmp_path):
    cfg = tiny_recipe(tmp_path / "u")
    cfg["lora_rank"] = 8
    cfg["learning_rte"] = 1e-3
    with pytest.raises(ValueError, match="lora_rank") as err:
        parse_recipe(cfg)
    assert "learning_rte" in str(err.value) and "learning_rate" in str(err.value)  # named, with the close match
    yaml_path = tmp_path / "typo.yaml"
    yaml_path.write_text("model_name_or_path: tiny-random\noutput_dir: x\ndataset_mixture: [{path: synthetic:tiny}]\nnum_train_epoch: 2\n")
    with pytest.raises(ValueError, match="num_train_epoch.*typo.yaml|typo.yaml.*num_train_epoch"):
        parse_recipe(str(yaml_path))
    with pytest.raises(ValueError, match="weights"):
        parse_recipe(tiny_recipe(tmp_path / "u", dataset_mixture=[{"path": "./d", "weights": 2}]))
    with pytest.raises(ValueError, match="lm_head"):
        parse_recipe(tiny_recipe(tmp_path / "u", use_peft=True, lora_target_modules=["q_proj", "lm_head"]))


def test_max_length_too_short_names_the_minimum(tmp_path):
    need, (w, h) = longest_unirep_length(512)
    assert (need, (w, h)) == (unirep_length(256, 1024), (256, 1024)) == (1092, (256, 1024))
    with pytest.raises(ValueError, match=r"minimum of 1604") as err:
        parse_recipe(tiny_recipe(tmp_path / "m", target_size=512, prompt_room=512, max_length=1500))
    assert "256x1024" in str(err.value) and "1092" in str(err.value)
    assert longest_unirep_length(768)[0] == 2404 and longest_unirep_length(1024)[0] == 4228


def test_bad_datasets_are_refused_before_training(tmp_path):
    recipe = parse_recipe(tiny_recipe(tmp_path / "d"))
    no_labels = tmp_path / "no_labels"
    Dataset.from_dict({"input_ids": [[0, 5, 8710]], "length": [3]}).save_to_disk(str(no_labels))
    recipe.data.dataset_mixture = [{"path": str(no_labels), "weight": 1.0}]
    with pytest.raises(ValueError, match="'labels'.*lumina-hf tokenize"):
        build_datasets(recipe.data, recipe.training)
    neither = tmp_path / "neither"
    Dataset.from_dict({"text": ["a cat"]}).save_to_disk(str(neither))
    recipe.data.dataset_mixture = [{"path": str(neither), "weight": 1.0}]
    with pytest.raises(ValueError, match="'input_ids' and no 'labels'"):
        build_datasets(recipe.data, recipe.training)
    raw = tmp_path / "raw_images"
    Dataset.from_dict({"image": ["a.png"], "text": ["a cat"], "input_ids": [[0]], "labels": [[0]]}).save_to_disk(str(raw))
    recipe.data.dataset_mixture = [{"path": str(raw), "weight": 1.0}]
    with pytest.raises(ValueError, match="'image'.*lumina-hf tokenize"):
        build_datasets(recipe.data, recipe.training)
    recipe.data.dataset_mixture = [{"path": str(tmp_path / "missing"), "weight": 1.0}]
    with pytest.raises(ValueError, match="not found"):
        build_datasets(recipe.data, recipe.training)
    recipe.data.check_data = True
    with pytest.raises(ValueError, match="missing"):
        run_recipe(recipe, dry_run=True)


def test_mixture_weights_and_too_long_items(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    Dataset.from_dict({"input_ids": [[0, 1, 2]] * 10, "labels": [[-100, 1, 2]] * 10}).save_to_disk(str(a))
    Dataset.from_dict({"input_ids": [[0] * 300] * 4 + [[0, 3]] * 4, "labels": [[0] * 300] * 4 + [[-100, 3]] * 4}).save_to_disk(str(b))
    recipe = parse_recipe(tiny_recipe(tmp_path / "mix", dataset_mixture=[{"path": str(a), "weight": 0.5}, {"path": str(b), "weight": 2.0}]))
    train, _ = build_datasets(recipe.data, recipe.training)
    # 5 rows of a; 16 rows of b, of which the 8 longer than max_length=256 are dropped (never truncated)
    assert len(train) == 5 + 8 and max(train["length"]) <= 256 and set(train.column_names) == {"input_ids", "labels", "length"}


def test_resume_from_another_model_is_refused(tmp_path):
    out = tmp_path / "r"
    ckpt = out / "checkpoint-5"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096, "vocab_size": 32000}))
    with pytest.raises(ValueError, match="model_type.*llama.*lumina_mgpt|hidden_size"):
        run_recipe(parse_recipe(tiny_recipe(out, resume_from_checkpoint=True)))
    with pytest.raises(ValueError, match="no checkpoint"):
        run_recipe(parse_recipe(tiny_recipe(tmp_path / "empty", resume_from_checkpoint=True)))


def test_stage_output_generates_at_the_stage_target_size(tmp_path):
    # an FP-SFT stage (target_size 32) starting from a model whose processor says 64 saves a processor at 32,
    # so the next stage and the pipeline default to the size the stage was trained at
    recipe = parse_recipe(tiny_recipe(tmp_path / "full", tiny_target_size=64, max_steps=1))
    result = run_recipe(recipe)
    saved = LuminaMGPTProcessor.from_pretrained(os.path.join(result.pipeline_dir, "processor"))
    assert saved.image_processor.target_size == TARGET


def test_length_grouped_order_equals_transformers_sampler_order():
    """Our own length-grouped order (transformers keeps its helper out of the public API) is the same permutation as
    transformers' `get_length_grouped_indices` for the same generator state, on sizes that exercise each branch."""
    from transformers.trainer_pt_utils import get_length_grouped_indices  # the reference, test-side only

    from lumina_hf.training.trainer import length_grouped_order

    for n, batch in ((1, 4), (7, 4), (50, 4), (997, 8), (5000, 3)):
        lengths = torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        ours = length_grouped_order(lengths, batch, torch.Generator().manual_seed(3))
        theirs = get_length_grouped_indices(lengths, batch, generator=torch.Generator().manual_seed(3))
        assert ours == theirs, (n, batch)
        assert sorted(ours) == list(range(n)) and lengths[ours[0]] == max(lengths)


# ----------------------------------------------------------------------------------------------- bad input, early
def test_bad_recipes_and_data_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    from datasets import Dataset

    import lumina_hf.training.runner as runner

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the recipe and the data were checked")

    monkeypatch.setattr(runner, "load_model_and_processor", no_model)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model_name_or_path: tiny-random\nlearning_rate: [1,\n")
    with pytest.raises(ValueError, match=r"broken.yaml is not valid YAML \(line 3"):
        parse_recipe(str(broken))
    with pytest.raises(ValueError, match="missing.yaml does not exist"):
        parse_recipe(str(tmp_path / "missing.yaml"))
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        with pytest.raises(ValueError, match=f"{key} must be an integer >= 1"):
            parse_recipe(tiny_recipe(tmp_path / "out", **{key: 0}))

    def saved(name, rows):
        path = tmp_path / name
        Dataset.from_dict(rows).save_to_disk(str(path))
        return str(path)

    empty = saved("empty", {"input_ids": [], "labels": []})
    foreign = saved("foreign", {"input_ids": [[0, 5, 70000, 8710]], "labels": [[-100, 5, 70000, 8710]]})
    for path, message in ((empty, "is empty"), (foreign, r"token ids span 0\.\.70000, outside the model's vocabulary")):
        recipe = parse_recipe(tiny_recipe(tmp_path / "out", dataset_mixture=[{"path": path, "weight": 1.0}]))
        with pytest.raises(ValueError, match=message):
            run_recipe(recipe)
    assert not (tmp_path / "out").exists()  # nothing written for a refused run


@pytest.mark.cuda
def test_fused_liger_loss_equals_the_chunked_loss_on_cuda():
    """On a GPU with liger-kernel: the fused loss has the chunked loss's value and gradients (CE + weighted z-loss)."""
    from lumina_hf.training.trainer import chunked_lm_loss, fused_lm_loss, liger_available

    if not liger_available():
        pytest.skip("needs CUDA and liger-kernel (pip install liger-kernel)")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 33, 64, generator=g).cuda().requires_grad_()
    weight = (0.1 * torch.randn(1000, 64, generator=g)).cuda().requires_grad_()
    labels = torch.randint(0, 1000, (2, 33), generator=g).cuda()
    labels[0, :5] = -100
    w = 1e-2
    results = []
    for fn in (lambda: chunked_lm_loss(hidden, weight, labels, 16), lambda: fused_lm_loss(hidden, weight, labels, w)):
        parts = fn()
        total = parts["nll_sum"] + w * parts["z_sum"]
        grads = torch.autograd.grad(total, (hidden, weight))
        results.append((total.detach(), parts["z_sum"].detach(), grads))
    (a, za, ga), (b, zb, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(za, zb, rtol=1e-4, atol=1e-3)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)
