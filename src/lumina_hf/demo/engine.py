"""`DemoEngine`: runs the demo's requests on one worker thread that owns the pipeline (no Gradio needed); the
events a request streams while it runs are defined in `events`."""


import dataclasses
import inspect
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import PIL.Image
import torch

from ..generation_lumina_mgpt import UniRepLogitsProcessor
from ..offload import execution_device
from ..pipeline_lumina_mgpt import TEXT_TASKS
from ..processing_lumina_mgpt import IMAGE_MARKER

from .events import ChatProgress, ChatResult, GeneratedImage, OmniResult, Progress, TextToImageResult, Waiting
from .inputs import (
    EMIT_INTERVAL_S,
    MAX_BATCH_IMAGES,
    MAX_CANDIDATES,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    PREVIEW_INTERVAL_S,
    TASK_TEXT,
    TASKS,
    DemoInputError,
    bounded_number,
    load_image,
    parse_size,
    resolve_seed,
    size_choices,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- queue messages
@dataclasses.dataclass
class _Failed:
    error: BaseException


@dataclasses.dataclass
class _Done:
    result: Any


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
            guidance_scale=self.default("guidance_scale") if guidance_scale is None else bounded_number(guidance_scale, "Guidance scale", 0, 50),
            top_k=self.default("image_top_k") if top_k is None else bounded_number(top_k, "Top-k", 1, self.num_codes, integer=True),
            temperature=self.default("temperature") if temperature is None else bounded_number(temperature, "Temperature", 0.01, 5),
            seed=resolve_seed(seed),
            num_images=bounded_number(num_images, "Number of images", 1, MAX_IMAGES, integer=True),
            num_candidates=self.default("num_candidates") if num_candidates is None else bounded_number(num_candidates, "Candidates", 1, MAX_CANDIDATES, integer=True),
        )
        if speculative_window not in (None, "", 0):
            if not self.supports_speculative:
                raise DemoInputError("This pipeline has no speculative decoding: leave the speculative window empty.")
            params["speculative_window"] = bounded_number(speculative_window, "Speculative window", 1, 64, integer=True)
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
            max_new_tokens=self.default_max_new_tokens if max_new_tokens is None else bounded_number(
                max_new_tokens, "Max new tokens", 1, 8 * self.image_tokens(t, t) + 4096, integer=True),
            temperature=self.default("temperature") if temperature is None else bounded_number(temperature, "Temperature", 0.01, 5),
            text_top_k=self.default("text_top_k") if top_k is None else bounded_number(top_k, "Text top-k", 1, 65536, integer=True),
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
            pixels = model.decode_image_tokens(grid.unsqueeze(0).to(execution_device(model)))
        canvas.paste(proc.image_processor.postprocess(pixels, "pil")[0], (0, 0))
        return canvas

    def _generators(self, seeds: list[int]) -> list[torch.Generator]:
        device = "cuda" if execution_device(self.pipe.model).type == "cuda" else "cpu"
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
        inputs = proc.apply_chat_template(p["messages"])  # image placeholders: the model writes their codes
        if "pixel_values" in inputs:
            inputs["input_ids"] = model.fill_image_placeholders(inputs["input_ids"], inputs["pixel_values"])[0]
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
            input_ids=inputs["input_ids"].to(execution_device(model)),
            attention_mask=inputs["attention_mask"].to(execution_device(model)),
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

