"""CPU tests for the Lumina-mGPT language model (SPEC.md section 1).

The references are independent of lumina_hf: transformers' stock `ChameleonForConditionalGeneration`
holding the same weights, and losses recomputed here with plain torch ops. Everything runs on the tiny
models of `lumina_hf.testing_utils` (full 65536 vocabulary, hidden 64); nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers.models.chameleon.modeling_chameleon import ChameleonDecoderLayer, ChameleonSwinDecoderLayer
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

import lumina_hf
from lumina_hf import LuminaMGPTConfig, LuminaMGPTForConditionalGeneration, LuminaMGPTModel
from lumina_hf.testing_utils import build_tiny_model, tiny_config, tiny_vocabulary_map

VOCAB = 65536
IMG_LO, IMG_HI = 4, 8195  # image-code token ids, inclusive
NON_IMAGE_IDS = torch.cat([torch.arange(0, IMG_LO), torch.arange(IMG_HI + 1, VOCAB)])


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------- helpers
@torch.no_grad()
def randomize_lm_(model: torch.nn.Module, seed: int = 0, head_scale: float = 1.0) -> torch.nn.Module:
    """Give every language-model parameter random, non-trivial values (the VQGAN is left alone), so
    logits are O(1) and every norm weight/bias matters."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "vqmodel" in name:
            continue
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
        elif name.endswith(("q_norm.bias", "k_norm.bias")):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        elif "norm" in name:  # RMSNorm weights
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        elif p.ndim == 2:  # linear layers: unit-variance outputs
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            if name == "lm_head.weight":
                p.mul_(head_scale)
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def random_ids(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.LongTensor:
    """Token ids mixing BOS, text, image codes and UniRep specials (8197, 8804+n, 8803, 8196, 8710)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    ids[:, 0] = 0
    ids[:, 1] = 8197
    ids[:, 2] = 8804 + 2
    ids[:, 3:7] = torch.randint(IMG_LO, IMG_HI + 1, (batch, 4), generator=g)
    ids[:, 7] = 8803
    ids[:, 8] = 8196
    ids[:, 9] = 8710
    return ids


def stock_chameleon_like(model: LuminaMGPTForConditionalGeneration, expand: str = "repeat_interleave"):
    """A stock `transformers.ChameleonForConditionalGeneration` with the same sizes and the LM weights of
    `model`; grouped q/k-norm weights are expanded to `[num_heads, head_dim]` (SPEC section 1)."""
    c = model.config
    stock_cfg = transformers.ChameleonConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        model_parallel_size=c.model_parallel_size,
        swin_norm=c.swin_norm,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        vocabulary_map=tiny_vocabulary_map(),
        # stock's vqmodel is encoder-only and not used here: keep it small
        vq_config=dict(
            embed_dim=32, num_embeddings=64, latent_channels=32, base_channels=32,
            channel_multiplier=[1, 2], num_res_blocks=1, resolution=32,
        ),
        attn_implementation=c._attn_implementation,
    )
    stock = transformers.ChameleonForConditionalGeneration(stock_cfg).eval()
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.vqmodel."):
            continue  # stock's vqmodel has another (encoder-only) layout
        if k.endswith(("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias")):
            n = heads if ".q_norm." in k else kv
            reps = n // v.shape[0]
            v = v.repeat_interleave(reps, 0) if expand == "repeat_interleave" else v.repeat(reps, 1)
            assert v.shape == (n, c.hidden_size // heads)
        sd[k] = v
    result = stock.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if not k.startswith("model.vqmodel.")] == []
    return stock


ARCHS = [
    pytest.param(dict(), id="7B-like"),
    pytest.param(dict(swin_norm=True), id="swin_norm"),
    pytest.param(dict(num_attention_heads=8, num_key_value_heads=4, model_parallel_size=2), id="gqa-mp2"),
    pytest.param(
        dict(swin_norm=True, num_attention_heads=8, num_key_value_heads=2, model_parallel_size=2),
        id="34B-like-swin-gqa-mp2",
    ),
]


# ------------------------------------------------------------------ 1. equivalence with stock Chameleon
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_stock_chameleon(arch):
    model = randomize_lm_(build_tiny_model(**arch), seed=1)
    c = model.config
    attn = model.model.layers[0].self_attn
    mp = c.model_parallel_size
    # our default is the published grouped layout
    assert c.qk_norm_layout == "grouped"
    assert tuple(attn.q_norm.weight.shape) == (mp, attn.head_dim)
    assert tuple(attn.k_norm.bias.shape) == (mp, attn.head_dim)
    # the model declares its structure: Lumina layers (subclasses of the matching stock layer) with explicit dropout
    stock_layer = ChameleonSwinDecoderLayer if c.swin_norm else ChameleonDecoderLayer
    layer = model.model.layers[0]
    assert isinstance(layer, stock_layer) and type(layer).__name__ == "LuminaMGPT" + stock_layer.__name__[len("Chameleon"):]
    assert isinstance(layer.attn_dropout, torch.nn.Dropout) and "GroupedHeadLayerNorm" in repr(layer.self_attn)

    stock = stock_chameleon_like(model)
    ids = random_ids()
    with torch.no_grad():
        ours = model(ids).logits
        theirs = stock(ids).logits
        theirs_unmasked = stock.lm_head(stock.model(ids).last_hidden_state)

    assert ours.shape == theirs.shape == (2, 16, VOCAB)
    assert ours.dtype == torch.float32
    assert ours.std() > 0.3  # logits are O(1): a 1e-5 tolerance is meaningful
    # every position, every non-image id
    diff = (ours[..., NON_IMAGE_IDS] - theirs[..., NON_IMAGE_IDS]).abs().max().item()
    assert diff <= 1e-5, diff
    # stock masks every image-code logit with the dtype minimum, ours does not
    img = slice(IMG_LO, IMG_HI + 1)
    assert bool((theirs[..., img] == torch.finfo(torch.float32).min).all())
    assert bool(torch.isfinite(ours[..., img]).all())
    assert ours[..., img].abs().max() < 1e3
    # ... and ours are the plain projection of the same hidden states
    assert (ours - theirs_unmasked).abs().max().item() <= 1e-5


def test_stock_comparison_is_sensitive_to_qk_norm_expansion():
    """The grouped q/k-norm must be repeat-*interleaved* (group g serves heads g*r..g*r+r-1): tiling it
    gives other logits, so the equivalence test above really checks the layout."""
    model = randomize_lm_(build_tiny_model(num_attention_heads=8, num_key_value_heads=4, model_parallel_size=2), seed=2)
    ids = random_ids()
    with torch.no_grad():
        ours = model(ids).logits[..., NON_IMAGE_IDS]
        good = stock_chameleon_like(model)(ids).logits[..., NON_IMAGE_IDS]
        tiled = stock_chameleon_like(model, expand="repeat")(ids).logits[..., NON_IMAGE_IDS]
    assert (ours - good).abs().max() <= 1e-5
    assert (ours - tiled).abs().max() > 1e-2


def test_logits_match_stock_with_padding_mask_and_cache():
    """Left-padded batch with attention mask and explicit position ids, then one cached decoding step."""
    model = randomize_lm_(build_tiny_model(), seed=3)
    stock = stock_chameleon_like(model)
    ids = random_ids(seed=5)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 1  # <pad>
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, position_ids=pos, use_cache=True)
        b = stock(ids, attention_mask=mask, position_ids=pos, use_cache=True)
        keep = mask.bool()
        assert (a.logits[keep][:, NON_IMAGE_IDS] - b.logits[keep][:, NON_IMAGE_IDS]).abs().max() <= 1e-5
        nxt = torch.tensor([[8710], [300]])
        mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos2 = pos[:, -1:] + 1
        a2 = model(nxt, attention_mask=mask2, position_ids=pos2, cache=a.cache).logits
        b2 = stock(nxt, attention_mask=mask2, position_ids=pos2, cache=b.cache).logits
        full = model(torch.cat([ids, nxt], 1), attention_mask=mask2, position_ids=torch.cat([pos, pos2], 1)).logits
    assert (a2[..., NON_IMAGE_IDS] - b2[..., NON_IMAGE_IDS]).abs().max() <= 1e-5
    assert (a2[:, -1] - full[:, -1]).abs().max() <= 1e-4


# ------------------------------------------------------------------ 2. grouped vs per-head q/k-norm
def _per_head_twin(grouped: LuminaMGPTForConditionalGeneration) -> LuminaMGPTForConditionalGeneration:
    c = grouped.config
    twin = LuminaMGPTForConditionalGeneration(
        tiny_config(
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            model_parallel_size=c.model_parallel_size,
            swin_norm=c.swin_norm,
            qk_norm_layout="per_head",
        )
    ).eval()
    sd = {}
    for k, v in grouped.state_dict().items():
        if ".q_norm." in k or ".k_norm." in k:
            n = c.num_attention_heads if ".q_norm." in k else c.num_key_value_heads
            v = v.repeat_interleave(n // v.shape[0], 0)
        sd[k] = v
    twin.load_state_dict(sd, strict=True)
    return twin


@pytest.mark.parametrize("swin", [False, True])
def test_grouped_qk_norm_equals_per_head(swin):
    grouped = randomize_lm_(
        build_tiny_model(num_attention_heads=8, num_key_value_heads=4, model_parallel_size=2, swin_norm=swin), seed=4
    )
    twin = _per_head_twin(grouped)
    ga, ta = grouped.model.layers[1].self_attn, twin.model.layers[1].self_attn
    assert tuple(ga.q_norm.weight.shape) == (2, 8) and tuple(ga.k_norm.weight.shape) == (2, 8)
    assert tuple(ta.q_norm.weight.shape) == (8, 8) and tuple(ta.k_norm.weight.shape) == (4, 8)
    # the grouped state dict does not fit the per-head model as is
    with pytest.raises(RuntimeError):
        twin.load_state_dict(grouped.state_dict())

    ids = random_ids(seed=7)
    labels = ids.clone()
    out_g = grouped(ids, labels=labels)
    out_t = twin(ids, labels=labels)
    assert (out_g.logits - out_t.logits).abs().max().item() <= 1e-6
    # training keeps the group tied: the grouped gradient is the sum over the heads of its group
    out_g.loss.backward()
    out_t.loss.backward()
    for name in ("q_norm", "k_norm"):
        for field in ("weight", "bias"):
            g_grad = getattr(getattr(ga, name), field).grad
            t_grad = getattr(getattr(ta, name), field).grad
            assert g_grad.abs().max() > 0
            summed = t_grad.view(2, -1, t_grad.shape[-1]).sum(1)
            torch.testing.assert_close(g_grad, summed, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ 3. losses
def _image_batch(seed: int = 0) -> tuple[torch.LongTensor, torch.LongTensor]:
    """A UniRep-like sequence whose labels are mostly image codes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(IMG_LO, IMG_HI + 1, (2, 14), generator=g)
    ids[:, 0], ids[:, 1], ids[:, 2], ids[:, 3] = 0, 8197, 8805, 8805
    ids[:, -2], ids[:, -1] = 8803, 8196
    labels = ids.clone()
    labels[:, :2] = -100
    return ids, labels


def test_loss_on_image_labels_is_finite_and_trains_image_rows():
    model = randomize_lm_(build_tiny_model(), seed=5)
    ids, labels = _image_batch()
    out = model(ids, labels=labels)
    assert torch.isfinite(out.loss)
    assert 0 < out.loss.item() < 100
    # independent cross-entropy
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ce, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    grad = model.lm_head.weight.grad
    image_targets = labels[:, 1:][(labels[:, 1:] >= IMG_LO) & (labels[:, 1:] <= IMG_HI)].unique()
    assert image_targets.numel() >= 10
    assert bool((grad[image_targets].abs().sum(-1) > 0).all())
    assert model.model.embed_tokens.weight.grad[ids[:, 5]].abs().sum() > 0

    # stock Chameleon masks the image logits: the same labels give inf (or a huge number)
    stock = stock_chameleon_like(model)
    with torch.no_grad():
        stock_loss = stock(ids, labels=labels).loss
    assert not torch.isfinite(stock_loss) or stock_loss.item() > 1e30
    assert abs(stock_loss.item() - out.loss.item()) > 1e20


def test_mask_image_logits_option_reproduces_stock_masking():
    ids, labels = _image_batch(seed=1)
    plain = randomize_lm_(build_tiny_model(), seed=6)
    masked = randomize_lm_(build_tiny_model(mask_image_logits=True), seed=6)
    out_m = masked(ids, labels=labels)
    with torch.no_grad():
        out_p = plain(ids)
    assert not torch.isfinite(out_m.loss) or out_m.loss.item() > 1e30
    assert bool((out_m.logits[..., IMG_LO : IMG_HI + 1] == torch.finfo(torch.float32).min).all())
    assert torch.equal(out_m.logits[..., NON_IMAGE_IDS], out_p.logits[..., NON_IMAGE_IDS])
    # text-only labels still give a normal loss with masking on
    text_labels = torch.full_like(labels, -100)
    text_labels[:, -2:] = labels[:, -2:]  # 8803, 8196
    loss = masked(ids, labels=text_labels).loss
    assert torch.isfinite(loss) and loss.item() < 100


@pytest.mark.parametrize("weight", [0.01, 1e-5])
def test_z_loss_matches_independent_formula(weight):
    ids, labels = _image_batch(seed=2)
    labels[0, 5:9] = -100  # ignored positions must not enter the z-loss mean
    base = randomize_lm_(build_tiny_model(), seed=7, head_scale=3.0)
    zmodel = randomize_lm_(build_tiny_model(z_loss_weight=weight), seed=7, head_scale=3.0)
    out = zmodel(ids, labels=labels)
    with torch.no_grad():
        ce_model = base(ids, labels=labels).loss

    shift_logits = out.logits[:, :-1].double()
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(shift_logits.reshape(-1, VOCAB), shift_labels.reshape(-1), ignore_index=-100)
    keep = shift_labels >= 0
    lse = torch.logsumexp(shift_logits, dim=-1)
    z = (lse[keep] ** 2).mean()
    expected = ce + weight * z
    assert abs(out.loss.item() - expected.item()) <= 1e-5 * max(1.0, expected.item())
    assert abs(ce_model.item() - ce.item()) <= 1e-4
    # the z term is not negligible at weight 0.01, and the label mask matters
    z_all = (lse**2).mean()
    if weight >= 0.01:
        assert out.loss.item() - ce.item() > 1.0
        assert abs((ce + weight * z_all).item() - out.loss.item()) > 1e-3
    out.loss.backward()
    assert torch.isfinite(zmodel.lm_head.weight.grad).all()


# ------------------------------------------------------------------ 4. residual dropout
def test_residual_dropout_train_vs_eval():
    ids = random_ids(seed=8)
    model = randomize_lm_(build_tiny_model(dropout=0.3), seed=8)
    reference = randomize_lm_(build_tiny_model(dropout=0.0), seed=8)
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        a = model(ids).logits
        b = model(ids).logits
        assert (a - b).abs().max() > 1e-3
        model.eval()
        c = model(ids).logits
        d = model(ids).logits
        assert torch.equal(c, d)
        # in eval the dropout model is exactly the dropout-free one
        assert torch.equal(c, reference(ids).logits)
        reference.train()
        e = reference(ids).logits
        f = reference(ids).logits
        assert torch.equal(e, f)
        assert (e - c).abs().max() <= 1e-5


@pytest.mark.parametrize("swin", [False, True])
def test_residual_dropout_sits_on_attention_and_mlp_outputs(swin):
    """With p=1 both sub-layer outputs are zeroed before their residual adds, so every decoder layer is
    the identity and the logits are lm_head(norm(embed(ids)))."""
    model = randomize_lm_(build_tiny_model(dropout=1.0, swin_norm=swin), seed=9).train()
    ids = random_ids(seed=9)
    with torch.no_grad():
        out = model(ids).logits
        expected = model.lm_head(model.model.norm(model.model.embed_tokens(ids)))
        assert (out - expected).abs().max() <= 1e-5
        model.eval()
        assert (model(ids).logits - expected).abs().max() > 1e-2


# ------------------------------------------------------------------ 7. save / load
def _assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    model = randomize_lm_(build_tiny_model(), seed=10)
    with torch.no_grad():  # the VQGAN too, so a re-initialisation on load would show
        g = torch.Generator().manual_seed(10)
        for p in model.model.vqmodel.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    single = tmp_path_factory.mktemp("single")
    sharded = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="1MB")
    return model, single, sharded


def test_save_writes_lumina_config_and_shards(saved_models):
    _, single, sharded = saved_models
    cfg = json.loads((single / "config.json").read_text())
    assert cfg["model_type"] == "lumina_mgpt"
    assert cfg["architectures"] == ["LuminaMGPTForConditionalGeneration"]
    assert cfg["vq_config"]["model_type"] == "lumina_mgpt_vqgan"
    assert (single / "model.safetensors").exists()
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert "model.vqmodel.decoder.conv_out.weight" in index["weight_map"]
    assert "lm_head.weight" in index["weight_map"]


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize(
    "auto_cls",
    [transformers.AutoModelForImageTextToText, transformers.AutoModelForCausalLM, LuminaMGPTForConditionalGeneration],
)
def test_round_trip_auto_classes(saved_models, layout, auto_cls):
    model, single, sharded = saved_models
    folder = single if layout == "single" else sharded
    loaded = auto_cls.from_pretrained(folder)
    assert type(loaded) is LuminaMGPTForConditionalGeneration
    assert not loaded.training
    _assert_same_state(model.state_dict(), loaded.state_dict())
    assert loaded.model.vqmodel.missing_weights == ()
    assert torch.equal(loaded.model.image_code_to_id, model.model.image_code_to_id)
    ids = random_ids(seed=11)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_round_trip_auto_model_and_config(saved_models):
    model, single, sharded = saved_models
    config = transformers.AutoConfig.from_pretrained(single)
    assert type(config) is LuminaMGPTConfig
    assert config.vocabulary_map == model.config.vocabulary_map
    assert config.vq_config.to_dict() == model.config.vq_config.to_dict()
    for folder in (single, sharded):
        base = transformers.AutoModel.from_pretrained(folder)
        assert type(base) is LuminaMGPTModel
        _assert_same_state(model.model.state_dict(), base.state_dict())
        assert base.vqmodel.missing_weights == ()


def test_load_bfloat16_keeps_vqgan_fp32(saved_models):
    model, _, sharded = saved_models
    loaded = transformers.AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.bfloat16)
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        if k.startswith("model.vqmodel."):
            assert v.dtype == torch.float32, k
            assert torch.equal(v, ref[k]), k
        elif v.is_floating_point():
            assert v.dtype == torch.bfloat16, k
            assert torch.equal(v, ref[k].to(torch.bfloat16)), k
    with torch.no_grad():
        logits = loaded(random_ids(seed=12)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_load_with_device_map_cpu(saved_models):
    model, single, _ = saved_models
    loaded = LuminaMGPTForConditionalGeneration.from_pretrained(single, device_map="cpu")
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    _assert_same_state(model.state_dict(), loaded.state_dict())
    ids = random_ids(seed=13)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


# ------------------------------------------------------------------ 8. the published config.json
def published_style_config(**sizes) -> dict:
    """A dict shaped like Alpha-VLLM/Lumina-mGPT-7B-*/config.json (sizes shrunk unless given)."""
    d = {
        "_name_or_path": "Alpha-VLLM/Lumina-mGPT-7B-768",
        "architectures": ["ChameleonXLLMXForConditionalGeneration"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "dropout": 0.05,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "mask_image_logits": False,
        "max_position_embeddings": 10240,
        "mlp_bias": False,
        "model_parallel_size": 1,
        "model_type": "chameleon",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "pad_token_id": None,
        "qk_layernorm": True,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "swin_norm": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.44.0",
        "use_cache": True,
        "vocab_size": 65536,
        "vocabulary_map": tiny_vocabulary_map(),
        "vq_config": {
            "embed_dim": 256,
            "n_embed": 8192,
            "double_z": False,
            "z_channels": 256,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 128,
            "ch_mult": [1, 1, 2, 2, 4],
            "num_res_blocks": 2,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "z_loss_weight": 1e-05,
    }
    d.update(sizes)
    return d


def _check_published_fields(cfg: LuminaMGPTConfig) -> None:
    assert isinstance(cfg, LuminaMGPTConfig)
    assert cfg.model_type == "lumina_mgpt"
    assert cfg.architectures == ["LuminaMGPTForConditionalGeneration"]
    assert cfg.dropout == 0.05
    assert cfg.mask_image_logits is False
    assert cfg.z_loss_weight == 1e-5
    assert cfg.hidden_size == 64 and cfg.num_hidden_layers == 2 and cfg.vocab_size == VOCAB
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    vq = cfg.vq_config
    assert isinstance(vq, lumina_hf.LuminaMGPTVQConfig)
    assert vq.embed_dim == 256
    assert vq.num_embeddings == 8192
    assert vq.double_latent is False
    assert vq.latent_channels == 256
    assert vq.resolution == 256
    assert vq.in_channels == 3 and vq.out_channels == 3
    assert vq.base_channels == 128
    assert list(vq.channel_multiplier) == [1, 1, 2, 2, 4]
    assert vq.num_res_blocks == 2
    assert list(vq.attn_resolutions) == []
    assert vq.dropout == 0.0
    assert vq.downsample_factor == 16
    assert cfg.vocabulary_map == tiny_vocabulary_map()
    table = cfg.image_code_to_token_id()
    assert len(table) == 8192 and table[0] == 4 and sorted(table) == list(range(4, 8196))


def test_published_config_from_dict():
    _check_published_fields(LuminaMGPTConfig.from_dict(published_style_config()))


def test_published_config_from_pretrained_and_resave(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(published_style_config()))
    cfg = LuminaMGPTConfig.from_pretrained(tmp_path)
    _check_published_fields(cfg)
    out = tmp_path / "resaved"
    cfg.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "lumina_mgpt"
    assert saved["vq_config"]["num_embeddings"] == 8192 and "n_embed" not in saved["vq_config"]
    _check_published_fields(LuminaMGPTConfig.from_pretrained(out))


def test_published_layout_checkpoint_loads(tmp_path):
    """A folder with a published-style config.json and grouped `[mp, head_dim]` q/k-norm weights (and no
    VQGAN) loads into our model, with a VQGAN built from the taming-style vq_config."""
    vq_tiny = {"embed_dim": 32, "n_embed": 64, "double_z": False, "z_channels": 32, "resolution": 64,
               "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 1,
               "attn_resolutions": [], "dropout": 0.0}
    (tmp_path / "config.json").write_text(json.dumps(published_style_config(vq_config=vq_tiny)))
    donor = randomize_lm_(build_tiny_model(), seed=14)
    sd = {k: v.contiguous() for k, v in donor.state_dict().items() if not k.startswith("model.vqmodel.")}
    assert tuple(sd["model.layers.0.self_attn.q_norm.weight"].shape) == (1, 16)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    # the published config says torch_dtype bfloat16: honoured for the LM, the VQGAN stays fp32
    model = LuminaMGPTForConditionalGeneration.from_pretrained(tmp_path)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.vqmodel.decoder.conv_out.weight.dtype == torch.float32
    model = LuminaMGPTForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.dropout == 0.05
    assert tuple(model.model.vqmodel.quantize.embedding.weight.shape) == (64, 32)
    assert "decoder.conv_out.weight" in model.model.vqmodel.missing_weights
    ids = random_ids(seed=14)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, donor(ids).logits)


# ------------------------------------------------------------------ 9. bad input
@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (dict(image_start_token_id=100), r"image_start_token_id=100 falls inside the image-code id range"),
        (dict(image_end_token_id=4), r"image_end_token_id=4 falls inside the image-code id range"),
        (dict(image_row_end_token_id=8195), r"image_row_end_token_id=8195 falls inside"),
        (dict(image_end_token_id=8197), r"image_end_token_id and image_start_token_id are both 8197"),
        (dict(separator_token_id=8803), r"both 8803"),
        (dict(size_token_base_id=100), r"size tokens 101\.\.228"),
        (dict(size_token_base_id=8700), r"collides with the size tokens"),
        (dict(max_size_units=60000), r"size tokens .* inside the vocabulary"),
        (dict(image_start_token_id=70000), r"image_start_token_id=70000 is outside the vocabulary"),
        (dict(image_code_id_start=9000, image_code_id_end=100), r"image_code_id_start\.\.image_code_id_end"),
        (dict(qk_norm_layout="stacked"), r"qk_norm_layout"),
        (dict(model_parallel_size=3), r"model_parallel_size=3 must divide"),
        (dict(patch_size=24), r"patch_size=24"),
    ],
)
def test_inconsistent_unirep_config_raises(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny_config(**overrides)


def test_vocabulary_map_must_cover_the_codebook():
    vmap = tiny_vocabulary_map()
    del vmap["IMGIMGDZ"]  # code 3
    cfg = tiny_config(vocabulary_map=vmap)
    with pytest.raises(ValueError, match=r"no token for image codes \[3\]"):
        cfg.image_code_to_token_id()
    with pytest.raises(ValueError, match="no token for image codes"):
        LuminaMGPTForConditionalGeneration(cfg)
    vmap = tiny_vocabulary_map()
    vmap["IMGIMGDZ"] = 9000  # outside 4..8195
    with pytest.raises(ValueError, match="outside image_code_id_start"):
        tiny_config(vocabulary_map=vmap).image_code_to_token_id()


def _save_without_vqgan(model, folder) -> None:
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("model.vqmodel.")}
    save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)


def test_checkpoint_without_vqgan_loads_lm_but_refuses_images(tmp_path):
    model = randomize_lm_(build_tiny_model(), seed=15)
    _save_without_vqgan(model, tmp_path / "novq")
    loaded = LuminaMGPTForConditionalGeneration.from_pretrained(tmp_path / "novq")
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        if not k.startswith("model.vqmodel."):
            assert torch.equal(v, ref[k]), k
    missing = loaded.model.vqmodel.missing_weights
    assert "quantize.embedding.weight" in missing and "decoder.conv_out.weight" in missing
    ids = random_ids(seed=15)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    tokens = loaded.model.image_code_to_id[torch.arange(6)].view(1, 2, 3)
    with pytest.raises(ValueError, match="no trained VQGAN"):
        loaded.decode_image_tokens(tokens)
    with pytest.raises(ValueError, match="no trained VQGAN"):
        loaded.decode_image_tokens(tokens.flatten(1), height=32, width=48)
    with pytest.raises(ValueError, match="no trained VQGAN"):
        loaded.encode_images(torch.zeros(1, 3, 32, 32))

    # in bf16 the LM is cast but the (missing, to be filled later) VQGAN stays fp32, so VQ weights
    # loaded afterwards (as the converter does) keep every bit
    half = LuminaMGPTForConditionalGeneration.from_pretrained(tmp_path / "novq", dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in half.model.vqmodel.parameters()} == {torch.float32}
    vq_state = model.model.vqmodel.state_dict()
    half.model.vqmodel.load_state_dict(vq_state)
    _assert_same_state(vq_state, half.model.vqmodel.state_dict())

    # re-saving does not write the random VQGAN, so the reloaded model still refuses
    loaded.save_pretrained(tmp_path / "resaved")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    assert again.model.vqmodel.missing_weights == missing
    with pytest.raises(ValueError, match="no trained VQGAN"):
        again.decode_image_tokens(tokens)


def test_checkpoint_without_vqgan_via_auto_model(tmp_path):
    """The bare `AutoModel` (LuminaMGPTModel) also knows its VQGAN is missing."""
    model = randomize_lm_(build_tiny_model(), seed=16)
    _save_without_vqgan(model, tmp_path)
    base = transformers.AutoModel.from_pretrained(tmp_path)
    assert type(base) is LuminaMGPTModel
    assert "decoder.conv_in.weight" in base.vqmodel.missing_weights
    with pytest.raises(ValueError, match="no trained VQGAN"):
        base.vqmodel.decode_codes(torch.zeros(1, 2, 2, dtype=torch.long))
    model2, info = LuminaMGPTModel.from_pretrained(tmp_path, output_loading_info=True)
    assert "vqmodel.decoder.conv_in.weight" in info["missing_keys"]


# ------------------------------------------------------------------ configs and checkpoints that do not match
@pytest.mark.parametrize(
    "field,value,error",
    [("vocab_size", None, "vocab_size"), ("rope_theta", "1e4", "rope_theta"), ("num_hidden_layers", "2", "num_hidden_layers")],
)
def test_config_field_of_the_wrong_type_is_refused(tmp_path, field, value, error):
    from huggingface_hub.errors import StrictDataclassError

    model = build_tiny_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    config.pop("rope_parameters", None) if field == "rope_theta" else None
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, StrictDataclassError), match=error):
        LuminaMGPTForConditionalGeneration.from_pretrained(tmp_path)


def test_config_with_fewer_layers_than_the_weights_is_refused(tmp_path):
    build_tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 1  # the weights have 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no place in the model \(e\.g\. model\.layers\.1\.") as info:
        LuminaMGPTForConditionalGeneration.from_pretrained(tmp_path)
    assert "config.json does not describe these weights" in str(info.value)
    config["num_hidden_layers"] = 3  # more layers than the weights
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"not in the checkpoint \(e\.g\. model\.layers\.2\."):
        LuminaMGPTForConditionalGeneration.from_pretrained(tmp_path)
