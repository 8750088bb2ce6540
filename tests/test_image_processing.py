"""CPU tests for the Lumina-mGPT image processor (SPEC.md sections 2 and 3).

The `ref_*` functions below are an independent implementation written from the SPEC text only (they do
not import any helper of `lumina_hf.image_processing_lumina_mgpt`); the processor is compared with them
exactly (`torch.equal`). They use PIL for the resizes, on the image in its own mode, because the SPEC
defines the reference preprocessing in terms of Pillow's behaviour; the alpha blend and the [-1, 1]
scaling are done in torch float64 (the reference does them in numpy float64: same IEEE operations).
"""

from __future__ import annotations

import contextlib
import io
import random
from functools import lru_cache

import numpy as np
import PIL.Image
import pytest
import torch

import lumina_hf
from lumina_hf import LuminaMGPTImageProcessor
from lumina_hf.image_processing_lumina_mgpt import select_bucket as lib_select_bucket

PATCH = 32
BICUBIC = PIL.Image.Resampling.BICUBIC
BOX = PIL.Image.Resampling.BOX


# ----------------------------------------------------------------------------------------------------
# Independent reference (SPEC.md sections 2-3)
# ----------------------------------------------------------------------------------------------------


def ref_buckets(target: int, patch: int = PATCH, max_ar: float = 4) -> list[tuple[int, int]]:
    """SPEC 3: N = (T/32)^2, wp = N, hp = 1; while wp > 0: add if ratio <= 4; then hp+1 if (hp+1)*wp <= N
    else wp-1."""
    n = (target // patch) ** 2
    wp, hp = n, 1
    out = []
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ar:
            out.append((wp * patch, hp * patch))
        if (hp + 1) * wp <= n:
            hp += 1
        else:
            wp -= 1
    return out


def ref_buckets_closed_form(target: int, patch: int = PATCH, max_ar: float = 4) -> list[tuple[int, int]]:
    """The same list derived differently: for each wp (descending) the loop visits hp from
    max(1, N // (wp + 1)) up to N // wp (ascending)."""
    n = (target // patch) ** 2
    out = []
    for wp in range(n, 0, -1):
        for hp in range(max(1, n // (wp + 1)), n // wp + 1):
            if max(wp, hp) <= max_ar * min(wp, hp):
                out.append((wp * patch, hp * patch))
    return out


def ref_select(width: int, height: int, buckets) -> tuple[int, int]:
    def score(b):
        cw, ch = b
        a, c = cw / width, ch / height
        return min(a, c) / max(a, c)

    # highest score; ties go to the larger (cw, ch) tuple
    return sorted(buckets, key=lambda b: (score(b), b), reverse=True)[0]


def ref_resize_crop(img: PIL.Image.Image, cw: int, ch: int, rng: random.Random | None = None):
    """Returns the cropped image (still in its own mode) and the (left, top) offset."""
    while img.width >= 2 * cw and img.height >= 2 * ch:
        img = img.resize((img.width // 2, img.height // 2), BOX)
    s = max(cw / img.width, ch / img.height)
    img = img.resize((round(img.width * s), round(img.height * s)), BICUBIC)
    if rng is None:
        left, top = (img.width - cw) // 2, (img.height - ch) // 2
    else:
        left = rng.randint(0, img.width - cw)
        top = rng.randint(0, img.height - ch)
    return img.crop((left, top, left + cw, top + ch)), (left, top)


def ref_to_rgb_uint8(img: PIL.Image.Image) -> torch.Tensor:
    """SPEC 2: RGB passes; other modes -> RGBA; no alpha < 255 -> plain RGB; else blend onto white
    (1-a)*255 + a*rgb with a = alpha/255, truncated to uint8. Returns (H, W, 3) uint8."""
    if img.mode == "RGB":
        return torch.from_numpy(np.array(img))
    rgba = torch.from_numpy(np.array(img.convert("RGBA")))
    alpha = rgba[..., 3:].to(torch.float64)
    if not bool((alpha < 255).any()):
        return rgba[..., :3].clone()
    a = alpha / 255
    blended = (1 - a) * 255 + a * rgba[..., :3].to(torch.float64)
    return blended.to(torch.uint8)  # float -> uint8 truncates toward zero


def ref_scale(rgb_u8: torch.Tensor) -> torch.Tensor:
    return (rgb_u8.permute(2, 0, 1).to(torch.float64) / 255 * 2 - 1).to(torch.float32)


def ref_preprocess(img: PIL.Image.Image, target: int, rng: random.Random | None = None):
    bucket = ref_select(img.width, img.height, ref_buckets(target))
    cropped, offset = ref_resize_crop(img, *bucket, rng=rng)
    rgb = ref_to_rgb_uint8(cropped)
    return ref_scale(rgb), bucket, rgb, offset


def ref_postprocess_u8(x: torch.Tensor) -> torch.Tensor:
    """SPEC 2: clamp [-1, 1], (x+1)/2*255 (float32), cast to uint8 (truncation)."""
    y = (x.to(torch.float32).clamp(-1, 1) + 1) / 2 * 255
    return y.to(torch.uint8)


# ----------------------------------------------------------------------------------------------------
# Test images
# ----------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def rgb_array(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + 7919 * w + h)
    gx = (np.arange(w) * 255 // max(w - 1, 1)).astype(np.int16)
    gy = (np.arange(h) * 255 // max(h - 1, 1)).astype(np.int16)
    base = np.empty((h, w, 3), np.int16)
    base[..., 0] = gx[None, :]
    base[..., 1] = gy[:, None]
    base[..., 2] = (gx[None, :] + gy[:, None]) // 2
    base += rng.integers(-60, 61, size=(h, w, 3), dtype=np.int16)
    return np.clip(base, 0, 255).astype(np.uint8)


@lru_cache(maxsize=None)
def alpha_array(w: int, h: int) -> np.ndarray:
    rng = np.random.default_rng(w * 31 + h)
    a = rng.integers(0, 256, size=(h, w)).astype(np.uint8)
    a[: h // 3] = 255  # opaque band
    a[h // 3 : h // 3 + max(h // 6, 1), : w // 2] = 0  # fully transparent patch
    a[-max(h // 6, 1) :, w // 2 :] = 128
    return a


def palette_image(w: int, h: int) -> PIL.Image.Image:
    """A "P" image on the 6x6x6 web palette (fast, unlike quantize() on big images)."""
    q = (rgb_array(w, h).astype(np.int64) * 6) // 256
    im = PIL.Image.fromarray((q[..., 0] * 36 + q[..., 1] * 6 + q[..., 2]).astype(np.uint8), "P")
    levels = [0, 51, 102, 153, 204, 255]
    im.putpalette([c for r in levels for g in levels for b in levels for c in (r, g, b)])
    return im


@lru_cache(maxsize=None)
def make_image(mode: str, w: int, h: int) -> PIL.Image.Image:
    rgb = PIL.Image.fromarray(rgb_array(w, h), "RGB")
    if mode == "RGB":
        return rgb
    if mode == "RGBA":
        return PIL.Image.fromarray(np.dstack([rgb_array(w, h), alpha_array(w, h)]), "RGBA")
    if mode == "RGBA_opaque":
        return rgb.convert("RGBA")
    if mode == "P":
        return palette_image(w, h)
    if mode == "P_index_transparency":  # one palette index fully transparent
        im = palette_image(w, h)
        most_common = int(np.bincount(np.array(im).ravel()).argmax())
        im.info["transparency"] = most_common
        return im
    if mode == "P_alpha_palette":  # per-index partial alpha (tRNS with a byte per index)
        im = palette_image(w, h)
        im.info["transparency"] = bytes((i * 37) % 256 for i in range(216))
        return im
    if mode == "L":
        return rgb.convert("L")
    if mode == "LA":
        return PIL.Image.merge("LA", (rgb.convert("L"), PIL.Image.fromarray(alpha_array(w, h), "L")))
    if mode == "1":
        return rgb.convert("L").convert("1")
    if mode == "CMYK":
        return rgb.convert("CMYK")
    raise AssertionError(mode)


MODES = ["RGB", "RGBA", "RGBA_opaque", "P", "P_index_transparency", "P_alpha_palette", "L", "LA", "1", "CMYK"]
SIZES = {
    "square": (300, 300),
    "2to1": (600, 300),
    "1to3": (200, 600),
    "tiny": (40, 33),
    "huge": (3000, 2000),
    "odd": (517, 389),
}


@lru_cache(maxsize=None)
def processor(target: int) -> LuminaMGPTImageProcessor:
    return LuminaMGPTImageProcessor(target_size=target)


# ----------------------------------------------------------------------------------------------------
# Buckets
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target,count,first,last",
    [
        (512, 49, (1024, 256), (256, 1024)),
        (768, 73, (1536, 384), (384, 1536)),
        (1024, 97, (2048, 512), (512, 2048)),
    ],
)
def test_bucket_lists(target, count, first, last):
    sizes = LuminaMGPTImageProcessor(target_size=target).bucket_sizes
    assert [tuple(s) for s in sizes] == ref_buckets(target) == ref_buckets_closed_form(target)
    assert len(sizes) == count
    assert tuple(sizes[0]) == first and tuple(sizes[-1]) == last
    assert (target, target) in [tuple(s) for s in sizes]
    assert len(set(map(tuple, sizes))) == len(sizes)
    n = (target // PATCH) ** 2
    for w, h in sizes:
        assert w % PATCH == 0 and h % PATCH == 0
        assert max(w, h) <= 4 * min(w, h)
        assert (w // PATCH) * (h // PATCH) <= n
    ratios = [w / h for w, h in sizes]
    assert all(a > b for a, b in zip(ratios, ratios[1:])), "widest first, strictly"
    widths = [w for w, _ in sizes]
    assert widths == sorted(widths, reverse=True)
    # the list is symmetric under transposition
    assert [(h, w) for w, h in reversed(sizes)] == [tuple(s) for s in sizes]


def test_bucket_list_256():
    sizes = processor(256).bucket_sizes
    assert [tuple(s) for s in sizes] == ref_buckets(256) == ref_buckets_closed_form(256)
    assert tuple(sizes[0]) == (512, 128) and tuple(sizes[-1]) == (128, 512) and (256, 256) in sizes


@pytest.mark.parametrize("target", [256, 512, 1024])
def test_select_bucket_sweep(target):
    p = processor(target)
    buckets = ref_buckets(target)
    dims = list(range(32, 2400, 71)) + [33, 40, 64, 100, 255, 256, 257, 511, 512, 513, 3000, 4096]
    for w in dims:
        for h in dims:
            assert tuple(p.select_bucket(w, h)) == ref_select(w, h, buckets), (w, h)


def test_select_bucket_exact_sizes_and_ties():
    p = processor(512)
    for b in p.bucket_sizes:
        assert tuple(p.select_bucket(*b)) == tuple(b)  # an image already at a bucket maps to it
    # extreme aspect ratios go to the extreme buckets
    assert tuple(p.select_bucket(5000, 100)) == (1024, 256)
    assert tuple(p.select_bucket(100, 5000)) == (256, 1024)
    # exact score tie (square image, transposed buckets): the larger (cw, ch) tuple wins, whatever the order
    assert tuple(lib_select_bucket(100, 100, [(128, 256), (256, 128)])) == (256, 128)
    assert tuple(lib_select_bucket(100, 100, [(256, 128), (128, 256)])) == (256, 128)


# ----------------------------------------------------------------------------------------------------
# Preprocess vs the independent reference
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [256, 512])
@pytest.mark.parametrize("size_name", list(SIZES))
@pytest.mark.parametrize("mode", MODES)
def test_preprocess_matches_reference(mode, size_name, target):
    w, h = SIZES[size_name]
    img = make_image(mode, w, h)
    expected, bucket, _, _ = ref_preprocess(img, target)
    out = processor(target)(img)
    pv = out["pixel_values"]
    assert isinstance(pv, torch.Tensor) and pv.dtype == torch.float32
    assert pv.shape == (1, 3, bucket[1], bucket[0])
    assert torch.equal(pv[0], expected)
    assert out["image_sizes"].tolist() == [[bucket[1], bucket[0]]]  # (height, width)
    assert pv.min() >= -1.0 and pv.max() <= 1.0
    assert img.size == (w, h) and img.mode == make_image(mode, w, h).mode  # input not mutated


@pytest.mark.parametrize("target", [768, 1024])
def test_preprocess_matches_reference_large_targets(target):
    for mode, (w, h) in [("RGB", (3000, 2000)), ("RGBA", (517, 389)), ("P", (2000, 500)), ("LA", (700, 1500))]:
        img = make_image(mode, w, h)
        expected, _, _, _ = ref_preprocess(img, target)
        assert torch.equal(processor(target)(img)["pixel_values"][0], expected), (mode, w, h)


def test_huge_image_takes_the_box_halving_path():
    img = make_image("RGB", 3000, 2000)
    cw, ch = ref_select(3000, 2000, ref_buckets(256))
    assert 3000 >= 4 * cw and 2000 >= 4 * ch  # at least two halvings
    out = processor(256)(img)["pixel_values"][0]
    # without the halving (one BICUBIC resize straight to the bucket scale) the pixels differ
    s = max(cw / 3000, ch / 2000)
    direct = img.resize((round(3000 * s), round(2000 * s)), BICUBIC)
    left, top = (direct.width - cw) // 2, (direct.height - ch) // 2
    no_halving = ref_scale(ref_to_rgb_uint8(direct.crop((left, top, left + cw, top + ch))))
    if no_halving.shape == out.shape:
        assert not torch.equal(out, no_halving)


@pytest.mark.parametrize("mode", ["RGBA", "P", "P_alpha_palette", "LA", "1"])
def test_resize_happens_in_the_image_own_mode(mode):
    """The test images are discriminative: converting to RGB before the resize gives other pixels."""
    img = make_image(mode, 600, 300)
    out = processor(256)(img)["pixel_values"][0]
    converted_first, _, _, _ = ref_preprocess(PIL.Image.fromarray(ref_to_rgb_uint8(img).numpy(), "RGB"), 256)
    assert not torch.equal(out, converted_first)


def test_batch_of_mixed_buckets_and_same_buckets():
    p = processor(256)
    imgs = [make_image("RGB", 600, 300), make_image("RGBA", 300, 300), make_image("P", 200, 600)]
    out = p(imgs)
    assert isinstance(out["pixel_values"], list) and len(out["pixel_values"]) == 3
    for img, t in zip(imgs, out["pixel_values"]):
        assert torch.equal(t, ref_preprocess(img, 256)[0])
    exp_sizes = [[ref_preprocess(i, 256)[1][1], ref_preprocess(i, 256)[1][0]] for i in imgs]
    assert out["image_sizes"].tolist() == exp_sizes
    same = p([make_image("RGB", 300, 300), make_image("L", 300, 300)])["pixel_values"]
    assert isinstance(same, torch.Tensor) and same.shape == (2, 3, 256, 256)
    assert p.preprocess(imgs[0])["pixel_values"].shape == p(imgs[0])["pixel_values"].shape


# ----------------------------------------------------------------------------------------------------
# Value range and alpha compositing
# ----------------------------------------------------------------------------------------------------


def test_value_range_is_exactly_minus_one_to_one():
    p = processor(256)
    white = p(PIL.Image.new("RGB", (256, 256), (255, 255, 255)))["pixel_values"]
    black = p(PIL.Image.new("RGB", (256, 256), (0, 0, 0)))["pixel_values"]
    assert torch.all(white == 1.0) and torch.all(black == -1.0)
    # stock Chameleon scales with x * 0.0078 - 1, which would give 255 * 0.0078 - 1 = 0.989 for white
    assert not torch.allclose(white, torch.full_like(white, 255 * 0.0078 - 1))
    # every uint8 value maps to x / 255 * 2 - 1
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    t = p(PIL.Image.fromarray(np.dstack([ramp] * 3), "RGB"))["pixel_values"][0]
    expected = torch.from_numpy(np.arange(256) / 255 * 2 - 1).float()
    assert torch.equal(t[0, 0], expected)
    assert t[0, 0, 127].item() == pytest.approx(-1 / 255) and t[0, 0, 128].item() == pytest.approx(1 / 255)


@pytest.mark.parametrize(
    "rgb,alpha,expected",
    [
        ((0, 0, 0), 128, 127),  # (1 - 128/255) * 255 evaluates to exactly 127.0 in float64
        ((0, 0, 0), 43, 211),  # (1 - 43/255) * 255 = 211.99999999999997 -> 211 (truncation)
        ((100, 100, 100), 5, 251),  # 251.96 -> 251, rounding would give 252
        ((10, 10, 10), 25, 230),  # 230.98 -> 230
        ((0, 0, 0), 0, 255),  # fully transparent -> white
        ((0, 0, 0), 255, 0),  # opaque pixel keeps its colour
        ((200, 100, 0), 254, None),
    ],
)
def test_alpha_composited_onto_white_with_truncation(rgb, alpha, expected):
    # 256x256 is a bucket of target 256: no resize (a resize would go through premultiplied RGBa and
    # change the colour of low-alpha pixels before the blend), so this checks the blend itself.
    arr = np.zeros((256, 256, 4), np.uint8)
    arr[..., :3] = rgb
    arr[..., 3] = alpha
    arr[0, 0, 3] = 0  # make sure at least one alpha < 255 even for the opaque case
    img = PIL.Image.fromarray(arr, "RGBA")
    t = processor(256)(img)["pixel_values"][0]
    assert torch.equal(t, ref_preprocess(img, 256)[0])
    got_u8 = torch.round((t + 1) / 2 * 255).to(torch.int64)
    centre = got_u8[:, 128, 128].tolist()
    for c, v in zip(rgb, centre):
        a = alpha / 255
        exact = int((1 - a) * 255 + a * c)
        assert v == exact
        if expected is not None:
            assert v == expected


def test_fully_opaque_rgba_equals_rgb():
    rgb = make_image("RGB", 300, 200)
    out_rgba = processor(256)(rgb.convert("RGBA"))["pixel_values"]
    out_rgb = processor(256)(rgb)["pixel_values"]
    assert torch.equal(out_rgba, out_rgb)


# ----------------------------------------------------------------------------------------------------
# Input types
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(300, 300), (517, 389), (40, 33)])
def test_pil_numpy_torch_inputs_agree(size, tmp_path):
    p = processor(256)
    img = make_image("RGB", *size)
    arr = np.array(img)
    ref = ref_preprocess(img, 256)[0]
    path = tmp_path / "img.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    variants = {
        "pil": img,
        "np_hwc_uint8": arr,
        "torch_chw_uint8": torch.from_numpy(arr).permute(2, 0, 1).contiguous(),
        "np_float64_01": arr / 255.0,
        "np_float32_01": (arr / 255.0).astype(np.float32),
        "torch_float32_01": torch.from_numpy(arr / 255.0).permute(2, 0, 1).float(),
        "torch_bf16_01": torch.from_numpy(np.where(arr > 127, 1.0, 0.0)).permute(2, 0, 1).bfloat16(),
        "path": str(path),
        "pathlike": path,
        "bytes": buf.getvalue(),
    }
    for name, x in variants.items():
        got = p(x)["pixel_values"][0]
        if name == "torch_bf16_01":  # binary image: exactly representable in bf16
            bin_img = PIL.Image.fromarray(np.where(arr > 127, 255, 0).astype(np.uint8), "RGB")
            assert torch.equal(got, ref_preprocess(bin_img, 256)[0]), name
        else:
            assert torch.equal(got, ref), name


def test_numpy_grayscale_and_rgba_inputs():
    p = processor(256)
    g = make_image("L", 300, 200)
    assert torch.equal(p(np.array(g))["pixel_values"][0], ref_preprocess(g, 256)[0])
    assert torch.equal(p(np.array(g)[..., None])["pixel_values"][0], ref_preprocess(g, 256)[0])
    rgba = make_image("RGBA", 300, 200)
    assert torch.equal(p(np.array(rgba))["pixel_values"][0], ref_preprocess(rgba, 256)[0])
    chw = torch.from_numpy(np.array(rgba)).permute(2, 0, 1)
    assert torch.equal(p(chw)["pixel_values"][0], ref_preprocess(rgba, 256)[0])


# ----------------------------------------------------------------------------------------------------
# Cropping
# ----------------------------------------------------------------------------------------------------


def coord_image(w: int, h: int) -> PIL.Image.Image:
    """R = column index, G = row index: the crop offset can be read back from the output."""
    yy, xx = np.mgrid[0:h, 0:w]
    return PIL.Image.fromarray(np.dstack([xx % 256, yy % 256, np.zeros_like(xx)]).astype(np.uint8), "RGB")


def decode_offset(t: torch.Tensor) -> tuple[int, int]:
    u8 = torch.round((t + 1) / 2 * 255).to(torch.int64)
    return int(u8[0, 0, 0]), int(u8[1, 0, 0])


@pytest.mark.parametrize("w,h,exp", [(260, 256, (2, 0)), (261, 256, (2, 0)), (256, 265, (0, 4)), (256, 270, (0, 7))])
def test_centered_crop_by_default(w, h, exp):
    img = coord_image(w, h)
    assert ref_select(w, h, ref_buckets(256)) == (256, 256)  # no resize needed: scale is exactly 1
    t = processor(256)(img)["pixel_values"][0]
    assert decode_offset(t) == exp == ((w - 256) // 2, (h - 256) // 2)
    assert torch.equal(t, ref_preprocess(img, 256)[0])


def test_centered_crop_after_resize_matches_floor_offset():
    # 2:1 image into a less wide bucket: the resized width exceeds the bucket, crop is centered (floor)
    img = make_image("RGB", 1000, 300)
    bucket = ref_select(1000, 300, ref_buckets(256))
    s = max(bucket[0] / 1000, bucket[1] / 300)
    resized_w = round(1000 * s)
    assert resized_w > bucket[0]
    _, _, _, offset = ref_preprocess(img, 256)
    assert offset == ((resized_w - bucket[0]) // 2, 0)
    assert torch.equal(processor(256)(img)["pixel_values"][0], ref_preprocess(img, 256)[0])


def test_random_crop_seeded_is_reproducible_and_matches_python_random():
    p = processor(256)
    # the widest image that still maps to (256, 256): no resize, so offsets are readable; room 17
    img = coord_image(273, 256)
    assert ref_select(273, 256, ref_buckets(256)) == (256, 256)
    outs = {}
    for seed in range(8):
        a = p(img, random_crop=True, seed=seed)["pixel_values"][0]
        b = p(img, random_crop=True, seed=seed)["pixel_values"][0]
        assert torch.equal(a, b)  # same seed, same output
        r = random.Random(seed)
        expected_offset = (r.randint(0, 273 - 256), r.randint(0, 256 - 256))
        assert decode_offset(a) == expected_offset
        expected, _, _, offset = ref_preprocess(img, 256, rng=random.Random(seed))
        assert offset == expected_offset and torch.equal(a, expected)
        outs[seed] = (a, offset)
    assert len({o for _, o in outs.values()}) > 1
    for s1 in outs:
        for s2 in outs:
            if outs[s1][1] != outs[s2][1]:
                assert not torch.equal(outs[s1][0], outs[s2][0])
    # a resized image with room in height only
    img2 = make_image("RGB", 300, 256)
    # bucket (256, 224), scale 0.875: 262.5 rounds (half to even) to 262, so 6 columns of room
    assert ref_preprocess(img2, 256)[1] == (256, 224) and ref_preprocess(img2, 256)[3] == (3, 0)
    for seed in range(4):
        got = p(img2, random_crop=True, seed=seed)["pixel_values"][0]
        assert torch.equal(got, ref_preprocess(img2, 256, rng=random.Random(seed))[0])


def test_random_crop_batch_uses_one_rng_in_order():
    p = processor(256)
    imgs = [coord_image(300, 256), coord_image(256, 320), make_image("RGBA", 700, 300)]
    out = p(imgs, random_crop=True, seed=1234)["pixel_values"]
    rng = random.Random(1234)
    for img, t in zip(imgs, out):
        assert torch.equal(t, ref_preprocess(img, 256, rng=rng)[0])


def test_random_crop_from_constructor_and_override():
    img = coord_image(256, 330)
    rp = LuminaMGPTImageProcessor(target_size=256, random_crop=True)
    assert torch.equal(rp(img, seed=5)["pixel_values"][0], ref_preprocess(img, 256, rng=random.Random(5))[0])
    # random_crop=False in the call overrides the constructor default
    assert torch.equal(rp(img, random_crop=False, seed=5)["pixel_values"][0], ref_preprocess(img, 256)[0])
    # default processor: seed alone does not turn random cropping on
    assert torch.equal(processor(256)(img, seed=5)["pixel_values"][0], ref_preprocess(img, 256)[0])


# ----------------------------------------------------------------------------------------------------
# Postprocess
# ----------------------------------------------------------------------------------------------------


def test_postprocess_values_truncate():
    p = processor(256)
    vals = torch.tensor([0.0, 1.0, -1.0, 1.5, -3.0, 0.999, -0.999, 0.5, 1 / 255])
    x = vals.view(1, 1, 1, -1).expand(1, 3, 1, -1).contiguous()
    got = p.postprocess(x, "pt")[0, 0, 0].tolist()
    # (x+1)/2*255 truncated: 0 -> 127.5 -> 127, 0.5 -> 191.25 -> 191, 1/255 -> 128.0 (float32: 128 or 127)
    assert got[:8] == [127, 255, 0, 255, 0, 254, 0, 191]
    assert got == ref_postprocess_u8(vals).tolist()


def test_postprocess_output_types():
    p = processor(256)
    x = torch.rand(2, 3, 64, 32) * 2 - 1
    pt = p.postprocess(x, "pt")
    assert pt.dtype == torch.uint8 and pt.shape == (2, 3, 64, 32)
    assert torch.equal(pt, ref_postprocess_u8(x))
    arr = p.postprocess(x, "np")
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.shape == (2, 64, 32, 3)
    assert np.array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    pils = p.postprocess(x, "pil")
    assert isinstance(pils, list) and len(pils) == 2
    for im, a in zip(pils, arr):
        assert im.mode == "RGB" and im.size == (32, 64)
        assert np.array_equal(np.array(im), a)
    # default output_type is pil; a single (3, H, W) tensor is a batch of one
    assert isinstance(p.postprocess(x[0])[0], PIL.Image.Image)
    assert p.postprocess(x[0], "pt").shape == (1, 3, 64, 32)
    # bf16 / fp16 inputs are handled (upcast)
    assert p.postprocess(x.bfloat16(), "pt").dtype == torch.uint8
    with pytest.raises(ValueError):
        p.postprocess(x, "latent")


def test_round_trip_loses_at_most_one_level():
    """x -> x/255*2-1 (float64, stored as float32) -> (v+1)/2*255 (float32) -> truncation is NOT exact: for
    some levels the float32 result lands just below the integer (e.g. 0.99999994) and truncation gives
    x - 1. It is exact for 0 and 255 and loses at most 1 elsewhere; the exact per-level table is checked."""
    p = processor(256)
    levels = torch.arange(256, dtype=torch.float64)
    table = ref_postprocess_u8(((levels / 255 * 2 - 1).to(torch.float32))).to(torch.int64)
    diff = torch.arange(256) - table
    assert set(diff.tolist()) <= {0, 1} and diff[0] == 0 and diff[255] == 0
    assert diff.sum() > 0  # not exact: documented above

    for mode, size in [("RGB", (517, 389)), ("RGBA", (600, 300)), ("P", (300, 300)), ("RGB", (3000, 2000))]:
        img = make_image(mode, *size)
        pv = p(img)["pixel_values"]
        _, _, rgb_u8, _ = ref_preprocess(img, 256)
        back = torch.from_numpy(p.postprocess(pv, "np")[0]).to(torch.int64)
        orig = rgb_u8.to(torch.int64)
        assert torch.equal(back, table[orig])  # exactly the per-level table
        assert int((orig - back).min()) >= 0 and int((orig - back).max()) <= 1
    # a ramp with all 256 levels
    ramp = np.dstack([np.tile(np.arange(256, dtype=np.uint8), (256, 1))] * 3)
    back = p.postprocess(p(ramp)["pixel_values"], "np")[0].astype(np.int64)
    assert np.array_equal(back[0, :, 0], table.numpy())


# ----------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------


def test_save_and_load(tmp_path):
    from transformers import AutoImageProcessor

    assert lumina_hf.LuminaMGPTImageProcessor is LuminaMGPTImageProcessor
    p = LuminaMGPTImageProcessor(target_size=768, random_crop=True, min_side=48)
    p.save_pretrained(tmp_path)
    img = make_image("RGBA", 517, 389)
    expected = p(img, random_crop=False)["pixel_values"]
    for loaded in (LuminaMGPTImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is LuminaMGPTImageProcessor
        assert loaded.target_size == 768 and loaded.random_crop is True and loaded.min_side == 48
        assert loaded.patch_size == 32 and loaded.max_aspect_ratio == 4
        assert loaded.to_dict() == p.to_dict()
        assert len(loaded.bucket_sizes) == 73
        assert torch.equal(loaded(img, random_crop=False)["pixel_values"], expected)
    # the default processor round-trips too
    d = tmp_path / "default"
    LuminaMGPTImageProcessor().save_pretrained(d)
    assert AutoImageProcessor.from_pretrained(d).target_size == 512


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [500, 0, -512, 16, 512.0])
def test_unsupported_target_size(target):
    with pytest.raises(ValueError, match="target_size"):
        LuminaMGPTImageProcessor(target_size=target)


def good_image():
    return make_image("RGB", 300, 300)


@pytest.mark.parametrize(
    "bad",
    [
        PIL.Image.new("RGB", (0, 40)),
        np.zeros((0, 40, 3), np.uint8),
        torch.zeros(3, 40, 0, dtype=torch.uint8),
    ],
    ids=["pil", "numpy", "torch"],
)
def test_zero_sized_image(bad):
    with pytest.raises(ValueError, match=r"image 1\b"):
        processor(256)([good_image(), bad])


def test_corrupt_bytes_and_files(tmp_path):
    p = processor(256)
    buf = io.BytesIO()
    good_image().save(buf, "PNG")
    data = buf.getvalue()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    for i, bad in enumerate([b"not an image", b"", data[: len(data) // 2], str(corrupt), truncated, str(tmp_path / "missing.png")]):
        with pytest.raises(ValueError, match=r"image 2\b") as err:
            p([good_image(), data, bad])
        assert isinstance(err.value, ValueError), i
    with pytest.raises(ValueError, match="corrupt.png"):
        p([str(corrupt)])


@pytest.mark.parametrize("size", [(31, 100), (100, 31), (1, 1), (20, 20)])
def test_too_small_image(size):
    with pytest.raises(ValueError, match="image 0"):
        processor(256)(PIL.Image.new("RGB", size))
    processor(256)(PIL.Image.new("RGB", (32, 32)))  # 32 px is accepted


@pytest.mark.parametrize(
    "arr",
    [
        np.full((40, 40, 3), 1.5, np.float32),
        np.full((40, 40, 3), -0.1, np.float64),
        np.full((40, 40, 3), 300, np.int16),
        np.full((40, 40, 3), -1, np.int32),
    ],
    ids=["float>1", "float<0", "int>255", "int<0"],
)
def test_array_values_out_of_range(arr):
    with pytest.raises(ValueError, match="image 0"):
        processor(256)(arr)
    with pytest.raises(ValueError, match="image 0"):
        processor(256)(torch.from_numpy(arr).permute(2, 0, 1))


def test_not_an_image():
    p = processor(256)
    with pytest.raises(ValueError):
        p(np.zeros((40, 40, 5), np.uint8))
    with pytest.raises(ValueError):
        p([good_image(), 12345])
    with pytest.raises(ValueError):
        p([])
    with pytest.raises(ValueError):
        p(None)


def test_check_size():
    p = processor(512)
    for b in p.bucket_sizes:
        p.check_size(*b)
    with pytest.raises(ValueError) as err:
        p.check_size(500, 500)
    msg = str(err.value)
    assert "512x512" in msg and "nearest" in msg and "49" in msg
    with pytest.raises(ValueError, match="1024x256"):
        p.check_size(1000, 250)
    with pytest.raises(ValueError):
        p.check_size(512, 520)


# ----------------------------------------------------------------------------------------------------
# Decompression bombs and runaway bucket searches
# ----------------------------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width x height` RGB and whose pixel data is a few garbage bytes: opening it reads
    the header only, decoding it fails. A processor that decodes before checking the size reports a read error."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [20000, 12000])
def test_decompression_bomb_is_refused_from_the_header(side, tmp_path):
    """20000^2 is over PIL's own hard limit (PIL raised its raw DecompressionBombError); 12000^2 is between PIL's
    warning and error (it was decoded: 1.7 GB, 28 s). Both are refused with a ValueError naming the limit, before any
    pixel is decoded (the file has no valid pixel data, so a decode would report a read error instead)."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(side, side))
    p = processor(256)
    for source in (str(path), path.read_bytes()):
        with pytest.warns(PIL.Image.DecompressionBombWarning) if side == 12000 else contextlib.nullcontext():
            with pytest.raises(ValueError, match=r"image 1\b.*max_image_pixels") as err:
                p([good_image(), source])
        assert type(err.value) is not PIL.Image.DecompressionBombError
        assert "could not be read" not in str(err.value)
        if side == 12000:
            assert f"{side}x{side}" in str(err.value) and "144 MP" in str(err.value) and "67 MP" in str(err.value)
        else:
            assert "decompression bomb" in str(err.value)


def test_pixel_limit_is_configurable_and_saved(tmp_path):
    img = make_image("RGB", 300, 200)  # 60000 pixels
    buf = io.BytesIO()
    img.save(buf, "PNG")
    strict = LuminaMGPTImageProcessor(target_size=256, max_image_pixels=50_000)
    for source in (img, buf.getvalue()):
        with pytest.raises(ValueError, match=r"image 0 .*300x200.*max_image_pixels"):
            strict(source)
    loose = LuminaMGPTImageProcessor(target_size=256, max_image_pixels=60_000)  # the limit itself is accepted
    assert torch.equal(loose(img)["pixel_values"], processor(256)(img)["pixel_values"])
    unlimited = LuminaMGPTImageProcessor(target_size=256, max_image_pixels=None)
    assert torch.equal(unlimited(buf.getvalue())["pixel_values"], processor(256)(img)["pixel_values"])
    strict.save_pretrained(tmp_path)
    loaded = LuminaMGPTImageProcessor.from_pretrained(tmp_path)
    assert loaded.max_image_pixels == 50_000
    with pytest.raises(ValueError, match="max_image_pixels"):
        loaded(img)
    assert processor(256).max_image_pixels == 8192 * 8192
    for bad in (0, -5, 1.5, "64MP", True):
        with pytest.raises(ValueError, match="max_image_pixels"):
            LuminaMGPTImageProcessor(max_image_pixels=bad)


@pytest.mark.parametrize("target", [10**6, 4096, 2080, 2**40])
def test_huge_target_size_is_refused_at_once(target):
    """target_size=10**6 used to be accepted and then hang in the bucket search (~10^9 iterations): now the size
    tokens bound it (a side is at most 128 units of 32 px, so the widest 4:1 bucket allows 2048)."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=rf"target_size={target} is not supported.*at most 2048"):
        LuminaMGPTImageProcessor(target_size=target)
    from lumina_hf.image_processing_lumina_mgpt import generate_buckets

    with pytest.raises(ValueError, match="at most 2048"):
        generate_buckets(target)
    assert time.perf_counter() - t0 < 1.0


def test_largest_target_size_is_bounded_and_matches_reference():
    p = LuminaMGPTImageProcessor(target_size=2048)
    assert p.bucket_sizes == ref_buckets(2048)
    assert max(max(w, h) for w, h in p.bucket_sizes) == 4096  # 128 size units of 32 px
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        LuminaMGPTImageProcessor(max_aspect_ratio=0)
