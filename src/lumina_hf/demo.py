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

import dataclasses
import inspect
import ipaddress
import itertools
import logging
import os
import queue
import random
import re
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import PIL.Image
import torch

from .generation_lumina_mgpt import UniRepLogitsProcessor
from .image_processing_lumina_mgpt import to_pil
from .pipeline_lumina_mgpt import IMAGE_TASKS, TEXT_TASKS
from .processing_lumina_mgpt import IMAGE_MARKER

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


# ---------------------------------------------------------------------------------------------- events
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


@dataclasses.dataclass
class _Failed:
    error: BaseException


@dataclasses.dataclass
class _Done:
    result: Any


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


def _number(value, name: str, lo: float, hi: float, integer: bool = False):
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
    from .nano import WEIGHTS_DIR

    path = getattr(pipe, "name_or_path", None)
    try:
        return bool(path) and os.path.samefile(path, WEIGHTS_DIR)
    except OSError:
        return False


def nano_example_images() -> list[str]:
    """Paths of a few ground-truth nano shapes shipped with the package (the Omni tab's examples)."""
    from .nano import EXAMPLES_DIR

    return sorted(os.path.join(EXAMPLES_DIR, name) for name in os.listdir(EXAMPLES_DIR) if name.endswith(".png"))


# ---------------------------------------------------------------------------------------------- engine
class _Job:
    _ids = itertools.count(1)

    def __init__(self, kind: str, params: dict, session: str | None):
        self.id = next(self._ids)
        self.kind, self.params, self.session = kind, params, session
        self.events: queue.Queue = queue.Queue()
        self.stop = threading.Event()


class DemoEngine:
    """Owns a pipeline and runs every request on one worker thread, in arrival order (a model is not
    thread-safe). Text-to-image requests that wait together with the same size and sampling settings run as one
    batched pipeline call (each image keeps its own seed, so its result does not depend on the batch).

    Each public method validates its arguments at once (raising `DemoInputError`) and returns an iterator of
    events: `Waiting`, `Progress` / `ChatProgress`, and last the result (`TextToImageResult`, `OmniResult`,
    `ChatResult`). An error of the request is raised from the iterator: `DemoInputError` for a problem with the
    request (the pipeline's own `ValueError`s included), anything else as it happened. Closing the iterator early
    (the user left) stops the request. `stop(session)` stops the running and waiting requests of a session."""

    def __init__(self, pipe, *, preview_interval: float = PREVIEW_INTERVAL_S):
        self.pipe = pipe
        self.preview_interval = preview_interval
        self._pending: list[_Job] = []
        self._running: list[_Job] = []
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False
        params = inspect.signature(pipe.__call__).parameters
        self.supports_speculative = "speculative_window" in params

    # ------------------------------------------------------------------ defaults and limits
    @property
    def image_processor(self):
        return self.pipe.processor.image_processor

    def default(self, name: str, task: str | None = None):
        """The pipeline's default for a sampling setting ("guidance_scale", "image_top_k", "temperature",
        "num_candidates", "text_top_k"): the model's generation_config, else the reference's value."""
        return self.pipe._default(name, task)

    @property
    def default_size(self) -> str:
        t = self.image_processor.target_size
        return f"{t}x{t}" if (t, t) in self.image_processor.bucket_sizes else size_choices(self.image_processor)[0][1]

    @property
    def num_codes(self) -> int:
        return int(self.pipe.model.model.image_code_to_id.numel())

    def image_tokens(self, width: int, height: int) -> int:
        """Tokens of a `width x height` image span (start, two size tokens, the rows with their ends, end)."""
        return self.pipe.model.config.unirep.span_length(height, width)

    @property
    def default_max_new_tokens(self) -> int:
        t = self.image_processor.target_size
        return 256 + self.image_tokens(t, t)

    # ------------------------------------------------------------------ requests
    def text_to_image(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        size=None,
        guidance_scale=None,
        top_k=None,
        temperature=None,
        seed="random",
        num_images=1,
        num_candidates=None,
        speculative_window=None,
        session: str | None = None,
    ) -> Iterator:
        """Generate `num_images` images of `prompt` (seeds `seed`, `seed + 1`, ...)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise DemoInputError("Write a prompt first: describe the image to generate.")
        prompt = prompt.strip()
        if len(prompt) > MAX_PROMPT_CHARS:
            raise DemoInputError(f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}.")
        negative = negative_prompt.strip() if isinstance(negative_prompt, str) else None
        if negative and len(negative) > MAX_PROMPT_CHARS:
            raise DemoInputError(f"The negative prompt is longer than {MAX_PROMPT_CHARS} characters.")
        width, height = parse_size(size if size not in (None, "") else self.default_size, self.image_processor)
        params = dict(
            prompt=prompt,
            negative_prompt=negative or None,
            width=width,
            height=height,
            guidance_scale=self.default("guidance_scale") if guidance_scale is None else _number(guidance_scale, "Guidance scale", 0, 50),
            top_k=self.default("image_top_k") if top_k is None else _number(top_k, "Top-k", 1, self.num_codes, integer=True),
            temperature=self.default("temperature") if temperature is None else _number(temperature, "Temperature", 0.01, 5),
            seed=resolve_seed(seed),
            num_images=_number(num_images, "Number of images", 1, MAX_IMAGES, integer=True),
            num_candidates=self.default("num_candidates") if num_candidates is None else _number(num_candidates, "Candidates", 1, MAX_CANDIDATES, integer=True),
        )
        if speculative_window not in (None, "", 0):
            if not self.supports_speculative:
                raise DemoInputError("This pipeline has no speculative decoding: leave the speculative window empty.")
            params["speculative_window"] = _number(speculative_window, "Speculative window", 1, 64, integer=True)
        return self._follow(self._submit("t2i", params, session))

    def omni(self, image, task: str, text: str | None = None, seed="random", session: str | None = None) -> Iterator:
        """Run an Omni task on an input image: an image out (depth, segmentation, ...), or text ("describe")."""
        if task not in TASKS:
            raise DemoInputError(f"Pick a task: one of {', '.join(TASKS)}.")
        if image is None or (isinstance(image, str) and not image) or (
            isinstance(image, dict) and not (image.get("path") or image.get("name"))
        ):
            raise DemoInputError(f"Upload an image first: the {task} task works on an input image.")
        text = text.strip() if isinstance(text, str) else ""
        if task in TASK_TEXT and not text:
            raise DemoInputError(f"The {task} task needs its {TASK_TEXT[task]}: write it in the text field.")
        if len(text) > MAX_PROMPT_CHARS:
            raise DemoInputError(f"The text is longer than {MAX_PROMPT_CHARS} characters.")
        pil = load_image(image)
        min_side = self.image_processor.min_side
        if min(pil.size) < min_side:
            raise DemoInputError(f"The image is {pil.size[0]}x{pil.size[1]}: sides under {min_side} px are too small.")
        params = dict(image=pil, task=task, text=text if task in TASK_TEXT else None, seed=resolve_seed(seed))
        return self._follow(self._submit("omni", params, session))

    def chat(
        self,
        history: list[dict],
        text: str | None,
        images=(),
        max_new_tokens=None,
        temperature=None,
        top_k=None,
        seed="random",
        session: str | None = None,
    ) -> Iterator:
        """Answer the user's new turn (`text` and `images`) after `history`, a list of chat messages
        `{"role": "user"|"assistant", "content": [parts]}` with parts `{"type": "text", "text"}` or
        `{"type": "image", "image": PIL}`. The final `ChatResult.parts` is the assistant's turn."""
        text = text.strip() if isinstance(text, str) else ""
        loaded = [load_image(im) for im in (images or [])]
        if not text and not loaded:
            raise DemoInputError("Write a message (or attach an image) first.")
        if len(text) > MAX_PROMPT_CHARS:
            raise DemoInputError(f"The message is longer than {MAX_PROMPT_CHARS} characters.")
        # the text first, then the images: the order of the Omni training data ("Describe the image. <|image|>")
        content = ([{"type": "text", "text": text}] if text else []) + [{"type": "image", "image": im} for im in loaded]
        messages = [*history, {"role": "user", "content": content}]
        t = self.image_processor.target_size
        params = dict(
            messages=messages,
            max_new_tokens=self.default_max_new_tokens if max_new_tokens is None else _number(
                max_new_tokens, "Max new tokens", 1, 8 * self.image_tokens(t, t) + 4096, integer=True),
            temperature=self.default("temperature") if temperature is None else _number(temperature, "Temperature", 0.01, 5),
            text_top_k=self.default("text_top_k") if top_k is None else _number(top_k, "Text top-k", 1, 65536, integer=True),
            seed=resolve_seed(seed),
        )
        return self._follow(self._submit("chat", params, session))

    def stop(self, session: str | None) -> int:
        """Stop the requests of `session` (None: those submitted without one): a waiting one leaves the queue at
        once, a running one at its next token. Returns how many were stopped."""
        with self._cond:
            waiting = [j for j in self._pending if j.session == session]
            running = [j for j in self._running if j.session == session]
            for j in waiting:
                self._pending.remove(j)
        for j in waiting + running:
            j.stop.set()
        for j in waiting:
            j.events.put(_Done(self._stopped_result(j)))
        return len(waiting) + len(running)

    def close(self) -> None:
        """Stop every request and the worker thread."""
        with self._cond:
            self._closed = True
            for j in self._pending + self._running:
                j.stop.set()
            self._cond.notify_all()

    # ------------------------------------------------------------------ queue
    def _submit(self, kind: str, params: dict, session: str | None) -> _Job:
        job = _Job(kind, params, session)
        with self._cond:
            if self._closed:
                raise RuntimeError("the demo engine is closed.")
            self._pending.append(job)
            ahead = len(self._pending) - 1 + len(self._running)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work_loop, name="lumina-demo-worker", daemon=True)
                self._worker.start()
            self._cond.notify_all()
        if ahead:
            job.events.put(Waiting(ahead))
        return job

    def _follow(self, job: _Job) -> Iterator:
        """Yield the events of a job; raise its error; stop it when the consumer goes away early."""
        try:
            while True:
                item = job.events.get()
                if isinstance(item, _Done):
                    yield item.result
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            job.stop.set()

    def _take_batch(self) -> list[_Job]:
        """The next job, plus the waiting text-to-image jobs it can share a pipeline call with."""
        head = self._pending.pop(0)
        if head.kind != "t2i":
            return [head]
        key = self._batch_key(head.params)
        batch, n = [head], head.params["num_images"]
        for job in list(self._pending):
            if job.kind == "t2i" and self._batch_key(job.params) == key and n + job.params["num_images"] <= MAX_BATCH_IMAGES:
                self._pending.remove(job)
                batch.append(job)
                n += job.params["num_images"]
        return batch

    @staticmethod
    def _batch_key(p: dict) -> tuple:
        return (p["width"], p["height"], p["guidance_scale"], p["top_k"], p["temperature"], p["num_candidates"],
                p["negative_prompt"] is None, p.get("speculative_window"))

    def _work_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for j in self._pending:
                        j.events.put(_Failed(RuntimeError("the demo was shut down.")))
                    self._pending.clear()
                    return
                batch = self._take_batch()
                # drop the ones stopped while they waited
                stopped = [j for j in batch if j.stop.is_set()]
                batch = [j for j in batch if not j.stop.is_set()]
                self._running = batch
                for ahead, j in enumerate(self._pending):
                    j.events.put(Waiting(ahead + len(batch)))
            for j in stopped:
                j.events.put(_Done(self._stopped_result(j)))
            try:
                if batch:
                    self._run(batch)
            except BaseException as err:  # the worker must survive anything one request does
                logger.exception("demo request failed")
                for j in batch:
                    j.events.put(_Failed(err))
            finally:
                with self._cond:
                    self._running = []

    @staticmethod
    def _stopped_result(job: _Job):
        p = job.params
        if job.kind == "t2i":
            return TextToImageResult([], _settings(p), 0.0, stopped=True)
        if job.kind == "omni":
            return OmniResult(p["task"], None, None, p["seed"], 0.0, stopped=True)
        return ChatResult([], [], 0.0, stopped=True)

    def _run(self, batch: list[_Job]) -> None:
        kind = batch[0].kind
        try:
            if kind == "t2i":
                results = self._run_text_to_image(batch)
                for j, r in zip(batch, results):
                    j.events.put(_Done(r))
                return
            job = batch[0]
            result = self._run_omni(job) if kind == "omni" else self._run_chat(job)
            job.events.put(_Done(result))
        except ValueError as err:
            if kind == "t2i" and len(batch) > 1:  # one request of a batch may be the culprit: run each alone
                for j in batch:
                    self._run([j])
                return
            logger.info("demo request refused: %s", err)
            message = str(err)
            for j in batch:
                j.events.put(_Failed(err if isinstance(err, DemoInputError) else DemoInputError(message)))

    # ------------------------------------------------------------------ progress with a row-by-row preview
    def _progress_callback(self, jobs_rows: list[tuple[_Job, int]], width: int, height: int):
        """A pipeline `callback_on_step_end` that sends each job `Progress` (with the complete rows of its first
        image decoded) and interrupts the pipeline once every job of the call is stopped. `jobs_rows` pairs
        each job with the batch row of its first image."""
        layout = self.pipe.model.config.unirep
        rows, cols = layout.grid_shape(height, width)
        total = layout.grid_length(rows, cols)
        state = {"rows": 0, "preview_t": 0.0, "emit_t": 0.0}

        def callback(p, step, timestep, kwargs):
            if all(j.stop.is_set() for j, _ in jobs_rows):
                p._interrupt = True
                return {}
            tokens = kwargs.get("tokens")
            done = min((step + 1) // (cols + 1), rows)
            now = time.monotonic()
            previews: dict[int, PIL.Image.Image] = {}
            if tokens is not None and done > state["rows"] and (
                done == rows or now - state["preview_t"] >= self.preview_interval
            ):
                for j, row in jobs_rows:
                    previews[j.id] = self._decode_rows(tokens[row], done, rows, cols)
                state["rows"], state["preview_t"] = done, now
            if previews or step + 1 == total or now - state["emit_t"] >= EMIT_INTERVAL_S:
                state["emit_t"] = now
                for j, _ in jobs_rows:
                    if not j.stop.is_set():
                        j.events.put(Progress(step + 1, total, done, rows, previews.get(j.id)))
            return {}

        return callback

    def _decode_rows(self, tokens: torch.Tensor, done: int, rows: int, cols: int) -> PIL.Image.Image:
        """The first `done` rows of one image's tokens (codes then a row-end token per row) decoded, on a gray
        canvas of the final size."""
        model, proc = self.pipe.model, self.pipe.processor
        f = model.vqmodel.downsample_factor
        canvas = PIL.Image.new("RGB", (cols * f, rows * f), (128, 128, 128))
        grid = tokens[: done * (cols + 1)].reshape(done, cols + 1)[:, :cols]
        with torch.no_grad():
            pixels = model.decode_image_tokens(grid.unsqueeze(0).to(model.device))
        canvas.paste(proc.image_processor.postprocess(pixels, "pil")[0], (0, 0))
        return canvas

    def _generators(self, seeds: list[int]) -> list[torch.Generator]:
        device = "cuda" if self.pipe.model.device.type == "cuda" else "cpu"
        return [torch.Generator(device).manual_seed(s) for s in seeds]

    # ------------------------------------------------------------------ the three kinds of work
    def _run_text_to_image(self, batch: list[_Job]) -> list[TextToImageResult]:
        p0 = batch[0].params
        prompts, negatives, seeds, jobs_rows = [], [], [], []
        nc = p0["num_candidates"]
        for j in batch:
            p = j.params
            jobs_rows.append((j, len(prompts) * nc))
            for i in range(p["num_images"]):
                prompts.append(p["prompt"])
                negatives.append(p["negative_prompt"])
                seeds.append(p["seed"] + i)
        extra = {"speculative_window": p0["speculative_window"]} if p0.get("speculative_window") else {}
        logger.info("text to image: %d request(s), %d image(s) at %dx%d", len(batch), len(prompts), p0["width"], p0["height"])
        start = time.monotonic()
        out = self.pipe(
            prompt=prompts,
            negative_prompt=None if negatives[0] is None else negatives,
            height=p0["height"],
            width=p0["width"],
            guidance_scale=p0["guidance_scale"],
            top_k=p0["top_k"],
            temperature=p0["temperature"],
            generator=self._generators(seeds),
            num_candidates=nc,
            callback_on_step_end=self._progress_callback(jobs_rows, p0["width"], p0["height"]),
            callback_on_step_end_tensor_inputs=["tokens"],
            **extra,
        )
        seconds = time.monotonic() - start
        results, at = [], 0
        for j in batch:
            p = j.params
            n = p["num_images"]
            if j.stop.is_set() or not out.images:
                results.append(TextToImageResult([], _settings(p), seconds, stopped=True))
            else:
                images = [
                    GeneratedImage(img, p["seed"] + i, _caption(p, p["seed"] + i))
                    for i, img in enumerate(out.images[at : at + n])
                ]
                results.append(TextToImageResult(images, _settings(p), seconds))
            at += n
        return results

    def _run_omni(self, job: _Job) -> OmniResult:
        p = job.params
        start = time.monotonic()
        gen = self._generators([p["seed"]])
        if p["task"] in TEXT_TASKS:
            out = self.pipe(image=p["image"], task=p["task"], generator=gen)
            return OmniResult(p["task"], None, out.text[0], p["seed"], time.monotonic() - start)
        w, h = self.image_processor.select_bucket(*p["image"].size)
        out = self.pipe(
            prompt=p["text"],
            image=p["image"],
            task=p["task"],
            generator=gen,
            callback_on_step_end=self._progress_callback([(job, 0)], w, h),
            callback_on_step_end_tensor_inputs=["tokens"],
        )
        if job.stop.is_set() or not out.images:
            return OmniResult(p["task"], None, None, p["seed"], time.monotonic() - start, stopped=True)
        return OmniResult(p["task"], out.images[0], None, p["seed"], time.monotonic() - start)

    def _run_chat(self, job: _Job) -> ChatResult:
        from transformers import StoppingCriteria, StoppingCriteriaList

        p = job.params
        pipe, proc, model = self.pipe, self.pipe.processor, self.pipe.model
        cfg = model.config
        inputs = proc.apply_chat_template(p["messages"], vq_model=model)
        prompt_len = inputs["input_ids"].shape[1]
        if prompt_len + p["max_new_tokens"] > cfg.max_position_embeddings:
            raise DemoInputError(
                f"The conversation is {prompt_len} tokens; with {p['max_new_tokens']} new tokens it exceeds the model's "
                f"context of {cfg.max_position_embeddings}: clear the chat or lower the maximum of new tokens."
            )
        engine = self

        class _Stream(StoppingCriteria):
            """Sends the answer so far to the job (at most every EMIT_INTERVAL_S) and stops when asked to."""

            def __init__(self):
                self.last = 0.0

            def __call__(self, input_ids, scores, **kwargs):
                now = time.monotonic()
                if now - self.last >= EMIT_INTERVAL_S:
                    self.last = now
                    job.events.put(engine._chat_progress(input_ids[0, prompt_len:].tolist()))
                return torch.full((input_ids.shape[0],), job.stop.is_set(), dtype=torch.bool, device=input_ids.device)

        start = time.monotonic()
        torch.manual_seed(p["seed"])
        out = model.generate(
            input_ids=inputs["input_ids"].to(model.device),
            attention_mask=inputs["attention_mask"].to(model.device),
            max_new_tokens=p["max_new_tokens"],
            do_sample=True,
            temperature=p["temperature"],
            top_k=None,
            guidance_scale=1.0,  # guidance is for the pipeline's images; text is sampled plainly
            logits_processor=[UniRepLogitsProcessor(cfg, pipe._default("image_top_k", None), p["text_top_k"])],
            stopping_criteria=StoppingCriteriaList([_Stream()]),
            eos_token_id=cfg.separator_token_id,
            pad_token_id=cfg.pad_token_id,
        )
        new = out[0, prompt_len:].tolist()
        while new and new[-1] in (cfg.separator_token_id, cfg.pad_token_id):
            new.pop()
        item = proc.postprocess_generation([new], model=model)[0]
        parts = []
        pieces = item.text.split(IMAGE_MARKER)
        for k, piece in enumerate(pieces):
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
            if k < len(item.images):
                parts.append({"type": "image", "image": item.images[k]})
        return ChatResult(parts, item.errors, time.monotonic() - start, stopped=job.stop.is_set())

    def _chat_progress(self, ids: list[int]) -> ChatProgress:
        cfg = self.pipe.model.config
        start, end = cfg.image_start_token_id, cfg.image_end_token_id
        last_start = max((i for i, t in enumerate(ids) if t == start), default=-1)
        last_end = max((i for i, t in enumerate(ids) if t == end), default=-1)
        drawing = len(ids) - last_start - 1 if last_start > last_end else None
        return ChatProgress(self.pipe.processor.decode(ids), drawing)


def _settings(p: dict) -> dict:
    keys = ("prompt", "negative_prompt", "width", "height", "guidance_scale", "top_k", "temperature", "seed",
            "num_images", "num_candidates", "speculative_window")
    return {k: p[k] for k in keys if p.get(k) is not None}


def _caption(p: dict, seed: int) -> str:
    text = (f"seed {seed} · {p['width']}x{p['height']} · guidance {p['guidance_scale']:g} · top-k {p['top_k']} · "
            f"temperature {p['temperature']:g}")
    if p["num_candidates"] > 1:
        text += f" · best of {p['num_candidates']}"
    if p.get("speculative_window"):
        text += f" · speculative window {p['speculative_window']}"
    return text


# ---------------------------------------------------------------------------------------------- Gradio layer
def progress_html(event: Progress | Waiting | None, note: str = "") -> str:
    """The status line above the result: a progress bar over image tokens, or the place in the queue."""
    if isinstance(event, Waiting):
        return f'<div class="lumina-status">Waiting for the model: {event.ahead} request(s) ahead. {note}</div>'
    if isinstance(event, Progress):
        pct = 100.0 * event.step / max(event.total, 1)
        return (
            f'<div class="lumina-status"><progress max="{event.total}" value="{event.step}" style="width:100%">'
            f"{pct:.0f}%</progress><br>token {event.step}/{event.total} · row {event.rows_done}/{event.rows} {note}</div>"
        )
    return f'<div class="lumina-status">{note}</div>'


def settings_markdown(result: TextToImageResult) -> str:
    """A table of each image's seed and settings."""
    if result.stopped:
        return "Stopped: no image was finished."
    s = result.settings
    lines = [
        f"**{len(result.images)} image(s) in {result.seconds:.1f} s** · prompt: {s['prompt']}"
        + (f" · negative: {s['negative_prompt']}" if s.get("negative_prompt") else ""),
        "",
        "| # | seed | size | guidance | top-k | temperature | candidates |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, g in enumerate(result.images):
        lines.append(f"| {i + 1} | {g.seed} | {s['width']}x{s['height']} | {s['guidance_scale']:g} | {s['top_k']} | "
                     f"{s['temperature']:g} | {s['num_candidates']} |")
    return "\n".join(lines)


def _session(request) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def _as_user_error(gr, err: BaseException):
    """The one-line message for a failed request: the request's own problem as is, anything else as a short
    internal error (its traceback goes to the server log)."""
    if isinstance(err, DemoInputError):
        return gr.Error(str(err), print_exception=False)
    # the engine's worker has logged the traceback of a failure inside the model call
    logger.error("demo request failed: %s: %s", type(err).__name__, err)
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return gr.Error(f"The request failed ({type(err).__name__}{': ' + first if first else ''}). "
                    "The app is still running; see the server log for details.", print_exception=False)


def build_demo(pipe, *, title: str = "Lumina-mGPT", notice: str | None = None, examples=None, engine: DemoEngine | None = None):
    """The Gradio app for `pipe`: tabs "Text to image", "Omni" and "Chat", with its queue set up (one worker
    runs the model; up to 16 requests in the queue per event). `notice` is shown as a banner (the command line
    passes the exposure warning for --share or a public host). `examples`: text-to-image examples as
    `[prompt, size]` rows (default: the nano model's, when `pipe` is the nano model). Needs Gradio
    (`pip install "lumina-hf[demo]"`). Serve it with `launch()` (which sets the upload limit) or with
    `.launch(max_file_size=MAX_FILE_SIZE)`."""
    try:
        import gradio as gr
    except ImportError as err:
        raise ImportError('the demo needs Gradio: pip install "lumina-hf[demo]"') from err

    engine = engine or DemoEngine(pipe)
    nano = is_nano_pipeline(pipe)
    if examples is None:
        examples = NANO_EXAMPLES if nano else GENERIC_EXAMPLES
    ip = engine.image_processor
    choices = size_choices(ip)

    # ------------------------------------------------------------------ callbacks (generators: streamed)
    def generate(prompt, negative_prompt, size, guidance, top_k, temperature, seed, num_images, num_candidates,
                 speculative_window, request: gr.Request):
        try:
            events = engine.text_to_image(prompt, negative_prompt, size, guidance, top_k, temperature, seed,
                                          num_images, num_candidates, speculative_window, session=_session(request))
            yield progress_html(None, "Starting…"), None, gr.skip(), gr.skip()
            for ev in events:
                if isinstance(ev, TextToImageResult):
                    if ev.stopped:
                        gr.Warning("Stopped.")
                        yield progress_html(None, "Stopped."), gr.skip(), gr.skip(), settings_markdown(ev)
                    else:
                        gallery = [(g.image, g.caption) for g in ev.images]
                        yield (progress_html(None, f"Done in {ev.seconds:.1f} s."), ev.images[0].image, gallery,
                               settings_markdown(ev))
                else:
                    preview = ev.preview if isinstance(ev, Progress) and ev.preview is not None else gr.skip()
                    yield progress_html(ev), preview, gr.skip(), gr.skip()
        except Exception as err:
            raise _as_user_error(gr, err) from None

    def run_omni(image, task, text, seed, request: gr.Request):
        try:
            events = engine.omni(image, task, text, seed, session=_session(request))
            yield progress_html(None, "Starting…"), gr.skip(), gr.skip()
            for ev in events:
                if isinstance(ev, OmniResult):
                    if ev.stopped:
                        yield progress_html(None, "Stopped."), gr.skip(), gr.skip()
                    elif ev.text is not None:
                        yield progress_html(None, f"{ev.task}: done in {ev.seconds:.1f} s."), None, ev.text
                    else:
                        yield progress_html(None, f"{ev.task}: done in {ev.seconds:.1f} s (seed {ev.seed})."), ev.image, ""
                else:
                    preview = ev.preview if isinstance(ev, Progress) and ev.preview is not None else gr.skip()
                    yield progress_html(ev), preview, gr.skip()
        except Exception as err:
            raise _as_user_error(gr, err) from None

    def chat_display(history):
        shown = []
        for m in history:
            for part in m["content"]:
                if part["type"] == "text":
                    shown.append({"role": m["role"], "content": part["text"]})
                else:
                    shown.append({"role": m["role"], "content": gr.Image(value=part["image"], format="png")})
        return shown

    def chat(history, message, max_new_tokens, temperature, top_k, request: gr.Request):
        history = list(history or [])
        message = message or {}
        text, files = message.get("text", ""), message.get("files") or []
        try:
            images = [load_image(f) for f in files]
            events = engine.chat(history, text, images, max_new_tokens, temperature, top_k, session=_session(request))
            user_turn = {"role": "user", "content": (
                ([{"type": "text", "text": text.strip()}] if text and text.strip() else [])
                + [{"type": "image", "image": im} for im in images])}
            shown = chat_display([*history, user_turn])
            yield shown + [{"role": "assistant", "content": "…"}], history, gr.MultimodalTextbox(value=None, interactive=False)
            for ev in events:
                if isinstance(ev, ChatResult):
                    if ev.errors:
                        gr.Warning("The model left an image unfinished: " + ev.errors[0])
                    parts = ev.parts or [{"type": "text", "text": "(stopped)" if ev.stopped else "(no answer)"}]
                    new_history = [*history, user_turn, {"role": "assistant", "content": parts}]
                    yield chat_display(new_history), new_history, gr.MultimodalTextbox(value=None, interactive=True)
                    return
                if isinstance(ev, Waiting):
                    answer = f"(waiting for the model: {ev.ahead} request(s) ahead)"
                else:
                    answer = ev.text.replace(IMAGE_MARKER, " [image] ")
                    if ev.drawing is not None:
                        answer += f" [drawing an image: {ev.drawing} tokens]"
                yield shown + [{"role": "assistant", "content": answer or "…"}], gr.skip(), gr.skip()
        except Exception as err:
            raise _as_user_error(gr, err) from None

    def chat_unlock():
        return gr.MultimodalTextbox(interactive=True)

    def stop(request: gr.Request):
        n = engine.stop(_session(request))
        if n:
            gr.Info("Stopping…")

    def task_changed(task):
        need = TASK_TEXT.get(task)
        return gr.Textbox(visible=need is not None, label=(need or "text").capitalize())

    # ------------------------------------------------------------------ layout
    limit = dict(concurrency_id="model", concurrency_limit=16)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        if nano:
            about = ("Model: Lumina-mGPT-nano, the small model shipped with lumina_hf. It draws one circle, square or "
                     "triangle in red, green, blue, yellow, black or white on a background of another of those colors, "
                     "at 96x96, 128x64 and 64x128; its Omni tasks are segmentation and describe.")
        else:
            about = f"Model: `{getattr(pipe, 'name_or_path', None) or 'built in memory'}`"
        gr.Markdown(f"# {title}\n{about}")
        if notice:
            gr.Markdown(f"**⚠ {notice}**", elem_id="exposure-notice")
        with gr.Tabs():
            with gr.Tab("Text to image", id="t2i"):
                with gr.Row():
                    with gr.Column(scale=1):
                        prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle on a blue background",
                                            elem_id="t2i-prompt")
                        negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="t2i-negative")
                        size = gr.Dropdown(choices=choices, value=engine.default_size, label="Size (aspect ratio)",
                                           allow_custom_value=True, elem_id="t2i-size")
                        with gr.Accordion("Sampling", open=True):
                            guidance = gr.Slider(0, 10, value=engine.default("guidance_scale"), step=0.1,
                                                 label="Guidance scale", elem_id="t2i-guidance")
                            top_k = gr.Slider(1, engine.num_codes, value=engine.default("image_top_k"), step=1,
                                              label="Top-k (image codes)", elem_id="t2i-topk")
                            temperature = gr.Slider(0.05, 2.0, value=engine.default("temperature"), step=0.05,
                                                    label="Temperature", elem_id="t2i-temperature")
                            seed = gr.Textbox(value="random", label="Seed ('random' or a number; image i gets seed + i)",
                                              elem_id="t2i-seed")
                            num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Number of images",
                                                   elem_id="t2i-num-images")
                            num_candidates = gr.Slider(
                                1, MAX_CANDIDATES, value=engine.default("num_candidates"), step=1,
                                label="Candidates per image (the model keeps the one it describes best as the prompt)",
                                elem_id="t2i-candidates")
                            speculative = gr.Slider(0, 16, value=0, step=1, label="Speculative window (0: off)",
                                                    visible=engine.supports_speculative, elem_id="t2i-speculative")
                        with gr.Row():
                            go = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                            halt = gr.Button("Stop", variant="stop", elem_id="t2i-stop")
                        gr.Examples(examples=examples, inputs=[prompt, size], label="Examples (click to fill in)")
                    with gr.Column(scale=1):
                        status = gr.HTML(elem_id="t2i-status")
                        preview = gr.Image(label="Drawing row by row", type="pil", format="png", interactive=False,
                                           height=256, elem_id="t2i-preview")
                        gallery = gr.Gallery(label="Results", columns=4, format="png", preview=False,
                                             object_fit="contain", elem_id="t2i-gallery")
                        info = gr.Markdown(elem_id="t2i-info")
            with gr.Tab("Omni", id="omni"):
                with gr.Row():
                    with gr.Column():
                        omni_image = gr.Image(label="Input image", type="filepath", sources=["upload", "clipboard"],
                                              height=256, elem_id="omni-image")
                        task = gr.Dropdown(list(TASKS), value="describe" if nano else "depth", label="Task",
                                           elem_id="omni-task")
                        omni_text = gr.Textbox(label="Text", visible=False, elem_id="omni-text-in")
                        omni_seed = gr.Textbox(value="random", label="Seed", elem_id="omni-seed")
                        with gr.Row():
                            omni_go = gr.Button("Run", variant="primary", elem_id="omni-run")
                            omni_halt = gr.Button("Stop", variant="stop", elem_id="omni-stop")
                        if nano:
                            gr.Examples(
                                examples=[[p, t] for p, t in zip(nano_example_images(),
                                                                  ["describe", "segmentation", "describe"])],
                                inputs=[omni_image, task], label="Examples (click to fill in)")
                    with gr.Column():
                        omni_status = gr.HTML(elem_id="omni-status")
                        omni_out = gr.Image(label="Output image", type="pil", format="png", interactive=False,
                                            height=256, elem_id="omni-output")
                        omni_answer = gr.Textbox(label="Answer (describe)", lines=3, interactive=False,
                                                 elem_id="omni-answer")
            with gr.Tab("Chat", id="chat"):
                chat_state = gr.State([])
                chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chat-log")
                box = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", elem_id="chat-box", label="Message",
                                           placeholder="Write a message; attach images with the clip")
                with gr.Row():
                    chat_halt = gr.Button("Stop", variant="stop", elem_id="chat-stop")
                    clear = gr.Button("Clear", elem_id="chat-clear")
                with gr.Accordion("Sampling", open=False):
                    max_new = gr.Slider(16, max(4096, 2 * engine.default_max_new_tokens), step=1,
                                        value=engine.default_max_new_tokens, label="Max new tokens")
                    chat_temperature = gr.Slider(0.05, 2.0, value=engine.default("temperature"), step=0.05,
                                                 label="Temperature")
                    chat_topk = gr.Slider(1, 200, value=engine.default("text_top_k"), step=1, label="Text top-k")
                if nano:
                    gr.Examples(examples=[[{"text": t, "files": []}] for t in NANO_CHAT_EXAMPLES], inputs=[box],
                                label="Examples (click to fill in)")

        # ------------------------------------------------------------------ events
        go.click(generate, [prompt, negative, size, guidance, top_k, temperature, seed, num_images, num_candidates,
                            speculative], [status, preview, gallery, info], show_progress="minimal", **limit)
        prompt.submit(generate, [prompt, negative, size, guidance, top_k, temperature, seed, num_images,
                                 num_candidates, speculative], [status, preview, gallery, info],
                      show_progress="minimal", **limit)
        for button in (halt, omni_halt, chat_halt):
            button.click(stop, None, None, queue=False)
        task.change(task_changed, task, omni_text, queue=False)
        # the upload is read by the app itself (preprocess=False), so a file that is not an image gets a message
        omni_go.click(run_omni, [omni_image, task, omni_text, omni_seed], [omni_status, omni_out, omni_answer],
                      preprocess=False, show_progress="minimal", **limit)
        submitted = box.submit(chat, [chat_state, box, max_new, chat_temperature, chat_topk],
                               [chatbot, chat_state, box], show_progress="minimal", **limit)
        submitted.then(chat_unlock, None, box, queue=False)
        clear.click(lambda: ([], []), None, [chatbot, chat_state], queue=False)
    demo.queue(max_size=64)
    demo.lumina_engine = engine  # for callers that want to close it or inspect it
    return demo


def launch(demo, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           max_file_size: str | int = MAX_FILE_SIZE, **kwargs):
    """Serve a `build_demo` app on `host:port` with the upload limit; says so in the log when the app is
    reachable beyond this machine. Other keyword arguments go to `gradio.Blocks.launch`."""
    notice = exposure_notice(host, share)
    if notice:
        logger.warning(notice)
    logger.info("serving the demo on http://%s:%d (uploads up to %s)", host, port, max_file_size)
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=max_file_size,
                       show_error=False, **kwargs)


__all__ = [
    "DemoEngine",
    "DemoInputError",
    "MAX_FILE_SIZE",
    "build_demo",
    "exposure_notice",
    "launch",
    "load_image",
    "parse_size",
    "resolve_seed",
    "size_choices",
]
