"""CPU tests for `lumina_hf.convert_lumina_mgpt` (issue 5): published Lumina-mGPT checkpoint + Meta's VQGAN
-> one lumina_hf folder.

The inputs are written here in the published formats (SPEC.md section 1): a Chameleon-fork `config.json`,
two safetensors shards + index with transformers' Chameleon key names and grouped `[mp, head_dim]` q/k-norm
weights, a taming-style `vqgan.yaml` and a `vqgan.ckpt` torch pickle with a `state_dict` (plus training-only
`loss.*` tensors), and a `tokenizer.json`. The references are independent of lumina_hf: stock
`transformers.ChameleonForConditionalGeneration` loaded from the published weights (q/k-norm expanded with
`repeat_interleave`), and a plainly written VQGAN (SPEC.md section 2) run on the ckpt's tensors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import shutil

import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import lumina_hf
from lumina_hf import LuminaMGPTForConditionalGeneration, LuminaMGPTPipeline, LuminaMGPTVQGAN, convert_checkpoint
from lumina_hf import convert_lumina_mgpt as conv
from lumina_hf.conversion import output as conv_output
from lumina_hf.cli import main as cli_main
from lumina_hf.configuration_lumina_mgpt import LuminaMGPTVQConfig, taming_to_vq_config_dict
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor, build_tiny_tokenizer, tiny_vocabulary

VOCAB = 65536
IMG_LO, IMG_HI = 4, 8195
NON_IMAGE_IDS = torch.cat([torch.arange(0, IMG_LO), torch.arange(IMG_HI + 1, VOCAB)])
TARGET = 64  # a tiny bucket family (64x64, 128x32, ...): the image processor takes any multiple of 32

TINY_VQ = {  # taming ddconfig + embed_dim/n_embed of a tiny factor-16 VQGAN
    "embed_dim": 32, "n_embed": 64, "double_z": False, "z_channels": 32, "resolution": 64, "in_channels": 3,
    "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
}
ARCH_7B = dict(num_attention_heads=4, num_key_value_heads=4, model_parallel_size=1, swin_norm=False)
ARCH_34B = dict(num_attention_heads=8, num_key_value_heads=2, model_parallel_size=2, swin_norm=True)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ published-format inputs
def published_config(arch: dict, config_mp: int | None = None) -> dict:
    """A config.json shaped like Alpha-VLLM/Lumina-mGPT-7B-768's (sizes shrunk)."""
    return {
        "_name_or_path": "Alpha-VLLM/Lumina-mGPT-7B-768",
        "architectures": ["ChameleonXLLMXForConditionalGeneration"],
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "dropout": 0.05, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
        "intermediate_size": 128, "mask_image_logits": False, "max_position_embeddings": 10240,
        "mlp_bias": False, "model_type": "chameleon", "num_hidden_layers": 2, "pad_token_id": None,
        "qk_layernorm": True, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.44.0",
        "use_cache": True, "vocab_size": VOCAB, "vocabulary_map": dict(tiny_vocabulary()),
        "vq_config": dict(TINY_VQ, resolution=256), "z_loss_weight": 1e-05,
        "num_attention_heads": arch["num_attention_heads"], "num_key_value_heads": arch["num_key_value_heads"],
        "model_parallel_size": arch["model_parallel_size"] if config_mp is None else config_mp,
        "swin_norm": arch["swin_norm"],
    }


@torch.no_grad()
def published_lm_state(arch: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random non-trivial LM weights with the published key names and grouped q/k-norm shapes, in bf16."""
    donor = build_tiny_model(seed=seed, **arch)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in donor.state_dict().items():
        if name.startswith("model.vqmodel."):
            continue
        if name.endswith(("_norm.weight",)) and "self_attn" in name:
            v = 1.0 + 0.5 * torch.randn(p.shape, generator=g)
        elif name.endswith("_norm.bias"):
            v = 0.5 * torch.randn(p.shape, generator=g)
        elif "norm" in name:
            v = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
        elif "embed_tokens" in name:
            v = torch.randn(p.shape, generator=g)
        else:
            v = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
        out[name] = v.to(torch.bfloat16).contiguous()
    mp = arch["model_parallel_size"]
    assert tuple(out["model.layers.0.self_attn.q_norm.weight"].shape) == (mp, 16 if arch["num_attention_heads"] == 4 else 8)
    return out


def write_published_checkpoint(folder, arch: dict, seed: int = 0, config_mp: int | None = None) -> dict[str, torch.Tensor]:
    """config.json + two shards + index + tokenizer.json; returns the state dict written."""
    os.makedirs(folder, exist_ok=True)
    sd = published_lm_state(arch, seed)
    keys = list(sd)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    weight_map = {}
    for fname, ks in halves.items():
        save_file({k: sd[k] for k in ks}, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(published_config(arch, config_mp), f)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    build_tiny_tokenizer().backend_tokenizer.save(os.path.join(folder, "tokenizer.json"))
    return sd


def vqgan_yaml_text(vq: dict) -> str:
    dd = {k: v for k, v in vq.items() if k not in ("embed_dim", "n_embed")}
    lines = [
        "model:", "  base_learning_rate: 4.5e-06", "  target: taming.models.vqgan.VQModel", "  params:",
        f"    embed_dim: {vq['embed_dim']}", f"    n_embed: {vq['n_embed']}", "    ddconfig:",
    ]
    for k, v in dd.items():
        lines.append(f"      {k}: {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
    lines += [
        "    lossconfig:", "      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
        "      params:", "        disc_start: 100001", "        codebook_weight: 1.0",
    ]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def tiny_vq_state(seed: int = 1) -> dict[str, torch.Tensor]:
    vq = LuminaMGPTVQGAN(LuminaMGPTVQConfig(**taming_to_vq_config_dict(TINY_VQ)))
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in vq.state_dict().items():
        if "norm" in k and k.endswith(".weight"):
            t = 1.0 + 0.2 * torch.randn(v.shape, generator=g)
        elif k.endswith(".bias"):
            t = 0.1 * torch.randn(v.shape, generator=g)
        elif k == "quantize.embedding.weight":
            t = torch.randn(v.shape, generator=g)
        else:
            fan_in = v[0].numel()
            t = torch.randn(v.shape, generator=g) / math.sqrt(fan_in)
        sd[k] = t.contiguous()
    return sd


def write_meta_vqgan(folder, seed: int = 1, extra: dict | None = None) -> dict[str, torch.Tensor]:
    os.makedirs(folder, exist_ok=True)
    sd = tiny_vq_state(seed)
    ckpt = dict(sd)
    ckpt["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    ckpt["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": ckpt, **(extra or {})}, os.path.join(folder, "vqgan.ckpt"))
    with open(os.path.join(folder, "vqgan.yaml"), "w") as f:
        f.write(vqgan_yaml_text(TINY_VQ))
    return sd


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    lm = write_published_checkpoint(root / "Lumina-mGPT-7B-768", ARCH_7B, seed=0)
    vq = write_meta_vqgan(root / "tokenizer", seed=1)
    return {"ckpt": root / "Lumina-mGPT-7B-768", "vqgan": root / "tokenizer", "lm": lm, "vq": vq}


@pytest.fixture(scope="module")
def converted(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "lumina-7b"
    result = convert_checkpoint(inputs["ckpt"], inputs["vqgan"], out, target_size=TARGET, dtype="float32",
                                max_shard_size="10MB", progress=False)
    assert result == str(out)
    return out


# ------------------------------------------------------------------------------ independent references
def stock_chameleon_from_published(folder) -> transformers.ChameleonForConditionalGeneration:
    """Stock transformers Chameleon holding the published weights (fp32), q/k-norm repeat-interleaved per head."""
    pub = json.loads((folder / "config.json").read_text())
    cfg = transformers.ChameleonConfig(
        vocab_size=pub["vocab_size"], hidden_size=pub["hidden_size"], intermediate_size=pub["intermediate_size"],
        num_hidden_layers=pub["num_hidden_layers"], num_attention_heads=pub["num_attention_heads"],
        num_key_value_heads=pub["num_key_value_heads"], swin_norm=pub["swin_norm"],
        max_position_embeddings=pub["max_position_embeddings"], rms_norm_eps=pub["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": pub["rope_theta"]},
        vocabulary_map=pub["vocabulary_map"],
        vq_config=dict(embed_dim=32, num_embeddings=64, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 2], num_res_blocks=1, resolution=32),
    )
    stock = transformers.ChameleonForConditionalGeneration(cfg).eval()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    sd = {}
    for fname in set(index["weight_map"].values()):
        with safe_open(str(folder / fname), framework="pt") as f:
            for k in f.keys():
                v = f.get_tensor(k).float()
                if k.endswith(("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias")):
                    n = pub["num_attention_heads"] if ".q_norm." in k else pub["num_key_value_heads"]
                    v = v.repeat_interleave(n // v.shape[0], dim=0)
                sd[k] = v
    result = stock.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if not k.startswith("model.vqmodel.")] == []
    return stock


def random_ids(batch: int = 2, seq: int = 24, seed: int = 0) -> torch.LongTensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    ids[:, 0] = 0
    ids[:, 1:4] = torch.tensor([8197, 8806, 8806])
    ids[:, 4:6] = torch.randint(IMG_LO, IMG_HI + 1, (batch, 2), generator=g)
    ids[:, 6:8] = torch.tensor([8803, 8196])
    ids[:, 8] = 8710
    return ids


def assert_logits_match_stock(model, folder, seed=0):
    stock = stock_chameleon_from_published(folder)
    ids = random_ids(seed=seed)
    with torch.no_grad():
        ours = model(ids).logits
        ref = stock(ids).logits
    assert ours.dtype == torch.float32
    diff = (ours[..., NON_IMAGE_IDS] - ref[..., NON_IMAGE_IDS]).abs().max().item()
    assert diff <= 1e-5, diff
    assert ours.abs().max().item() > 1.0  # logits are not trivially small
    # stock masks the image codes; we do not
    assert torch.isfinite(ours[..., IMG_LO : IMG_HI + 1]).all()


# A VQGAN written from SPEC.md section 2 (taming VQModel), as plain functions of the ckpt's state dict.
def _gn(sd, p, h):
    return F.group_norm(h, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _swish(h):
    return h * torch.sigmoid(h)


def _conv(sd, p, h, stride=1, padding=None):
    w = sd[p + ".weight"]
    return F.conv2d(h, w, sd[p + ".bias"], stride=stride, padding=w.shape[-1] // 2 if padding is None else padding)


def _resblock(sd, p, h):
    y = _conv(sd, p + ".conv1", _swish(_gn(sd, p + ".norm1", h)))
    y = _conv(sd, p + ".conv2", _swish(_gn(sd, p + ".norm2", y)))
    if p + ".nin_shortcut.weight" in sd:
        h = _conv(sd, p + ".nin_shortcut", h)
    return h + y


def _attnblock(sd, p, h):
    b, c, hh, ww = h.shape
    n = _gn(sd, p + ".norm", h)
    q, k, v = (_conv(sd, f"{p}.{m}", n).reshape(b, c, hh * ww) for m in "qkv")
    w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # (b, query, key)
    out = (v @ w.transpose(1, 2)).reshape(b, c, hh, ww)
    return h + _conv(sd, p + ".proj_out", out)


def _mid(sd, p, h):
    return _resblock(sd, p + ".block_2", _attnblock(sd, p + ".attn_1", _resblock(sd, p + ".block_1", h)))


def ref_encode(sd, x, levels=5, nres=1):
    h = _conv(sd, "encoder.conv_in", x)
    for i in range(levels):
        for j in range(nres):
            h = _resblock(sd, f"encoder.down.{i}.block.{j}", h)
        if i != levels - 1:  # zero-pad right/bottom, 3x3 stride-2 conv
            h = _conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = _mid(sd, "encoder.mid", h)
    z = _conv(sd, "quant_conv", _conv(sd, "encoder.conv_out", _swish(_gn(sd, "encoder.norm_out", h))))
    b, c, hh, ww = z.shape
    zf = z.permute(0, 2, 3, 1).reshape(-1, c)
    e = sd["quantize.embedding.weight"]
    dist = (zf**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * zf @ e.t()
    return dist.argmin(1).view(b, hh, ww)


def ref_decode(sd, codes, levels=5, nres=1):
    h = sd["quantize.embedding.weight"][codes].permute(0, 3, 1, 2)
    h = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", h))
    h = _mid(sd, "decoder.mid", h)
    for i in reversed(range(levels)):
        for j in range(nres + 1):
            h = _resblock(sd, f"decoder.up.{i}.block.{j}", h)
        if i != 0:
            h = _conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _conv(sd, "decoder.conv_out", _swish(_gn(sd, "decoder.norm_out", h)))


def listing(folder) -> set[str]:
    return set(os.listdir(folder))


# ------------------------------------------------------------------------------ 1. the converted folder
def test_output_layout_matches_pipeline_save(converted, tmp_path):
    assert {"model", "processor", "model_index.json", "README.md"} <= listing(converted)
    model_files = listing(converted / "model")
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= model_files
    shards = sorted(f for f in model_files if f.endswith(".safetensors"))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    # the same model_index.json as LuminaMGPTPipeline(...).save_pretrained writes
    ref = tmp_path / "ref"
    LuminaMGPTPipeline(build_tiny_model(), build_tiny_processor(TARGET)).save_pretrained(ref)
    assert json.loads((converted / "model_index.json").read_text()) == json.loads((ref / "model_index.json").read_text())
    assert listing(converted / "processor") == listing(ref / "processor")
    # a complete, consistent index covering every persistent tensor of the model
    index = json.loads((converted / "model" / "model.safetensors.index.json").read_text())
    expected = set(build_tiny_model().state_dict())
    assert set(index["weight_map"]) == expected
    total = 0
    for fname in set(index["weight_map"].values()):
        with safe_open(str(converted / "model" / fname), framework="pt") as f:
            assert {k for k, v in index["weight_map"].items() if v == fname} == set(f.keys())
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert index["metadata"]["total_size"] == total
    card = (converted / "README.md").read_text()
    assert card.startswith("---\n") and "LuminaMGPTPipeline.from_pretrained" in card
    meta = huggingface_hub.ModelCard.load(converted / "README.md").data
    assert meta.base_model == "Alpha-VLLM/Lumina-mGPT-7B-768" and meta.pipeline_tag == "text-to-image"


def test_output_config_and_generation_config(converted):
    cfg = json.loads((converted / "model" / "config.json").read_text())
    assert cfg["model_type"] == "lumina_mgpt"
    assert cfg["architectures"] == ["LuminaMGPTForConditionalGeneration"]
    assert cfg["dropout"] == 0.05 and cfg["mask_image_logits"] is False and cfg["z_loss_weight"] == 1e-5
    assert cfg["qk_norm_layout"] == "grouped" and cfg["model_parallel_size"] == 1
    assert (cfg["bos_token_id"], cfg["pad_token_id"], cfg["eos_token_id"]) == (0, 1, 8710)
    # vocabulary_map reduced to the image-code tokens and <image>, read from the tokenizer
    vocab = tiny_vocabulary()
    vmap = cfg["vocabulary_map"]
    assert len(vmap) == 8192 + 1 and vmap["<image>"] == 8711
    assert all(vmap[n] == vocab[n] for n in vmap)
    assert all(n == "<image>" or (n.startswith("IMGIMG") and n.endswith("Z")) for n in vmap)
    # vq_config from vqgan.yaml (the published config.json says resolution 256; the yaml 64)
    vq = cfg["vq_config"]
    assert (vq["num_embeddings"], vq["embed_dim"], vq["latent_channels"], vq["base_channels"]) == (64, 32, 32, 32)
    assert vq["channel_multiplier"] == [1, 1, 2, 2, 4] and vq["resolution"] == 64 and vq["double_latent"] is False
    gen = json.loads((converted / "model" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 8710 and gen["pad_token_id"] == 1 and gen["bos_token_id"] == 0
    assert (gen["guidance_scale"], gen["image_top_k"], gen["top_k"], gen["temperature"]) == (4.0, 2000, 10, 1.0)
    proc = json.loads((converted / "processor" / "processor_config.json").read_text())
    assert proc["image_processor"]["target_size"] == TARGET


def test_weights_copied_exactly(converted, inputs):
    index = json.loads((converted / "model" / "model.safetensors.index.json").read_text())
    got = {}
    for fname in set(index["weight_map"].values()):
        with safe_open(str(converted / "model" / fname), framework="pt") as f:
            got.update({k: f.get_tensor(k) for k in f.keys()})
    for k, v in inputs["lm"].items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v.float()), k
    assert tuple(got["model.layers.0.self_attn.q_norm.weight"].shape) == (1, 16)  # grouped layout kept
    for k, v in inputs["vq"].items():
        assert got["model.vqmodel." + k].dtype == torch.float32 and torch.equal(got["model.vqmodel." + k], v), k
    assert not any(".loss." in k or k.startswith("model.vqmodel.loss") for k in got)


def test_logits_match_stock_chameleon(converted, inputs):
    model = LuminaMGPTForConditionalGeneration.from_pretrained(converted / "model").eval()
    assert model.model.vqmodel.missing_weights == ()
    assert_logits_match_stock(model, inputs["ckpt"])


def test_vqgan_matches_reference(converted, inputs):
    model = LuminaMGPTForConditionalGeneration.from_pretrained(converted / "model").eval()
    sd = inputs["vq"]
    x = torch.rand(2, 3, 64, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ref_codes = ref_encode(sd, x)
        token_ids = model.encode_images(x)
        codes = model.model.token_ids_to_codes(token_ids)
        assert tuple(codes.shape) == (2, 4, 2)
        assert torch.equal(codes, ref_codes)
        assert len(ref_codes.unique()) > 1
        # token ids follow the tokenizer's names, not id = code + 4
        vocab = tiny_vocabulary()
        assert all(vocab[lumina_hf.configuration_lumina_mgpt.image_code_token_name(int(c))] == int(t)
                   for c, t in zip(codes.flatten(), token_ids.flatten()))
        ref_pixels = ref_decode(sd, ref_codes)
        pixels = model.model.vqmodel.decode_codes(codes)
        assert tuple(pixels.shape) == (2, 3, 64, 32)
        torch.testing.assert_close(pixels, ref_pixels, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode_image_tokens(token_ids), ref_pixels.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_loads_with_auto_classes_and_pipeline(converted):
    model = transformers.AutoModelForImageTextToText.from_pretrained(converted / "model")
    assert isinstance(model, LuminaMGPTForConditionalGeneration)
    processor = transformers.AutoProcessor.from_pretrained(converted / "processor")
    assert isinstance(processor, lumina_hf.LuminaMGPTProcessor)
    assert processor.image_processor.target_size == TARGET and processor.separator_token_id == 8710
    assert processor.tokenizer.bos_token == "<s>" and processor.tokenizer.pad_token_id == 1

    pipe = LuminaMGPTPipeline.from_pretrained(converted)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.model, LuminaMGPTForConditionalGeneration)
    assert pipe._default("guidance_scale", None) == 4.0 and pipe._default("image_top_k", None) == 2000
    out = pipe("a red circle", height=64, width=64, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (64, 64) and out.images[0].mode == "RGB"
    lat = pipe("a red circle", height=32, width=128, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert tuple(lat.shape) == (1, 2, 8)
    assert bool(((lat >= IMG_LO) & (lat <= IMG_HI)).all())


def test_describe_task_does_not_apply_text_guidance(converted, monkeypatch):
    """generation_config.json holds guidance_scale 4.0 for images; text answers (task "describe") must not
    pick it up as transformers' own classifier-free guidance."""
    import PIL.Image
    import transformers.generation.utils as gen_utils

    class NoTextGuidance:
        def __init__(self, *args, **kwargs):
            raise AssertionError("transformers' classifier-free guidance was applied to text generation")

    monkeypatch.setattr(gen_utils, "UnbatchedClassifierFreeGuidanceLogitsProcessor", NoTextGuidance)
    pipe = LuminaMGPTPipeline.from_pretrained(converted)
    pipe.set_progress_bar_config(disable=True)
    image = PIL.Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    out = pipe(image=image, task="describe", max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert len(out.text) == 1


def test_default_dtype_bf16_keeps_vq_fp32(inputs, tmp_path):
    out = convert_checkpoint(inputs["ckpt"], inputs["vqgan"], tmp_path / "bf16", target_size=TARGET, progress=False)
    files = [f for f in os.listdir(os.path.join(out, "model")) if f.endswith(".safetensors")]
    assert files == ["model.safetensors"]  # one shard under the default 5GB: no index
    with safe_open(os.path.join(out, "model", "model.safetensors"), framework="pt") as f:
        for k, v in inputs["lm"].items():
            t = f.get_tensor(k)
            assert t.dtype == torch.bfloat16 and torch.equal(t, v), k
        for k, v in inputs["vq"].items():
            assert torch.equal(f.get_tensor("model.vqmodel." + k), v), k
    assert json.loads(open(os.path.join(out, "model", "config.json")).read())["dtype"] == "bfloat16"
    model = LuminaMGPTForConditionalGeneration.from_pretrained(os.path.join(out, "model"))
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.model.vqmodel.parameters()} == {torch.float32}


# ------------------------------------------------------------------------------ 2. other inputs
def test_34b_layout_converts(tmp_path):
    """post-norm (swin_norm), GQA and q/k-norm grouped over 2 model-parallel shards; config.json's
    model_parallel_size is wrong on purpose: the weights decide."""
    ckpt = tmp_path / "Lumina-mGPT-34B-512"
    write_published_checkpoint(ckpt, ARCH_34B, seed=5, config_mp=1)
    write_meta_vqgan(tmp_path / "tok", seed=2)
    out = convert_checkpoint(ckpt, tmp_path / "tok", tmp_path / "out", dtype="float32", progress=False)
    cfg = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert cfg["swin_norm"] is True and cfg["num_key_value_heads"] == 2 and cfg["model_parallel_size"] == 2
    proc = json.loads((tmp_path / "out" / "processor" / "processor_config.json").read_text())
    assert proc["image_processor"]["target_size"] == 512  # from the checkpoint's name
    model = LuminaMGPTForConditionalGeneration.from_pretrained(os.path.join(out, "model")).eval()
    assert type(model.model.layers[0]).__name__ == "LuminaMGPTSwinDecoderLayer"
    assert tuple(model.model.layers[0].self_attn.k_norm.weight.shape) == (2, 8)
    # stock transformers needs the config's real head counts only
    assert_logits_match_stock(model, ckpt, seed=1)


def test_meta_text_tokenizer(inputs, tmp_path):
    """Meta's text_tokenizer.json names the placeholder <reserved08707>: it becomes <image> (id 8711)."""
    data = json.loads(build_tiny_tokenizer().backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    vocab["<reserved08707>"] = vocab.pop("<image>")
    for t in data["added_tokens"]:
        if t["content"] == "<image>":
            t["content"] = "<reserved08707>"
    meta_tok = tmp_path / "text_tokenizer.json"
    meta_tok.write_text(json.dumps(data))
    out = convert_checkpoint(inputs["ckpt"], inputs["vqgan"], tmp_path / "out", tokenizer=meta_tok,
                             target_size=TARGET, progress=False)
    proc = transformers.AutoProcessor.from_pretrained(os.path.join(out, "processor"))
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == 8711
    assert proc.image_placeholder_token_id == 8711
    cfg = json.loads(open(os.path.join(out, "model", "config.json")).read())
    assert cfg["vocabulary_map"]["<image>"] == 8711 and cfg["image_placeholder_token_id"] == 8711
    text = "Generate an image of 64x64 according to the following prompt:\na cat"
    assert proc.tokenizer(text)["input_ids"] == build_tiny_tokenizer()(text)["input_ids"]


def test_hub_id_is_downloaded_with_snapshot_download(inputs, tmp_path, monkeypatch):
    """A --checkpoint that is not a local folder goes through `huggingface_hub.snapshot_download` (stubbed
    here: nothing is downloaded); the target size comes from the repo name."""
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        return str(inputs["ckpt"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = convert_checkpoint("Alpha-VLLM/Lumina-mGPT-7B-1024", inputs["vqgan"], tmp_path / "out", revision="main",
                             progress=False)
    assert calls and calls[0][:2] == ("Alpha-VLLM/Lumina-mGPT-7B-1024", "main")
    assert "config.json" in calls[0][2] and "*.safetensors" in calls[0][2]
    proc = json.loads(open(os.path.join(out, "processor", "processor_config.json")).read())
    assert proc["image_processor"]["target_size"] == 1024
    assert huggingface_hub.ModelCard.load(os.path.join(out, "README.md")).data.base_model == "Alpha-VLLM/Lumina-mGPT-7B-1024"

    def failing(*args, **kwargs):
        raise OSError("401 Client Error: gated repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(ValueError, match="could not be downloaded.*gated"):
        convert_checkpoint("Alpha-VLLM/Lumina-mGPT-7B-512", inputs["vqgan"], tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_published_folder_loads_directly(inputs, converted, caplog):
    """The published LM loads straight into our class (model_type chameleon, grouped norms), with a clear
    warning that the VQGAN must come from Meta's files."""
    with caplog.at_level(logging.WARNING, logger="lumina_hf"):
        model = LuminaMGPTForConditionalGeneration.from_pretrained(inputs["ckpt"], dtype=torch.float32).eval()
    assert "no VQGAN weights" in caplog.text and "Meta" in caplog.text and "lumina-hf convert" in caplog.text
    assert model.config.model_type == "lumina_mgpt" and model.config.dropout == 0.05
    assert tuple(model.model.layers[0].self_attn.q_norm.weight.shape) == (1, 16)
    full = LuminaMGPTForConditionalGeneration.from_pretrained(converted / "model").eval()
    ids = random_ids(seed=4)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, full(ids).logits)
    with pytest.raises(ValueError, match="no trained VQGAN"):
        model.decode_image_tokens(torch.full((1, 1, 1), 4))


# ------------------------------------------------------------------------------ 3. CLI, overwrite, atomicity
def test_cli_convert_and_overwrite(inputs, tmp_path, capsys):
    out = tmp_path / "cli-out"
    args = ["convert", "--checkpoint", str(inputs["ckpt"]), "--vqgan", str(inputs["vqgan"]), "--output", str(out),
            "--target-size", "128", "--dtype", "bfloat16", "--max-shard-size", "20MB", "--no-progress"]
    assert cli_main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "processor" / "processor_config.json").read_text())["image_processor"]["target_size"] == 128
    (out / "marker").write_text("old")
    with pytest.raises(SystemExit, match="already exists.*--overwrite"):
        cli_main(args)
    assert (out / "marker").exists()
    assert cli_main(args + ["--overwrite"]) == 0
    assert not (out / "marker").exists() and (out / "model_index.json").exists()
    assert listing(tmp_path) == {"cli-out"}  # no temporary or backup folders left


def test_interrupted_conversion_leaves_nothing(inputs, tmp_path, monkeypatch):
    calls = []
    real = conv_output._write_shard

    def failing(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("disk full (simulated)")
        real(path, tensors)

    monkeypatch.setattr(conv_output, "_write_shard", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        convert_checkpoint(inputs["ckpt"], inputs["vqgan"], tmp_path / "out", target_size=TARGET,
                           max_shard_size="1MB", progress=False)
    assert len(calls) == 2
    assert listing(tmp_path) == set()
    # an existing output (a previous conversion: only those may be overwritten) survives a failed overwrite untouched
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    (tmp_path / "out" / "model_index.json").write_text(json.dumps({"_class_name": "LuminaMGPTPipeline"}))
    calls.clear()
    with pytest.raises(RuntimeError, match="simulated"):
        convert_checkpoint(inputs["ckpt"], inputs["vqgan"], tmp_path / "out", target_size=TARGET,
                           max_shard_size="1MB", overwrite=True, progress=False)
    assert listing(tmp_path) == {"out"} and listing(tmp_path / "out") == {"keep", "model_index.json"}


# ------------------------------------------------------------------------------ 4. bad input
class _NotATensor:
    pass


def _copy_inputs(inputs, root):
    """A private copy of the inputs (symlinked shards) to break."""
    ckpt, vq = root / "Lumina-mGPT-7B-768", root / "tokenizer"
    ckpt.mkdir(parents=True)
    vq.mkdir()
    for src, dst in ((inputs["ckpt"], ckpt), (inputs["vqgan"], vq)):
        for f in os.listdir(src):
            if f.endswith((".safetensors", ".ckpt")):
                os.symlink(src / f, dst / f)
            else:
                shutil.copy(src / f, dst / f)
    return ckpt, vq


def _edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _bad_shape(ckpt):
    name = "model-00002-of-00002.safetensors"
    with safe_open(str(ckpt / name), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    key = "model.layers.1.mlp.down_proj.weight"
    assert key in sd
    sd[key] = sd[key][:, :64].contiguous()
    os.remove(ckpt / name)
    save_file(sd, str(ckpt / name))


def _missing_tensor(ckpt):
    name = "model-00002-of-00002.safetensors"
    with safe_open(str(ckpt / name), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if k != "lm_head.weight"}
    os.remove(ckpt / name)
    save_file(sd, str(ckpt / name))
    _edit_json(ckpt / "model.safetensors.index.json", lambda d: d["weight_map"].pop("lm_head.weight"))


def _vq_ckpt(vq, obj):
    os.remove(vq / "vqgan.ckpt")
    torch.save(obj, vq / "vqgan.ckpt")


BAD_INPUTS = [
    ("no-config", lambda c, v: os.remove(c / "config.json"), r"config\.json not found"),
    ("no-shard", lambda c, v: os.remove(c / "model-00002-of-00002.safetensors"), r"missing from .*model-00002-of-00002"),
    ("llama", lambda c, v: _edit_json(c / "config.json", lambda d: d.update(model_type="llama", architectures=["LlamaForCausalLM"])),
     r"model_type='llama'"),
    ("shape", lambda c, v: _bad_shape(c), r"model\.layers\.1\.mlp\.down_proj\.weight has shape \[64, 64\].*\[64, 128\]"),
    ("missing-tensor", lambda c, v: _missing_tensor(c), r"lacks tensor\(s\) lm_head\.weight"),
    ("heads", lambda c, v: _edit_json(c / "config.json", lambda d: d.update(num_attention_heads=8, num_key_value_heads=8)),
     r"q_norm\.weight has shape \[1, 16\] in model-00001-of-00002\.safetensors, but config\.json implies \[1, 8\]"),
    ("no-yaml", lambda c, v: os.remove(v / "vqgan.yaml"), r"vqgan\.yaml not found"),
    ("no-vq-ckpt", lambda c, v: os.remove(v / "vqgan.ckpt"), r"vqgan\.ckpt not found"),
    ("pickled-object", lambda c, v: _vq_ckpt(v, {"state_dict": tiny_vq_state(), "callback": _NotATensor()}),
     r"weights_only=True.*refused"),
    ("non-tensor-value", lambda c, v: _vq_ckpt(v, {"state_dict": {**tiny_vq_state(), "quantize.step": 3}}),
     r"'quantize\.step' is a int"),
    ("vq-shape", lambda c, v: (v / "vqgan.yaml").write_text(vqgan_yaml_text(dict(TINY_VQ, n_embed=32))),
     r"quantize\.embedding\.weight has shape \[64, 32\].*\[32, 32\]"),
    ("no-tokenizer", lambda c, v: os.remove(c / "tokenizer.json"), r"no tokenizer found"),
    ("wrong-tokenizer", lambda c, v: _edit_json(c / "config.json", lambda d: d["vocabulary_map"].update(IMGIMGAZ=9000)),
     r"IMGIMGAZ at id \d+ but the checkpoint's vocabulary_map says 9000"),
]


@pytest.mark.parametrize("breaker, pattern", [pytest.param(b, p, id=i) for i, b, p in BAD_INPUTS])
def test_bad_input_raises_before_writing(inputs, tmp_path, breaker, pattern):
    ckpt, vq = _copy_inputs(inputs, tmp_path / "in")
    breaker(ckpt, vq)
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    with pytest.raises(ValueError, match=pattern):
        convert_checkpoint(ckpt, vq, out_parent / "out", target_size=TARGET, progress=False)
    assert listing(out_parent) == set()


def test_other_bad_arguments(inputs, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        convert_checkpoint(inputs["ckpt"], inputs["vqgan"], tmp_path / "exists", target_size=TARGET)
    with pytest.raises(ValueError, match="target_size=48"):
        convert_checkpoint(inputs["ckpt"], inputs["vqgan"], tmp_path / "o", target_size=48, progress=False)
    with pytest.raises(ValueError, match="dtype='int8'"):
        convert_checkpoint(inputs["ckpt"], inputs["vqgan"], tmp_path / "o", dtype="int8")
    with pytest.raises(ValueError, match="max_shard_size"):
        convert_checkpoint(inputs["ckpt"], inputs["vqgan"], tmp_path / "o", max_shard_size="lots")
    with pytest.raises(ValueError, match="does not exist"):
        convert_checkpoint(tmp_path / "nowhere", inputs["vqgan"], tmp_path / "o")
    with pytest.raises(ValueError, match="overlaps"):
        convert_checkpoint(inputs["ckpt"], inputs["vqgan"], inputs["ckpt"] / "converted")
    with pytest.raises(SystemExit, match="error: .*vqgan"):
        cli_main(["convert", "--checkpoint", str(inputs["ckpt"]), "--vqgan", str(tmp_path / "none"),
                  "--output", str(tmp_path / "o")])
    assert listing(tmp_path) == {"exists"}
    assert conv.parse_size("5GB") == 5 * 10**9 and conv.parse_size("2MiB") == 2 * 2**20 and conv.parse_size(123) == 123
    assert conv.infer_target_size("Alpha-VLLM/Lumina-mGPT-7B-768-Omni", {}) == 768
    assert conv.infer_target_size("/x/Lumina-mGPT-7B-1024", {}) == 1024


def test_target_size_required_when_not_in_name(inputs, tmp_path):
    ckpt, vq = _copy_inputs(inputs, tmp_path / "in")
    renamed = tmp_path / "in" / "my-checkpoint"
    os.rename(ckpt, renamed)
    _edit_json(renamed / "config.json", lambda d: d.pop("_name_or_path"))
    with pytest.raises(ValueError, match="pass --target-size"):
        convert_checkpoint(renamed, vq, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ kills, stale folders, overwrite
def test_overwrite_refuses_a_folder_that_is_not_a_lumina_output(inputs, tmp_path):
    unrelated = tmp_path / "my-photos"
    unrelated.mkdir()
    (unrelated / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ValueError, match="refusing to overwrite .*my-photos: it is not a lumina_hf pipeline folder"):
        convert_checkpoint(inputs["ckpt"], inputs["vqgan"], unrelated, target_size=128, overwrite=True, progress=False)
    assert (unrelated / "holiday.jpg").read_bytes() == b"precious"


def test_output_has_normal_permissions(inputs, tmp_path):
    out = convert_checkpoint(inputs["ckpt"], inputs["vqgan"], tmp_path / "o", target_size=128, progress=False)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(os.path.join(out, "model", "config.json")).st_mode & 0o777 == 0o666 & ~umask


def test_stale_temp_folders_of_dead_runs_are_removed_and_live_ones_kept(inputs, tmp_path):
    import subprocess

    out = tmp_path / "o"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / ".o.converting-dead"
    stale.mkdir()
    (stale / conv.LOCK_FILE).write_text(dead.stdout)
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / ".o.converting-live"
    live.mkdir()
    (live / conv.LOCK_FILE).write_text(f"{os.getpid()}\n")  # a conversion still running (this process)
    convert_checkpoint(inputs["ckpt"], inputs["vqgan"], out, target_size=128, progress=False)
    assert not stale.exists() and live.exists()
    assert listing(tmp_path) == {"o", ".o.converting-live"}


KILLED_CONVERSION = """
import sys, time
import lumina_hf.conversion.output as conv_output
import lumina_hf.convert_lumina_mgpt as conv
real = conv_output._write_shard
def slow(path, tensors):  # a conversion slow enough to be killed in the middle
    real(path, tensors)
    print("shard written", flush=True)
    time.sleep(60)
conv_output._write_shard = slow
conv.convert_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], target_size=128, progress=False, max_shard_size="20MB")
"""


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_killed_conversion_removes_its_temp_folder(inputs, tmp_path, signame):
    import signal
    import subprocess

    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CONVERSION, str(inputs["ckpt"]), str(inputs["vqgan"]), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "shard written"
        assert any(p.name.startswith(".o.converting-") for p in tmp_path.iterdir())
        proc.send_signal(getattr(signal, signame))
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert listing(tmp_path) == set(), listing(tmp_path)  # no temporary folder, no output
