"""LoRA adapters on the pipeline through PEFT's own API: several named adapters mixed by weight (checked against
weights merged by hand), exact fuse/unfuse, disable/enable, delete, and bad adapters refused with the pipeline
unchanged."""

import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from lumina_hf import LuminaMGPTPipeline
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj", "down_proj"]
ROWS = [4, 5, 6, 8197, 8803]  # a few UniRep ids: image codes, image start, row end
IDS = torch.tensor([[0, 11, 12, 13, 8710, 8197, 8806, 8806, 4, 5, 8803, 6, 7, 8803]])


def make_adapter(path, seed, *, rows=True, r=4, alpha=8, **model_overrides):
    """A random LoRA adapter (and lm_head rows) for the tiny base model, saved the way training saves it."""
    model = build_tiny_model(seed=0, **model_overrides)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False,
        trainable_token_indices={"lm_head": ROWS} if rows else None,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)  # visible effect on the logits
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    peft_model.save_pretrained(path)
    return str(path)


def reference_model(adapters: list[tuple[str, float]]):
    """The tiny base model with `W + sum_i w_i * scale_i * B_i A_i` and the lm_head rows mixed as
    `orig + sum_i w_i (rows_i - orig)`, computed here from the saved files."""
    model = build_tiny_model(seed=0)
    modules = dict(model.named_modules())
    with torch.no_grad():
        head = model.lm_head.weight
        original_rows = head[ROWS].clone()
        for path, w in adapters:
            cfg = json.load(open(os.path.join(path, "adapter_config.json")))
            scale = cfg["lora_alpha"] / cfg["r"]
            sd = {k.removeprefix("base_model.model."): v for k, v in load_file(os.path.join(path, "adapter_model.safetensors")).items()}
            for key, a in sd.items():
                if key.endswith("lora_A.weight"):
                    target = key[: -len(".lora_A.weight")]
                    b = sd[target + ".lora_B.weight"]
                    modules[target].weight += w * scale * (b @ a)
                elif key.endswith("trainable_tokens_delta"):
                    head[ROWS] += w * (a - original_rows)
    return model


def pipeline():
    pipe = LuminaMGPTPipeline(model=build_tiny_model(seed=0), processor=build_tiny_processor(32))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_two_named_adapters_mix_by_weight_like_a_hand_merge(tmp_path):
    a = make_adapter(tmp_path / "a", 1)
    b = make_adapter(tmp_path / "b", 2)
    pipe = pipeline()
    base = logits(pipe.model)
    pipe.load_lora_weights(a, adapter_name="a")
    pipe.load_lora_weights(b, adapter_name="b")
    assert pipe.get_list_adapters() == {"model": ["a", "b"]}
    assert pipe.get_active_adapters() == ["b"]  # the last loaded adapter is active alone
    assert type(pipe.model).__name__ == "LuminaMGPTForConditionalGeneration"
    torch.testing.assert_close(logits(pipe.model), logits(reference_model([(b, 1.0)])), atol=1e-4, rtol=0)

    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
    assert pipe.get_active_adapters() == ["a", "b"]
    mixed = logits(pipe.model)
    torch.testing.assert_close(mixed, logits(reference_model([(a, 0.7), (b, 0.3)])), atol=1e-4, rtol=0)
    assert (mixed - logits(reference_model([(a, 0.5), (b, 0.5)]))).abs().max() > 1e-2  # the weights matter
    pipe.set_adapters(["a", "b"], weights=[0.2, 0.9])  # the spelling
    torch.testing.assert_close(logits(pipe.model), logits(reference_model([(a, 0.2), (b, 0.9)])), atol=1e-4, rtol=0)
    pipe.set_adapters("a", 0.5)
    torch.testing.assert_close(logits(pipe.model), logits(reference_model([(a, 0.5)])), atol=1e-4, rtol=0)

    pipe.disable_lora()
    torch.testing.assert_close(logits(pipe.model), base, atol=0, rtol=0)
    pipe.enable_lora()
    torch.testing.assert_close(logits(pipe.model), logits(reference_model([(a, 0.5)])), atol=1e-4, rtol=0)

    # generation runs with a mix (the sampler reads the mixed lm_head rows)
    pipe.set_adapters(["a", "b"], [0.6, 0.4])
    out = pipe("a red square", height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert tuple(out.images.shape) == (1, 2, 2)

    pipe.delete_adapters("a")
    assert pipe.get_list_adapters() == {"model": ["b"]} and pipe.get_active_adapters() == ["b"]
    torch.testing.assert_close(logits(pipe.model), logits(reference_model([(b, 0.4)])), atol=1e-4, rtol=0)
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {"model": []}
    torch.testing.assert_close(logits(pipe.model), base, atol=0, rtol=0)
    assert not any("lora" in n or "token_adapter" in n for n, _ in pipe.model.named_parameters())


def test_fuse_then_unfuse_restores_the_logits_exactly(tmp_path):
    a = make_adapter(tmp_path / "a", 1)
    b = make_adapter(tmp_path / "b", 2, rows=False, r=2, alpha=2)
    pipe = pipeline()
    base_state = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    pipe.load_lora_weights(a, adapter_name="a")
    pipe.load_lora_weights(b, adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.8, 0.5])
    unfused = logits(pipe.model)

    pipe.fuse_lora(lora_scale=0.5)
    expected = logits(reference_model([(a, 0.4), (b, 0.25)]))
    torch.testing.assert_close(logits(pipe.model), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="unfuse_lora"):
        pipe.set_adapters(["a"])
    pipe.unfuse_lora()
    assert torch.equal(logits(pipe.model), unfused)
    assert pipe.get_active_adapters() == ["a", "b"]

    # fuse at scale 1, unload: the merged model keeps the adapters' effect without adapter layers
    pipe.fuse_lora()
    fused = logits(pipe.model)
    pipe.unload_lora_weights()
    assert torch.equal(logits(pipe.model), fused)
    torch.testing.assert_close(fused, logits(reference_model([(a, 0.8), (b, 0.5)])), atol=1e-4, rtol=0)

    # unfuse before unloading gives the base weights back bit for bit
    pipe2 = pipeline()
    pipe2.load_lora_weights(a)
    pipe2.fuse_lora()
    pipe2.unfuse_lora()
    pipe2.unload_lora_weights()
    state = pipe2.model.state_dict()
    assert state.keys() == base_state.keys()
    assert all(torch.equal(state[k], base_state[k]) for k in state)


def test_bad_adapters_are_refused_and_leave_the_pipeline_unchanged(tmp_path):
    good = make_adapter(tmp_path / "good", 1)
    wide = make_adapter(tmp_path / "wide", 3, hidden_size=32, intermediate_size=64)  # another base model
    pipe = pipeline()
    pipe.load_lora_weights(good, adapter_name="good")
    pipe.set_adapters("good", 0.5)
    before = logits(pipe.model)
    before_state = {k: v.clone() for k, v in pipe.model.state_dict().items()}

    def unchanged():
        assert pipe.get_list_adapters() == {"model": ["good"]} and pipe.get_active_adapters() == ["good"]
        state = pipe.model.state_dict()
        assert state.keys() == before_state.keys() and all(torch.equal(state[k], before_state[k]) for k in state)
        assert torch.equal(logits(pipe.model), before)

    with pytest.raises(ValueError, match=r"(?s)wide.*shape.*another base model"):
        pipe.load_lora_weights(wide, adapter_name="wide")
    unchanged()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty has no adapter_config.json"):
        pipe.load_lora_weights(str(empty), adapter_name="empty")
    unchanged()
    with pytest.raises(ValueError, match=r"unknown adapter name\(s\) \['nope'\].*\['good'\]"):
        pipe.set_adapters(["good", "nope"], [1.0, 1.0])
    unchanged()
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora_weights(good, adapter_name="good")
    unchanged()
    with pytest.raises(ValueError, match="2 weights for 1 adapters"):
        pipe.set_adapters(["good"], [1.0, 0.5])
    unchanged()
    with pytest.raises(ValueError, match="unknown adapter"):
        pipe.delete_adapters("nope")
    unchanged()
