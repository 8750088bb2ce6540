"""The events a demo request streams while it runs: `Waiting` (place in the queue), `Progress` (image tokens,
with a row-by-row preview), `ChatProgress` (the answer so far), then one result (`TextToImageResult`,
`OmniResult` or `ChatResult`). Plain data: no Gradio, no model."""

import dataclasses

import PIL.Image


@dataclasses.dataclass
class Waiting:
    """The request is queued behind `ahead` others."""

    ahead: int


@dataclasses.dataclass
class Progress:
    """Image tokens: `step` of `total` done, `rows_done` of `rows` grid rows complete; `preview` (when not None)
    is the image decoded from the complete rows, the rest left gray, at the final size."""

    step: int
    total: int
    rows_done: int
    rows: int
    preview: PIL.Image.Image | None = None


@dataclasses.dataclass
class ChatProgress:
    """The answer so far: `text` (finished images shown as `<|image|>`) and, while the model draws an image,
    `drawing` = image tokens written so far."""

    text: str
    drawing: int | None = None


@dataclasses.dataclass
class GeneratedImage:
    image: PIL.Image.Image
    seed: int
    caption: str


@dataclasses.dataclass
class TextToImageResult:
    """`images` (empty when stopped), the `settings` used (seed of the first image included) and `seconds`."""

    images: list[GeneratedImage]
    settings: dict
    seconds: float
    stopped: bool = False


@dataclasses.dataclass
class OmniResult:
    task: str
    image: PIL.Image.Image | None
    text: str | None
    seed: int
    seconds: float
    stopped: bool = False


@dataclasses.dataclass
class ChatResult:
    """The assistant's turn as chat content parts (`{"type": "text", "text"}` / `{"type": "image", "image"}`), and
    one message per image span the model left malformed (dropped from the parts)."""

    parts: list[dict]
    errors: list[str]
    seconds: float
    stopped: bool = False


__all__ = [
    "ChatProgress",
    "ChatResult",
    "GeneratedImage",
    "OmniResult",
    "Progress",
    "TextToImageResult",
    "Waiting",
]
