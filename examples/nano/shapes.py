"""Synthetic shapes: the data the Lumina-mGPT-nano model is trained and evaluated on.

Each item is one shape (circle, square or triangle) of one color on a background of another color, at an
aspect ratio of 1:1, 2:1 or 1:2, with the caption "a red circle on a blue background", its segmentation mask
(white shape on black) and the caption as its description. Everything is drawn with PIL from a seed, so a
data set is reproducible from `(seed, index)`.

The scorers (`analyze_image`, `mask_iou`) read a generated image back with plain pixel statistics; the
evaluation script and the tests use them.
"""

import dataclasses
import random

import numpy as np
import PIL.Image
import PIL.ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 30),
    "black": (15, 15, 15),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
ASPECTS = ("1:1", "2:1", "1:2")  # width:height


def aspect_size(aspect: str, target_size: int) -> tuple[int, int]:
    """(width, height) of an aspect ratio at a target size: 1:1 -> T x T, 2:1 -> (4T/3) x (2T/3), 1:2 the
    transpose. For T = 64 and 96 these are buckets of the image processor (64x32, 128x64, ...)."""
    if aspect == "1:1":
        return target_size, target_size
    long_side, short_side = (target_size * 4) // 3, (target_size * 2) // 3
    if target_size == 64:  # the 64 buckets are 64x32 / 32x64 (area limit 4 units)
        long_side, short_side = 64, 32
    return (long_side, short_side) if aspect == "2:1" else (short_side, long_side)


def caption_for(shape: str, color: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


@dataclasses.dataclass
class ShapeItem:
    shape: str
    color: str
    background: str
    aspect: str
    image: PIL.Image.Image
    mask: PIL.Image.Image

    @property
    def caption(self) -> str:
        return caption_for(self.shape, self.color, self.background)


def draw_shape(shape: str, color: str, background: str, size: tuple[int, int], rng: random.Random | None = None):
    """Draw one item; returns `(image, mask)` (RGB, same size). The shape is centred, its size 55-75% of
    the short side, shifted by up to 8% of each side when `rng` is given."""
    w, h = size
    rng = rng or random.Random(0)
    side = min(w, h) * rng.uniform(0.55, 0.75)
    cx = w / 2 + rng.uniform(-0.08, 0.08) * w
    cy = h / 2 + rng.uniform(-0.08, 0.08) * h
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    image = PIL.Image.new("RGB", size, COLORS[background])
    mask = PIL.Image.new("L", size, 0)
    for target, fill in ((image, COLORS[color]), (mask, 255)):
        d = PIL.ImageDraw.Draw(target)
        if shape == "circle":
            d.ellipse(box, fill=fill)
        elif shape == "square":
            d.rectangle(box, fill=fill)
        elif shape == "triangle":
            d.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
        else:
            raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}.")
    return image, mask.convert("RGB")


def make_item(index: int, seed: int = 0, target_size: int = 96, aspects=ASPECTS) -> ShapeItem:
    """Item `index` of the data set with this seed: uniform over shapes, colors, backgrounds != color and aspects."""
    rng = random.Random(f"{seed}-{index}")
    shape = rng.choice(SHAPES)
    color = rng.choice(list(COLORS))
    background = rng.choice([c for c in COLORS if c != color])
    aspect = rng.choice(list(aspects))
    image, mask = draw_shape(shape, color, background, aspect_size(aspect, target_size), rng)
    return ShapeItem(shape, color, background, aspect, image, mask)


# ---------------------------------------------------------------------------------------------- scoring
def nearest_color(rgb) -> str:
    rgb = np.asarray(rgb, dtype=np.float64)
    return min(COLORS, key=lambda name: float(((np.asarray(COLORS[name]) - rgb) ** 2).sum()))


def _color_labels(arr: np.ndarray) -> np.ndarray:
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=np.float64)
    d = ((arr[..., None, :].astype(np.float64) - palette) ** 2).sum(-1)
    return d.argmin(-1)


@dataclasses.dataclass
class ShapeAnalysis:
    background: str
    color: str | None
    shape: str | None
    fill_ratio: float
    mask: np.ndarray


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (a plain flood fill: these images are tiny, and scipy
    is not a runtime dependency)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, region = [(int(y0), int(x0))], []
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def analyze_image(image: PIL.Image.Image) -> ShapeAnalysis:
    """Read back background color (most common palette color on the border), shape color (most common other
    palette color inside) and shape kind from the fill ratio of the shape's bounding box: a square fills
    ~1.0, a circle ~0.785, a triangle ~0.5. The shape is the largest connected region of its color, so stray
    pixels elsewhere do not stretch the box; a region under 2% of the image counts as no shape."""
    arr = np.asarray(image.convert("RGB"))
    labels = _color_labels(arr)
    names = list(COLORS)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg = int(np.bincount(border, minlength=len(names)).argmax())
    fg_mask = labels != bg
    if fg_mask.sum() < 0.02 * labels.size:
        return ShapeAnalysis(names[bg], None, None, 0.0, fg_mask)
    color = int(np.bincount(labels[fg_mask], minlength=len(names)).argmax())
    shape_mask = largest_component(labels == color)
    if shape_mask.sum() < 0.02 * labels.size:
        return ShapeAnalysis(names[bg], names[color], None, 0.0, shape_mask)
    ys, xs = np.nonzero(shape_mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = float(shape_mask.sum() / box)
    kind = "square" if fill > 0.9 else ("circle" if fill > 0.64 else "triangle")
    return ShapeAnalysis(names[bg], names[color], kind, fill, shape_mask)


def mask_iou(predicted: PIL.Image.Image, truth: PIL.Image.Image) -> float:
    """IoU of the bright pixels (> 127 in luminance) of two mask images of the same size."""
    a = np.asarray(predicted.convert("L")) > 127
    b = np.asarray(truth.convert("L")) > 127
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


__all__ = [
    "ASPECTS",
    "COLORS",
    "SHAPES",
    "ShapeItem",
    "analyze_image",
    "aspect_size",
    "caption_for",
    "draw_shape",
    "largest_component",
    "make_item",
    "mask_iou",
    "nearest_color",
]
