"""What a demo user may ask for: the limits, the examples, and the checks that turn a bad request into a
`DemoInputError` whose message is meant for that user."""


import ipaddress
import logging
import os
import random
import re
from fractions import Fraction

import PIL.Image

from ..image_processing_lumina_mgpt import to_pil
from ..pipeline_lumina_mgpt import IMAGE_TASKS, TEXT_TASKS

logger = logging.getLogger(__name__)
TASKS = IMAGE_TASKS + TEXT_TASKS
# Omni tasks that need a line of text besides the image, and what that text is
TASK_TEXT = {"editing": "instruction", "condition": "caption", "detection": "object to detect"}
MAX_FILE_SIZE = "10mb"  # uploads above this are refused by the server before they reach the app
MAX_IMAGE_PIXELS = 40_000_000  # a larger (decompressed) input image is refused
MAX_PROMPT_CHARS = 2000
MAX_IMAGES = 8  # per text-to-image request
MAX_CANDIDATES = 16
MAX_BATCH_IMAGES = 16  # images (before candidates) that one batched pipeline call may hold
MAX_SEED = 2**31 - 1
PREVIEW_INTERVAL_S = 0.3  # at most one row-by-row preview decode per this many seconds (and per finished row)
EMIT_INTERVAL_S = 0.1  # at most one progress event per this many seconds between previews

NANO_EXAMPLES = [
    ["a red circle on a blue background", "96x96"],
    ["a yellow triangle on a black background", "128x64"],
    ["a white square on a green background", "64x128"],
    ["a blue circle on a white background", "96x96"],
    ["a green triangle on a yellow background", "96x96"],
]
GENERIC_EXAMPLES = [
    ["a lighthouse on a cliff at dusk, oil painting", None],
    ["a red fox in the snow, photograph", None],
    ["a bowl of ramen, studio lighting", None],
]
NANO_CHAT_EXAMPLES = [
    "Generate an image of 96x96 according to the following prompt:\na yellow circle on a green background",
]


class DemoInputError(ValueError):
    """What a user asked for cannot be done (empty prompt, size outside the buckets, not an image, ...). The
    message is written for that user and shown as is."""


# ---------------------------------------------------------------------------------------------- helpers
def aspect_label(width: int, height: int) -> str:
    """`"3:2 (96x64)"`: the reduced aspect ratio (width:height) and the size in pixels."""
    r = Fraction(width, height)
    return f"{r.numerator}:{r.denominator} ({width}x{height})"


def size_choices(image_processor) -> list[tuple[str, str]]:
    """The model's buckets as dropdown choices `(label, "WxH")`, square first, then by aspect ratio."""
    buckets = sorted(image_processor.bucket_sizes, key=lambda s: (s[0] != s[1], -s[0] / s[1]))
    return [(aspect_label(w, h), f"{w}x{h}") for w, h in buckets]


def parse_size(value, image_processor) -> tuple[int, int]:
    """`"96x64"` (or a dropdown label holding it, or a `(w, h)` pair) -> `(width, height)`, one of the buckets."""
    buckets = image_processor.bucket_sizes
    if isinstance(value, (tuple, list)) and len(value) == 2:
        w, h = int(value[0]), int(value[1])
    else:
        found = re.findall(r"(\d+)\s*[x×X*]\s*(\d+)", str(value or ""))
        if not found:
            raise DemoInputError(
                f"Size {value!r} is not WIDTHxHEIGHT; pick one of this model's sizes: "
                f"{', '.join(f'{w}x{h}' for w, h in buckets)}."
            )
        w, h = int(found[-1][0]), int(found[-1][1])
    if (w, h) not in buckets:
        raise DemoInputError(
            f"{w}x{h} is not one of this model's sizes: {', '.join(f'{bw}x{bh}' for bw, bh in buckets)}."
        )
    return w, h


def resolve_seed(value) -> int:
    """A seed from the seed field: empty, "random" or -1 draw one; otherwise an integer in 0..2**31-1."""
    if value is None:
        return random.randint(0, MAX_SEED)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = str(int(value)) if float(value).is_integer() else str(value)
    else:
        text = str(value).strip().lower()
    if text in ("", "random", "-1"):
        return random.randint(0, MAX_SEED)
    try:
        seed = int(text)
    except ValueError:
        raise DemoInputError(f"Seed {value!r} is not a whole number: use 0 to {MAX_SEED}, or 'random'.") from None
    if not 0 <= seed <= MAX_SEED:
        raise DemoInputError(f"Seed {seed} is out of range: use 0 to {MAX_SEED}, or 'random'.")
    return seed


def bounded_number(value, name: str, lo: float, hi: float, integer: bool = False):
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} must be a number, got {value!r}.") from None
    if integer and not x.is_integer():
        raise DemoInputError(f"{name} must be a whole number, got {value!r}.")
    if not lo <= x <= hi:
        raise DemoInputError(f"{name} must be between {lo:g} and {hi:g}, got {x:g}.")
    return int(x) if integer else x


def load_image(value) -> PIL.Image.Image:
    """An uploaded image as PIL: a PIL image, a file path, or Gradio's file payload (a dict with "path")."""
    if value is None:
        raise DemoInputError("No image given.")
    if isinstance(value, dict):
        value = value.get("path") or value.get("name")
    elif hasattr(value, "path") and not isinstance(value, PIL.Image.Image):
        value = value.path
    if isinstance(value, PIL.Image.Image):
        image = value
    elif not isinstance(value, (str, os.PathLike)):  # an array or a tensor
        try:
            image = to_pil(value)
        except ValueError as err:
            raise DemoInputError(f"The image could not be read: {err}") from None
    else:
        if not os.path.isfile(value):
            raise DemoInputError("The upload did not arrive: upload the image again.")
        try:
            with PIL.Image.open(value) as probe:  # the header alone: refuse huge images before decoding them
                w, h = probe.size
        except (OSError, PIL.UnidentifiedImageError, ValueError):
            raise DemoInputError(
                f"The upload ({os.path.basename(os.fspath(value))}) is not an image this app can read: "
                "use a PNG, JPEG, WebP, GIF or BMP file."
            ) from None
        if w * h > MAX_IMAGE_PIXELS:
            raise DemoInputError(f"The image is {w}x{h} pixels; the limit is {MAX_IMAGE_PIXELS // 1_000_000} megapixels.")
        try:
            image = to_pil(value)
        except ValueError:
            raise DemoInputError(
                f"The upload ({os.path.basename(os.fspath(value))}) is not an image this app can read: "
                "use a PNG, JPEG, WebP, GIF or BMP file."
            ) from None
    if image.size[0] * image.size[1] > MAX_IMAGE_PIXELS:
        raise DemoInputError(f"The image is {image.size[0]}x{image.size[1]} pixels; the limit is "
                             f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels.")
    return image


def exposure_notice(host: str, share: bool) -> str | None:
    """What to tell the operator (and the page) when the app is reachable beyond this machine, else None."""
    notes = []
    if share:
        notes.append("--share is on: Gradio publishes this app at a public *.gradio.live address; anyone with the "
                     "link can use the model on this machine.")
    public = False
    if host in ("", "0.0.0.0", "::"):
        public = True
    elif host != "localhost":
        try:
            public = not ipaddress.ip_address(host).is_loopback
        except ValueError:  # a host name: assume it resolves beyond loopback
            public = True
    if public:
        where = "every network interface" if host in ("", "0.0.0.0", "::") else host
        notes.append(f"The app listens on {where}: other machines that can reach it can use the model.")
    return " ".join(notes) or None


def is_nano_pipeline(pipe) -> bool:
    """True when `pipe` was loaded from the shipped nano weights."""
    from ..nano import WEIGHTS_DIR

    path = getattr(pipe, "name_or_path", None)
    try:
        return bool(path) and os.path.samefile(path, WEIGHTS_DIR)
    except OSError:
        return False


def nano_example_images() -> list[str]:
    """Paths of a few ground-truth nano shapes shipped with the package (the Omni tab's examples)."""
    from ..nano import EXAMPLES_DIR

    return sorted(os.path.join(EXAMPLES_DIR, name) for name in os.listdir(EXAMPLES_DIR) if name.endswith(".png"))

