"""`lumina_hf.demo`: a Gradio web app for a `LuminaMGPTPipeline` (text to image, Omni tasks, chat).

Two layers, so the logic is testable without a browser and without Gradio installed:

- `DemoEngine` (no Gradio): validates what a user asked for (a bad request raises `DemoInputError`, whose
  message is meant for that user), queues the work and runs it on one worker thread that owns the pipeline, so
  concurrent requests never touch the model at once. Compatible text-to-image requests that wait together are
  run as one batch. Each request is followed as a stream of events: `Waiting`, `Progress` (tokens done, with the
  image decoded row by row), `ChatProgress` (text so far), then its result or its error.
- `build_demo(pipe) -> gradio.Blocks` (needs `pip install "lumina-hf[demo]"`): the tabs, wired to an engine.
  `launch()` serves it with the app's upload limit; `lumina-hf demo` is the command line for both.

A user's error is shown to that user as one line (never a traceback); anything unexpected is logged with its
traceback on the server, shown as a one-line message, and the app keeps serving.
"""

from .app import build_demo, launch
from .engine import DemoEngine
from .events import ChatProgress, ChatResult, OmniResult, Progress, TextToImageResult, Waiting
from .inputs import (
    MAX_FILE_SIZE,
    DemoInputError,
    aspect_label,
    exposure_notice,
    load_image,
    parse_size,
    resolve_seed,
    size_choices,
)

__all__ = [
    "ChatProgress",
    "ChatResult",
    "DemoEngine",
    "DemoInputError",
    "MAX_FILE_SIZE",
    "OmniResult",
    "Progress",
    "TextToImageResult",
    "Waiting",
    "aspect_label",
    "build_demo",
    "exposure_notice",
    "launch",
    "load_image",
    "parse_size",
    "resolve_seed",
    "size_choices",
]
