"""CPU tests for the Chameleon VQGAN (SPEC.md section 2) and the model-level image helpers.

The reference is a plain functional VQGAN written here from the spec (taming-transformers `VQModel`
layout: encoder, |z|^2 + |e|^2 - 2 z.e quantizer, decoder with num_res_blocks + 1 blocks per level,
nearest x2 upsampling, GroupNorm(32, eps 1e-6) + swish + conv_out, no tanh). It reads the state dict
by the taming key names only, so any renaming or reordering in lumina_hf shows up as a failure.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lumina_hf import LuminaMGPTVQConfig, LuminaMGPTVQGAN
from lumina_hf.unirep import image_code_token_name
from lumina_hf.testing_utils import build_tiny_model, tiny_vocabulary

TINY_VQ = dict(
    embed_dim=32,
    num_embeddings=64,
    latent_channels=32,
    base_channels=32,
    channel_multiplier=[1, 1, 2, 2, 4],
    num_res_blocks=1,
    attn_resolutions=[],
    resolution=64,
)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ reference VQGAN (taming layout)
def _gn(x, sd, p):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(x, sd, p, stride=1):
    w = sd[p + ".weight"]
    return F.conv2d(x, w, sd[p + ".bias"], stride=stride, padding=0 if stride == 2 else w.shape[-1] // 2)


def _swish(x):
    return x * torch.sigmoid(x)


def _resblock(x, sd, p):
    h = _conv(_swish(_gn(x, sd, p + ".norm1")), sd, p + ".conv1")
    h = _conv(_swish(_gn(h, sd, p + ".norm2")), sd, p + ".conv2")  # dropout 0
    if p + ".nin_shortcut.weight" in sd:
        x = _conv(x, sd, p + ".nin_shortcut")
    return x + h


def _attnblock(x, sd, p):
    h = _gn(x, sd, p + ".norm")
    q, k, v = (_conv(h, sd, f"{p}.{n}") for n in ("q", "k", "v"))
    b, c, hh, ww = q.shape
    q, k, v = (t.reshape(b, c, hh * ww) for t in (q, k, v))
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c**-0.5, dim=-1)  # i attends to j
    out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, hh, ww)
    return x + _conv(out, sd, p + ".proj_out")


def _mid(h, sd, p):
    h = _resblock(h, sd, p + ".mid.block_1")
    h = _attnblock(h, sd, p + ".mid.attn_1")
    return _resblock(h, sd, p + ".mid.block_2")


def ref_encode(sd: dict, cfg, pixels: torch.Tensor) -> torch.LongTensor:
    levels, nrb = len(cfg.channel_multiplier), cfg.num_res_blocks
    h = _conv(pixels, sd, "encoder.conv_in")
    for i in range(levels):
        for j in range(nrb):
            h = _resblock(h, sd, f"encoder.down.{i}.block.{j}")
            if f"encoder.down.{i}.attn.{j}.norm.weight" in sd:
                h = _attnblock(h, sd, f"encoder.down.{i}.attn.{j}")
        if i != levels - 1:  # zero-pad right/bottom, 3x3 stride-2 conv
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{i}.downsample.conv", stride=2)
    h = _mid(h, sd, "encoder")
    h = _conv(_swish(_gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out")
    z = _conv(h, sd, "quant_conv")
    b, c, hh, ww = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # raster order
    e = sd["quantize.embedding.weight"]
    dist = (flat**2).sum(1, keepdim=True) + (e**2).sum(1)[None] - 2 * flat @ e.t()
    return dist.argmin(1).view(b, hh, ww)


def ref_decode(sd: dict, cfg, codes: torch.LongTensor) -> torch.Tensor:
    levels, nrb = len(cfg.channel_multiplier), cfg.num_res_blocks
    z = sd["quantize.embedding.weight"][codes].permute(0, 3, 1, 2)
    h = _conv(_conv(z, sd, "post_quant_conv"), sd, "decoder.conv_in")
    h = _mid(h, sd, "decoder")
    for i in reversed(range(levels)):  # coarsest first; up[i] is level i
        for j in range(nrb + 1):
            h = _resblock(h, sd, f"decoder.up.{i}.block.{j}")
            if f"decoder.up.{i}.attn.{j}.norm.weight" in sd:
                h = _attnblock(h, sd, f"decoder.up.{i}.attn.{j}")
        if i != 0:
            h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest x2
            h = _conv(h, sd, f"decoder.up.{i}.upsample.conv")
    return _conv(_swish(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")  # no tanh


def taming_vq_shapes(ch, ch_mult, num_res_blocks, z_channels, embed_dim, n_embed, resolution,
                     in_channels=3, out_ch=3, attn_resolutions=(), double_z=False) -> dict[str, tuple]:
    """Every tensor name and shape of a taming-transformers `VQModel` (Chameleon's `vqgan.ckpt` layout)."""
    shapes: dict[str, tuple] = {}

    def conv(p, cin, cout, k):
        shapes[p + ".weight"] = (cout, cin, k, k)
        shapes[p + ".bias"] = (cout,)

    def norm(p, c):
        shapes[p + ".weight"] = (c,)
        shapes[p + ".bias"] = (c,)

    def res(p, cin, cout):
        norm(p + ".norm1", cin)
        conv(p + ".conv1", cin, cout, 3)
        norm(p + ".norm2", cout)
        conv(p + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(p + ".nin_shortcut", cin, cout, 1)

    def attn(p, c):
        norm(p + ".norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{p}.{n}", c, c, 1)

    def mid(p, c):
        res(p + ".mid.block_1", c, c)
        attn(p + ".mid.attn_1", c)
        res(p + ".mid.block_2", c, c)

    levels = len(ch_mult)
    in_mult = (1,) + tuple(ch_mult)
    conv("encoder.conv_in", in_channels, ch, 3)
    curr = resolution
    for i in range(levels):
        block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
        for j in range(num_res_blocks):
            res(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if curr in attn_resolutions:
                attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
            curr //= 2
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, 2 * z_channels if double_z else z_channels, 3)
    conv("quant_conv", z_channels, embed_dim, 1)
    shapes["quantize.embedding.weight"] = (n_embed, embed_dim)
    conv("post_quant_conv", embed_dim, z_channels, 1)
    block_in = ch * ch_mult[-1]
    curr = resolution // 2 ** (levels - 1)
    conv("decoder.conv_in", z_channels, block_in, 3)
    mid("decoder", block_in)
    for i in reversed(range(levels)):
        block_out = ch * ch_mult[i]
        for j in range(num_res_blocks + 1):
            res(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if curr in attn_resolutions:
                attn(f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
            curr *= 2
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, out_ch, 3)
    return shapes


@torch.no_grad()
def randomize_vq_(vq: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, norms and biases included."""
    g = torch.Generator().manual_seed(seed)
    for name, p in vq.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        elif name == "quantize.embedding.weight":
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            fan_in = math.prod(p.shape[1:])
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return vq


def random_pixels(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish content plus noise, in [-1, 1]
    base = F.interpolate(torch.rand(b, 3, h // 8, w // 8, generator=g), size=(h, w), mode="bilinear")
    return (base * 2 - 1 + 0.2 * torch.randn(b, 3, h, w, generator=g)).clamp(-1, 1)


def tiny_vq(seed: int = 0, **overrides) -> LuminaMGPTVQGAN:
    torch.manual_seed(seed)
    return randomize_vq_(LuminaMGPTVQGAN(LuminaMGPTVQConfig(**{**TINY_VQ, **overrides})).eval(), seed)


# ------------------------------------------------------------------ 5. layout
def _shapes(module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_published_vqgan_layout_matches_taming_names():
    """Meta's VQGAN config (vqgan.yaml): every tensor name and shape of the taming checkpoint, no more."""
    cfg = LuminaMGPTVQConfig(
        embed_dim=256, n_embed=8192, double_z=False, z_channels=256, resolution=256, in_channels=3,
        out_ch=3, ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0,
    )
    with torch.device("meta"):
        vq = LuminaMGPTVQGAN(cfg)
    expected = taming_vq_shapes(128, [1, 1, 2, 2, 4], 2, 256, 256, 8192, 256)
    assert _shapes(vq) == expected
    names = set(expected)
    # the decoder has num_res_blocks + 1 = 3 blocks per level; up[i] is level i, level 0 has no upsample
    assert "decoder.up.0.block.2.conv1.weight" in names and "decoder.up.0.block.3.conv1.weight" not in names
    assert "decoder.up.4.upsample.conv.weight" in names
    assert not any(n.startswith("decoder.up.0.upsample") for n in names)
    assert expected["decoder.up.4.block.0.conv1.weight"] == (512, 512, 3, 3)  # coarsest level, ch * 4
    assert expected["decoder.up.0.block.0.conv1.weight"] == (128, 128, 3, 3)
    assert expected["decoder.up.1.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert expected["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert not any(".attn.0." in n for n in names)  # attention only in the middle blocks
    assert vq.downsample_factor == 16


@pytest.mark.parametrize("attn_resolutions", [[], [8, 32]])
def test_tiny_vqgan_layout_matches_taming_names(attn_resolutions):
    vq = LuminaMGPTVQGAN(LuminaMGPTVQConfig(**{**TINY_VQ, "attn_resolutions": attn_resolutions}))
    expected = taming_vq_shapes(32, [1, 1, 2, 2, 4], 1, 32, 32, 64, 64, attn_resolutions=attn_resolutions)
    assert _shapes(vq) == expected
    if attn_resolutions:
        assert "decoder.up.3.attn.1.q.weight" in expected  # level 3 is at resolution 8 in the decoder
        assert "encoder.down.3.attn.0.q.weight" in expected
        assert "encoder.down.1.attn.0.q.weight" in expected  # 32 in the encoder
    # a taming-keyed state dict loads strictly
    sd = {k: torch.randn(s) for k, s in expected.items()}
    vq.load_state_dict(sd, strict=True)
    assert torch.equal(vq.decoder.up[0].block[1].conv2.weight, sd["decoder.up.0.block.1.conv2.weight"])


# ------------------------------------------------------------------ 5. numerics against the reference
@pytest.mark.parametrize("attn_resolutions", [[], [8]])
def test_encode_decode_match_reference(attn_resolutions):
    vq = tiny_vq(seed=1, attn_resolutions=attn_resolutions)
    sd = {k: v.clone() for k, v in vq.state_dict().items()}
    pixels = random_pixels(2, 64, 96, seed=1)  # H=64, W=96
    codes = vq.encode_to_codes(pixels)
    assert codes.shape == (2, 4, 6) and codes.dtype == torch.long
    with torch.no_grad():
        ref_codes = ref_encode(sd, vq.config, pixels)
    assert torch.equal(codes, ref_codes)
    assert codes.unique().numel() >= 4  # the test is not trivially one code
    assert codes.min() >= 0 and codes.max() < 64

    decoded = vq.decode_codes(codes)
    assert decoded.shape == (2, 3, 64, 96) and decoded.dtype == torch.float32
    with torch.no_grad():
        ref_pixels = ref_decode(sd, vq.config, codes)
    assert ref_pixels.abs().max() > 0.5  # non-trivial output
    assert (decoded - ref_pixels).abs().max().item() <= 1e-5
    assert decoded.abs().max() > 1.0  # decode_codes itself is not clamped (no tanh either)


def test_vqgan_is_fully_convolutional():
    vq = tiny_vq(seed=2)
    sd = vq.state_dict()
    pixels = random_pixels(1, 48, 80, seed=2)
    codes = vq.encode_to_codes(pixels)
    assert codes.shape == (1, 3, 5)
    with torch.no_grad():
        assert torch.equal(codes, ref_encode(sd, vq.config, pixels))
        ref = ref_decode(sd, vq.config, codes)
    out = vq.decode_codes(codes)
    assert out.shape == (1, 3, 48, 80)
    assert (out - ref).abs().max().item() <= 1e-5
    # batch items are independent: encoding one image alone gives its codes from the batch
    pair = torch.cat([pixels, random_pixels(1, 48, 80, seed=3)])
    assert torch.equal(vq.encode_to_codes(pair)[:1], codes)


def test_quantizer_picks_the_nearest_codebook_entry():
    vq = tiny_vq(seed=4)
    e = vq.quantize.embedding.weight.detach()
    # latents equal to codebook entries plus small noise must map back to those entries
    g = torch.Generator().manual_seed(4)
    want = torch.randint(0, 64, (1, 3, 5), generator=g)
    z = e[want].permute(0, 3, 1, 2) + 0.01 * torch.randn(1, 32, 3, 5, generator=g)
    with torch.no_grad():
        _, _, idx = vq.quantize(z)
    assert torch.equal(idx.view(1, 3, 5), want)
    with torch.no_grad():
        expected = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 32), e).argmin(1)
    assert torch.equal(idx, expected)


def test_pixel_sizes_not_divisible_by_16_raise():
    vq = tiny_vq(seed=5)
    with pytest.raises(ValueError, match="not divisible by the VQGAN factor 16"):
        vq.encode_to_codes(torch.zeros(1, 3, 64, 72))
    with pytest.raises(ValueError, match="not divisible"):
        vq.encode_to_codes(torch.zeros(1, 3, 40, 64))
    with pytest.raises(ValueError, match=r"shape \(batch, 3, height, width\)"):
        vq.encode_to_codes(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="codes must lie in 0..63"):
        vq.decode_codes(torch.full((1, 2, 2), 64))
    with pytest.raises(ValueError, match=r"codes must have shape \(batch, rows, cols\)"):
        vq.decode_codes(torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------ 6. model-level helpers
@pytest.fixture(scope="module")
def model():
    m = build_tiny_model(seed=6)
    randomize_vq_(m.model.vqmodel, seed=6)
    return m


def _code_to_id(code: int) -> int:
    return tiny_vocabulary()[image_code_token_name(code)]


def test_encode_images_returns_vocabulary_ids(model):
    pixels = random_pixels(2, 64, 96, seed=7)
    ids = model.encode_images(pixels)
    assert ids.shape == (2, 4, 6)
    codes = ref_encode(model.model.vqmodel.state_dict(), model.model.vqmodel.config, pixels)
    expected = codes.clone().apply_(_code_to_id)
    assert torch.equal(ids, expected)
    assert bool(((ids >= 4) & (ids <= 8195)).all())
    # the tiny vocabulary orders image tokens by name: code + 4 would be wrong
    assert not torch.equal(ids, codes + 4)
    assert _code_to_id(10) != 14 and _code_to_id(1) != 5
    assert torch.equal(model.get_image_tokens(pixels), expected.flatten(1))


def test_decode_image_tokens_grid_and_flat(model):
    g = torch.Generator().manual_seed(8)
    codes = torch.randint(0, 64, (2, 4, 6), generator=g)
    ids = codes.clone().apply_(_code_to_id)
    vq = model.model.vqmodel
    with torch.no_grad():
        ref = ref_decode(vq.state_dict(), vq.config, codes).clamp(-1, 1)
    grid = model.decode_image_tokens(ids)
    assert grid.shape == (2, 3, 64, 96) and grid.dtype == torch.float32
    assert (grid - ref).abs().max().item() <= 1e-5
    assert grid.min() >= -1 and grid.max() <= 1
    assert (grid.abs() == 1).any()  # the clamp is active on these random weights
    flat = model.decode_image_tokens(ids.flatten(1), height=64, width=96)
    assert torch.equal(flat, grid)
    # round trip through ids: encode(decode) is a fixed point of the helpers' id mapping
    assert torch.equal(model.model.token_ids_to_codes(ids), codes)
    assert torch.equal(model.model.codes_to_token_ids(codes), ids)


def test_decode_image_tokens_bad_input(model):
    ids = model.model.codes_to_token_ids(torch.zeros(1, 24, dtype=torch.long))
    with pytest.raises(ValueError, match="need height and width"):
        model.decode_image_tokens(ids)
    with pytest.raises(ValueError, match="do not make a 80x64 image"):
        model.decode_image_tokens(ids, height=64, width=80)
    with pytest.raises(ValueError, match="multiples of 16"):
        model.decode_image_tokens(ids, height=60, width=96)
    bad = ids.clone()
    bad[0, 3] = 8803  # a row-end token left in
    with pytest.raises(ValueError, match=r"token ids \[8803\] are not image-code tokens"):
        model.decode_image_tokens(bad, height=64, width=96)
    # an image-code token id whose code is outside the tiny 64-entry codebook
    with pytest.raises(ValueError, match="not image-code tokens"):
        model.decode_image_tokens(torch.full((1, 1, 1), _code_to_id(100)))
    with pytest.raises(ValueError, match="not divisible by the VQGAN factor 16"):
        model.encode_images(torch.zeros(1, 3, 64, 70))


def test_vqgan_stays_fp32_when_model_is_cast():
    m = build_tiny_model(seed=9)
    randomize_vq_(m.model.vqmodel, seed=9)
    before = {k: v.clone() for k, v in m.model.vqmodel.state_dict().items()}
    pixels = random_pixels(1, 32, 48, seed=9)
    ids_before = m.encode_images(pixels)
    out_before = m.decode_image_tokens(ids_before)

    m.to(torch.bfloat16)
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    assert m.model.layers[0].self_attn.q_norm.weight.dtype == torch.bfloat16
    after = m.model.vqmodel.state_dict()
    assert sorted(after) == sorted(before)
    for k, v in after.items():
        assert v.dtype == torch.float32, k
        assert torch.equal(v, before[k]), k
    assert m.model.image_code_to_id.dtype == torch.long
    # images still encode/decode identically, and the bf16 LM runs
    assert torch.equal(m.encode_images(pixels), ids_before)
    assert torch.equal(m.decode_image_tokens(ids_before), out_before)
    with torch.no_grad():
        assert m(torch.tensor([[0, 8197, 8805]])).logits.dtype == torch.bfloat16

    m.half()
    assert m.lm_head.weight.dtype == torch.float16
    assert all(torch.equal(v, before[k]) and v.dtype == torch.float32 for k, v in m.model.vqmodel.state_dict().items())
    m.float()
    assert m.lm_head.weight.dtype == torch.float32
