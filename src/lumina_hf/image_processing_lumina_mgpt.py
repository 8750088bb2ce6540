"""Image processor for Lumina-mGPT: aspect-ratio buckets, resize/crop, white alpha, exact [-1, 1] scaling.

Reproduces the reference preprocessing with PIL. It is PIL-specific (the resize happens on the image in its own
mode: palette and 1-bit images resize with NEAREST, RGBA with premultiplied alpha), so this processor works on PIL
images throughout and converts numpy/tensor inputs to PIL first; the torchvision/PIL backends of `transformers` would
change the pixels. Image files are checked against a pixel limit (`max_image_pixels`) from their header, before any
pixel is decoded, so a decompression bomb (a small file that decodes to gigabytes) is refused early.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import random
import re
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .unirep import UniRepLayout

logger = logging.getLogger(__name__)

PATCH_SIZE = 32
MAX_ASPECT_RATIO = 4
MAX_SIZE_UNITS = UniRepLayout.max_size_units  # the size tokens write a side of 1..128 grid units
# 64 MP (8192 x 8192): above any camera or scan a training set holds in practice (a 50 MP photo passes), below the
# point where decoding alone takes seconds and over 256 MB (RGBA) before the first resize.
MAX_IMAGE_PIXELS = 8192 * 8192


def generate_buckets(target_size: int, patch_size: int = PATCH_SIZE, max_aspect_ratio: int = MAX_ASPECT_RATIO):
    """All `(width, height)` sizes whose area is at most `target_size**2` in `patch_size` units and whose
    aspect ratio is at most `max_aspect_ratio`, widest first.

    49 sizes for 512, 73 for 768, 97 for 1024 (from `(4T/2, T/2)`... to `(T/2, 2T)` through `(T, T)`)."""
    check_target_size(target_size, patch_size, max_aspect_ratio)
    return list(_buckets(target_size, patch_size, max_aspect_ratio))


@functools.lru_cache(maxsize=64)
def _buckets(target_size: int, patch_size: int, max_aspect_ratio) -> tuple[tuple[int, int], ...]:
    n = (target_size // patch_size) ** 2
    wp, hp = n, 1
    sizes = []
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_aspect_ratio:
            sizes.append((wp * patch_size, hp * patch_size))
        if (hp + 1) * wp <= n:
            hp += 1
        else:
            wp -= 1
    return tuple(sizes)


def check_target_size(target_size: int, patch_size: int = PATCH_SIZE, max_aspect_ratio=MAX_ASPECT_RATIO) -> None:
    """ValueError unless `target_size` is a positive multiple of `patch_size` whose widest bucket the size tokens
    can write (at most 128 grid units a side: 2048 with the published 32-px grid and aspect ratio 4)."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size={patch_size!r} is not supported: use a positive integer (the published models use 32).")
    if isinstance(max_aspect_ratio, bool) or not isinstance(max_aspect_ratio, (int, float)) or not max_aspect_ratio >= 1:
        raise ValueError(f"max_aspect_ratio={max_aspect_ratio!r} is not supported: use a number >= 1 (the published models use 4).")
    if isinstance(target_size, bool) or not isinstance(target_size, int) or target_size < patch_size or target_size % patch_size:
        raise ValueError(
            f"target_size={target_size!r} is not supported: use a positive multiple of {patch_size} "
            "(the published models use 512, 768 or 1024)."
        )
    units = target_size // patch_size
    # the widest bucket is about sqrt(area * aspect) units wide; bounding it also bounds the bucket search
    if units * units * max_aspect_ratio > MAX_SIZE_UNITS**2:
        limit = int((MAX_SIZE_UNITS**2 / max_aspect_ratio) ** 0.5) * patch_size
        raise ValueError(
            f"target_size={target_size} is not supported: its widest bucket would be about "
            f"{int((units * units * max_aspect_ratio) ** 0.5) * patch_size} px wide, and the size tokens write at most "
            f"{MAX_SIZE_UNITS * patch_size} px ({MAX_SIZE_UNITS} units of {patch_size}); use at most {limit} "
            "(the published models use 512, 768 or 1024)."
        )


def select_bucket(width: int, height: int, buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio best matches a `width x height` image: highest
    `min(cw/W, ch/H) / max(cw/W, ch/H)`, ties to the larger `(cw, ch)` tuple."""
    best_key, best = None, None
    for cw, ch in buckets:
        rw, rh = cw / width, ch / height
        key = (min(rw, rh) / max(rw, rh), (cw, ch))
        if best_key is None or key > best_key:
            best_key, best = key, (cw, ch)
    return best


def whiten_transparency(img: PIL.Image.Image) -> PIL.Image.Image:
    """RGB passes; other modes go to RGBA; without any alpha < 255 plain RGB, else blended onto white
    `(1 - a) * 255 + a * rgb` and truncated to uint8 ."""
    if img.mode == "RGB":
        return img
    rgba = np.array(img.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return img.convert("RGB")
    alpha = rgba[:, :, 3:4] / 255.0
    rgb = (1 - alpha) * 255 + alpha * rgba[:, :, :3]
    return PIL.Image.fromarray(rgb.astype(np.uint8), "RGB")


def resize_and_crop(
    img: PIL.Image.Image, size: tuple[int, int], random_crop: bool = False, rng: random.Random | None = None
) -> PIL.Image.Image:
    """Halve with BOX while both sides are >= 2x the bucket, scale by `max(cw/W, ch/H)` with BICUBIC
    (rounded sizes), crop `cw x ch`: centered (floor) or at a random offset from `rng` ."""
    cw, ch = size
    while img.size[0] >= 2 * cw and img.size[1] >= 2 * ch:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=PIL.Image.BOX)
    scale = max(cw / img.size[0], ch / img.size[1])
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), resample=PIL.Image.BICUBIC)
    if random_crop:
        rng = rng or random
        left = rng.randint(0, img.size[0] - cw)
        top = rng.randint(0, img.size[1] - ch)
    else:
        left, top = (img.size[0] - cw) // 2, (img.size[1] - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def pil_to_tensor(img: PIL.Image.Image) -> torch.Tensor:
    """RGB PIL image -> `(3, H, W)` float32 in exactly [-1, 1] (`x / 255 * 2 - 1`)."""
    return uint8_to_pixel_values(torch.from_numpy(np.array(img)))


def uint8_to_pixel_values(images: torch.Tensor) -> torch.Tensor:
    """`(..., H, W, 3)` uint8 -> `(..., 3, H, W)` float32 in [-1, 1]: `x / 255 * 2 - 1` computed in float64 and
    rounded once, so the values are the same on any device (and equal `pil_to_tensor`'s)."""
    x = images.to(torch.float64) / 255.0 * 2 - 1
    return x.movedim(-1, -3).to(torch.float32)


class ImageTooLargeError(ValueError):
    """An image has more pixels than the image processor's `max_image_pixels`."""


def _check_pixels(width: int, height: int, limit: int | None, where: str) -> None:
    if limit is not None and width * height > limit:
        raise ImageTooLargeError(
            f"{where} is {width}x{height} ({width * height / 1e6:.0f} MP), over the limit of {limit / 1e6:.0f} MP "
            "(max_image_pixels): a decompression bomb, or an unusually large image. Downscale it, or raise "
            "max_image_pixels on the image processor (CLI: --max-image-pixels) if you trust the file."
        )


def to_pil(image: Any, index: int = 0, max_pixels: int | None = MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Accept a PIL image, a path, bytes, a numpy array (HWC or HW, uint8 or float in [0, 1]) or a torch
    tensor (CHW, uint8 or float in [0, 1]) and return a PIL image; corrupt or empty input -> ValueError, and so is an
    image of more than `max_pixels` pixels (files are checked from their header, before decoding)."""
    where = f"image {index}"
    try:
        if isinstance(image, (str, os.PathLike, bytes, bytearray)):
            if isinstance(image, (str, os.PathLike)):
                where = f"image {index} ({os.fspath(image)})"
            source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
            with PIL.Image.open(source) as im:
                _check_pixels(im.size[0], im.size[1], max_pixels, where)
                im.load()
                image = im.copy()
        elif isinstance(image, PIL.Image.Image):
            _check_pixels(image.size[0], image.size[1], max_pixels, where)  # before a lazily opened image decodes
    except ImageTooLargeError:
        raise
    except PIL.Image.DecompressionBombError as err:
        raise ValueError(
            f"{where} was refused by PIL as a decompression bomb ({err}). Downscale it; to accept it, raise both "
            "PIL.Image.MAX_IMAGE_PIXELS and max_image_pixels on the image processor."
        ) from err
    except (OSError, PIL.UnidentifiedImageError, ValueError) as err:
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image bytes", str(err))  # no run-specific address
        raise ValueError(f"{where} could not be read as an image ({detail}); check that the file is a valid image.") from err
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.is_floating_point():
            t = t.float()  # bfloat16 (and other non-numpy floats) have no numpy dtype
        if t.ndim == 3:
            t = t.permute(1, 2, 0)
        image = t.numpy()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating):
                if arr.size and (arr.min() < 0 or arr.max() > 1):
                    raise ValueError(f"{where}: float arrays must hold values in [0, 1], got {arr.min()}..{arr.max()}.")
                arr = np.round(arr * 255)
            elif arr.size and (arr.min() < 0 or arr.max() > 255):
                raise ValueError(f"{where}: integer arrays must hold values in [0, 255], got {arr.min()}..{arr.max()}.")
            arr = arr.astype(np.uint8)
        if arr.ndim == 2:
            image = PIL.Image.fromarray(arr, "L")
        elif arr.ndim == 3 and arr.shape[-1] in (3, 4):
            image = PIL.Image.fromarray(arr, "RGB" if arr.shape[-1] == 3 else "RGBA")
        else:
            raise ValueError(f"{where}: array of shape {image.shape} is not an image (HxW, HxWx3 or HxWx4).")
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"{where}: expected a PIL image, a path, bytes, a numpy array or a tensor, got {type(image).__name__}.")
    if image.size[0] == 0 or image.size[1] == 0:
        raise ValueError(f"{where} is empty ({image.size[0]}x{image.size[1]}).")
    _check_pixels(image.size[0], image.size[1], max_pixels, where)
    return image


class LuminaMGPTImageProcessor(BaseImageProcessor):
    r"""
    Turns images into `(3, H, W)` float tensors in [-1, 1] at one of the aspect-ratio buckets of
    `target_size`, and VQGAN outputs back into images.

    Args:
        target_size (`int`, defaults to 512): the bucket family (a multiple of `patch_size` up to 2048; 512, 768 and
            1024 are published).
        patch_size (`int`, defaults to 32): the grid unit of the size tokens.
        max_aspect_ratio (`int`, defaults to 4).
        random_crop (`bool`, defaults to False): crop at a random offset (training augmentation) instead of
            the centre. Seed it with `seed=` in the call.
        min_side (`int`, defaults to 32): smaller inputs are rejected.
        max_image_pixels (`int` or None, defaults to 64 MP = 8192 x 8192): larger images are rejected with a
            ValueError, files before they are decoded (decompression bombs); None turns the check off (PIL's own
            limit, `PIL.Image.MAX_IMAGE_PIXELS`, still applies).

    Call: `processor(images, random_crop=None, seed=None)` -> `BatchFeature` with `pixel_values` (a
    `(N, 3, H, W)` tensor when all images share a bucket, else a list of `(3, H, W)` tensors) and
    `image_sizes` `(N, 2)` as `(height, width)`.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        target_size: int = 512,
        patch_size: int = PATCH_SIZE,
        max_aspect_ratio: int = MAX_ASPECT_RATIO,
        random_crop: bool = False,
        min_side: int = 32,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
        **kwargs,
    ):
        # Skip BaseImageProcessor's backend kwarg machinery: our steps are PIL-exact and not configurable.
        kwargs.pop("image_processor_type", None)
        super(BaseImageProcessor, self).__init__(**kwargs)
        check_target_size(target_size, patch_size, max_aspect_ratio)
        if max_image_pixels is not None and (
            isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1
        ):
            raise ValueError(f"max_image_pixels must be a positive integer or None, got {max_image_pixels!r}.")
        self.target_size = target_size
        self.patch_size = patch_size
        self.max_aspect_ratio = max_aspect_ratio
        self.random_crop = random_crop
        self.min_side = min_side
        self.max_image_pixels = max_image_pixels

    @property
    def bucket_sizes(self) -> list[tuple[int, int]]:
        return generate_buckets(self.target_size, self.patch_size, self.max_aspect_ratio)

    def select_bucket(self, width: int, height: int) -> tuple[int, int]:
        return select_bucket(width, height, self.bucket_sizes)

    def check_size(self, width: int, height: int) -> None:
        """Raise a ValueError listing the nearest valid sizes when `width x height` is not a bucket."""
        buckets = self.bucket_sizes
        if (width, height) in buckets:
            return
        nearest = sorted(buckets, key=lambda s: abs(s[0] - width) + abs(s[1] - height))[:4]
        raise ValueError(
            f"{width}x{height} (WxH) is not one of the {len(buckets)} sizes of this model (target size "
            f"{self.target_size}); nearest valid sizes: {', '.join(f'{w}x{h}' for w, h in nearest)}."
        )

    def prepare_image(
        self, image: Any, random_crop: bool | None = None, rng: random.Random | None = None, index: int = 0
    ) -> np.ndarray:
        """One image at its bucket as an `(H, W, 3)` uint8 array (read, size-checked, resized, cropped, alpha on
        white): everything but the scaling to [-1, 1] (`uint8_to_pixel_values`), which can then run on the device."""
        img = to_pil(image, index, self.max_image_pixels)
        if min(img.size) < self.min_side:
            raise ValueError(
                f"image {index} is {img.size[0]}x{img.size[1]}: sides under {self.min_side} px are too small to "
                "tokenize; upscale it first."
            )
        bucket = self.select_bucket(*img.size)
        random_crop = self.random_crop if random_crop is None else random_crop
        img = resize_and_crop(img, bucket, random_crop=random_crop, rng=rng)
        return np.array(whiten_transparency(img))

    def preprocess_image(
        self, image: Any, random_crop: bool | None = None, rng: random.Random | None = None, index: int = 0
    ) -> torch.Tensor:
        return uint8_to_pixel_values(torch.from_numpy(self.prepare_image(image, random_crop, rng, index)))

    def preprocess(self, images, random_crop: bool | None = None, seed: int | None = None, return_tensors=None, **kwargs):
        if images is None or (isinstance(images, (list, tuple)) and not images):
            raise ValueError("no images given.")
        if not isinstance(images, (list, tuple)):
            images = [images]
        rng = random.Random(seed) if seed is not None else None
        tensors = [self.preprocess_image(img, random_crop, rng, i) for i, img in enumerate(images)]
        sizes = torch.tensor([list(t.shape[-2:]) for t in tensors], dtype=torch.long)
        same = all(t.shape == tensors[0].shape for t in tensors)
        pixel_values = torch.stack(tensors) if same else tensors
        return BatchFeature({"pixel_values": pixel_values, "image_sizes": sizes})

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def postprocess(self, pixels: torch.Tensor, output_type: str = "pil"):
        """`(B, 3, H, W)` or `(3, H, W)` in [-1, 1] -> clamp, `(x + 1) / 2 * 255`, truncate to uint8.

        output_type "pil": list of RGB images; "np": uint8 `(B, H, W, 3)`; "pt": uint8 `(B, 3, H, W)`."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        if pixels.ndim == 3:
            pixels = pixels.unsqueeze(0)
        x = (pixels.detach().float().clamp(-1.0, 1.0) + 1.0) / 2.0 * 255
        if output_type == "pt":
            return x.to(torch.uint8).cpu()
        arr = x.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
        if output_type == "np":
            return arr
        return [PIL.Image.fromarray(a, "RGB") for a in arr]

    def to_dict(self) -> dict[str, Any]:
        out = {
            "image_processor_type": type(self).__name__,
            "target_size": self.target_size,
            "patch_size": self.patch_size,
            "max_aspect_ratio": self.max_aspect_ratio,
            "random_crop": self.random_crop,
            "min_side": self.min_side,
            "max_image_pixels": self.max_image_pixels,
        }
        if getattr(self, "processor_class", None):
            out["processor_class"] = self.processor_class
        return out


__all__ = [
    "MAX_IMAGE_PIXELS",
    "ImageTooLargeError",
    "LuminaMGPTImageProcessor",
    "generate_buckets",
    "select_bucket",
    "uint8_to_pixel_values",
]
