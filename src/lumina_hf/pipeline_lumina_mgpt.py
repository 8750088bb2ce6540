"""`LuminaMGPTPipeline`: the diffusers pipeline for Lumina-mGPT (text-to-image and Omni image tasks)."""

import logging
import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput

from .generation_lumina_mgpt import UniRepLogitsProcessor, generate_image_tokens
from .lora import LuminaMGPTLoraLoaderMixin
from .modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration
from .offload import execution_device
from .processing_lumina_mgpt import IMAGE_MARKER, OMNI_TASK_PROMPTS, LuminaMGPTProcessor, text_to_image_prompt

logger = logging.getLogger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from lumina_hf import LuminaMGPTPipeline

        >>> pipe = LuminaMGPTPipeline.from_pretrained("path/or/hub-id", torch_dtype=torch.bfloat16).to("cuda")
        >>> image = pipe("a red circle on a blue background", height=768, width=768,
        ...              generator=torch.Generator("cuda").manual_seed(0)).images[0]
        >>> depth = pipe(image=image, task="depth").images[0]
        ```
"""

# Omni tasks whose output is an image; "describe" answers in text.
IMAGE_TASKS = ("depth", "segmentation", "normal", "pose", "detection", "editing", "condition")
TEXT_TASKS = ("describe",)
DEFAULTS = {"guidance_scale": 4.0, "image_top_k": 2000, "text_top_k": 10, "temperature": 1.0, "num_candidates": 1}
# the original Lumina-mGPT's settings for its Omni image-to-image tasks (guidance 1.0, top-k 200); a model can override them with
# `omni_guidance_scale` / `omni_image_top_k` in its generation_config
OMNI_DEFAULTS = {"guidance_scale": 1.0, "image_top_k": 200}


@dataclass
class LuminaMGPTPipelineOutput(BaseOutput):
    """`images`: list of PIL images, or an array/tensor per `output_type` (token grids for "latent");
    `text`: the text answers (task "describe"), else None."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    text: list[str] | None = None


class LuminaMGPTPipeline(DiffusionPipeline, LuminaMGPTLoraLoaderMixin):
    r"""
    Text-to-image and Omni (image-to-image, description) generation with Lumina-mGPT.

    Components: `model` ([`LuminaMGPTForConditionalGeneration`]), `processor` ([`LuminaMGPTProcessor`]).
    Generation is token by token with batched classifier-free guidance and a static KV cache
    (`lumina_hf.generation_lumina_mgpt.generate_image_tokens`); images are decoded by the model's VQGAN.
    """

    model_cpu_offload_seq = "model"
    _callback_tensor_inputs = ["tokens"]

    def __init__(self, model: LuminaMGPTForConditionalGeneration, processor: LuminaMGPTProcessor):
        super().__init__()
        self.register_modules(model=model, processor=processor)

    @classmethod
    def download(cls, pretrained_model_name, **kwargs) -> str:
        """Fetch a pipeline repo from the Hub: `model_index.json` and every component folder it names.

        diffusers' own `download` refuses components whose library is neither diffusers, transformers nor a
        file in the repo (ours is `lumina_hf`), so the folders are fetched here with `snapshot_download`."""
        import json

        from huggingface_hub import hf_hub_download, snapshot_download

        hub_kwargs = {
            k: kwargs.get(k)
            for k in ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
            if kwargs.get(k) is not None
        }
        index = hf_hub_download(pretrained_model_name, cls.config_name, **hub_kwargs)
        with open(index, encoding="utf-8") as fh:
            config = json.load(fh)
        folders = [k for k, v in config.items() if isinstance(v, list) and not k.startswith("_")]
        patterns = [cls.config_name, "README.md", *(f"{k}/*" for k in folders)]
        return snapshot_download(pretrained_model_name, allow_patterns=patterns, **hub_kwargs)

    # ------------------------------------------------------------------ helpers
    def _default(self, name: str, task: str | None):
        """The sampling default `name`: the model's `generation_config` value when it sets one (checked), else the
        reference's. Omni image-to-image tasks read `omni_<name>` for guidance and top-k."""
        gen = getattr(self.model, "generation_config", None)
        key = f"omni_{name}" if task in IMAGE_TASKS and name in OMNI_DEFAULTS else name
        fallback = OMNI_DEFAULTS[name] if key != name else DEFAULTS[name]
        value = getattr(gen, key, None) if gen is not None else None
        if value is None:
            return fallback
        try:
            if name in ("image_top_k", "text_top_k", "num_candidates"):
                _check_int(key, value, minimum=1)
            else:
                _check_number(key, value, minimum=0.0, strict=name == "temperature")
        except (TypeError, ValueError) as err:
            raise ValueError(f"the model's generation_config is invalid: {err} Fix generation_config.json.") from None
        return value

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    def check_inputs(
        self, prompt, negative_prompt, height, width, guidance_scale, num_images_per_prompt, generator, top_k,
        temperature, image, task, output_type, callback_on_step_end_tensor_inputs, num_candidates=None,
        max_new_tokens=256, speculative_window=None,
    ) -> None:
        """Every argument checked before any work: a `ValueError` naming the argument and what it accepts."""
        if task is not None and task not in IMAGE_TASKS + TEXT_TASKS:
            raise ValueError(f"task={task!r} is not one of {', '.join(IMAGE_TASKS + TEXT_TASKS)}.")
        if task is not None and image is None:
            raise ValueError(f"task={task!r} needs an input image: pass `image=`.")
        if task is None and image is not None:
            raise ValueError(
                f"an image was given without a task: pass task= one of {', '.join(IMAGE_TASKS + TEXT_TASKS)} "
                "(text-to-image takes no input image)."
            )
        if task in ("editing", "condition", "detection") and prompt is None:
            raise ValueError(f"task={task!r} needs `prompt` (the instruction, caption or object).")
        if task is None and prompt is None:
            raise ValueError("give a `prompt` (or an `image` with a `task`).")
        n = _check_texts("prompt", prompt, allow_empty=task is not None) if prompt is not None else None
        if image is not None:
            n_images = _check_images(image)
            if n is not None and n != n_images:
                raise ValueError(f"{n_images} images for {n} prompts: give one image per prompt.")
            n = n_images
        if negative_prompt is not None:
            n_neg = _check_texts("negative_prompt", negative_prompt, allow_empty=True)
            if isinstance(negative_prompt, list) and n_neg != n:
                raise ValueError(f"{n_neg} negative prompts for {n} prompts: give one per prompt or a string.")
        _check_int("num_images_per_prompt", num_images_per_prompt, minimum=1)
        _check_int("max_new_tokens", max_new_tokens, minimum=1)
        if num_candidates is not None:
            _check_int("num_candidates", num_candidates, minimum=1)
            if task is not None and num_candidates > 1:
                raise ValueError(
                    f"num_candidates={num_candidates} ranks text-to-image candidates by the prompt; task={task!r} "
                    "has no caption to rank by: leave num_candidates unset."
                )
        _check_number("guidance_scale", guidance_scale, minimum=0.0)
        _check_number("temperature", temperature, minimum=0.0, strict=True)
        if top_k is not None:
            _check_int("top_k", top_k, minimum=1)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        if height is not None or width is not None:
            if height is None or width is None:
                raise ValueError("give both height and width, or neither.")
            _check_int("height", height, minimum=1)
            _check_int("width", width, minimum=1)
            self.processor.image_processor.check_size(width, height)
        if speculative_window is not None:
            _check_int("speculative_window", speculative_window, minimum=0)
            if task in TEXT_TASKS and speculative_window:
                raise ValueError(
                    f"speculative_window is for image outputs; task={task!r} answers in text, which is decoded token by "
                    "token: leave speculative_window unset."
                )
            if height is not None and task not in TEXT_TASKS:
                layout = self.model.config.unirep
                span = layout.grid_length(*layout.grid_shape(height, width))
                if speculative_window > span:
                    raise ValueError(
                        f"speculative_window={speculative_window} is larger than the image span ({span} tokens after the "
                        f"size tokens at {width}x{height}): use at most {span}."
                    )
        _check_generators(generator, n * num_images_per_prompt, n)
        if callback_on_step_end_tensor_inputs is not None:
            bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if bad:
                raise ValueError(f"callback tensor inputs {bad} are not among {self._callback_tensor_inputs}.")
        if negative_prompt is not None and guidance_scale == 1.0:
            logger.warning("negative_prompt is ignored: guidance_scale=1.0 runs no unconditional branch.")

    def _task_text(self, task: str, prompt: str | None) -> str:
        if task == "editing":
            instruction = prompt
        elif task == "condition":
            instruction = OMNI_TASK_PROMPTS["condition"].format(caption=prompt)
        elif task == "detection":
            instruction = OMNI_TASK_PROMPTS["detection"].format(object=prompt)
        else:
            instruction = OMNI_TASK_PROMPTS[task]
        return f"{instruction} {IMAGE_MARKER}"

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        image=None,
        task: str | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        force_size: bool = True,
        compile: bool | str = False,
        max_new_tokens: int = 256,
        num_candidates: int | None = None,
        speculative_window: int | None = None,
    ):
        r"""
        Generate images (or, for `task="describe"`, text).

        Args:
            prompt: caption(s) for text-to-image; for Omni tasks the instruction (editing), caption
                (condition) or object (detection).
            negative_prompt: unconditional context (its turn + the image prefix) instead of the image alone.
            height, width: pixels, one of the model's buckets (default: the square of its target size;
                for Omni tasks the input image's bucket).
            guidance_scale: classifier-free guidance (default 4.0; 1.0 for Omni tasks, which skips the
                unconditional rows).
            num_images_per_prompt, generator: a generator or one per image, for reproducible results.
            temperature, top_k: sampling (top-k inside images; defaults 1.0 and 2000, Omni 200; a model's
                generation_config can set its own: `image_top_k`, and `omni_image_top_k` /
                `omni_guidance_scale` for the image-to-image tasks).
            image, task: input image(s) and one of "depth", "segmentation", "normal", "pose", "detection",
                "editing", "condition", "describe".
            output_type: "pil", "np" (float [0, 1], `(B, H, W, 3)`), "pt" (float [0, 1], `(B, 3, H, W)`) or
                "latent" (the `(B, rows, cols)` image-code token grids).
            callback_on_step_end: `fn(pipe, step, step, callback_kwargs) -> dict` (or a diffusers
                `PipelineCallback`), called after every token, the last one included. `callback_kwargs` holds the
                tensors named in `callback_on_step_end_tensor_inputs` ("tokens": the `(batch, step + 1)` image
                tokens so far); a returned "tokens" replaces them, and the next step is fed what it holds. Set
                `pipe._interrupt = True` in it to stop (the images are then not decoded).
            force_size: write the size tokens for `height`/`width` (default) or let the model sample them.
            compile: `torch.compile` the decoding step: True or a mode ("reduce-overhead" replays it as a CUDA
                graph on GPUs); it compiles once per batch size and keeps its static cache for the next call.
            num_candidates: text-to-image only: sample this many candidates for every requested image (in one
                batch) and keep the one whose caption the model itself finds most likely, i.e. the highest
                log-likelihood of the prompt as the answer to its Omni "describe" task on the candidate. Costs
                `num_candidates` times the generation. Only meaningful for a model trained on that task; the
                default is the model's `generation_config.num_candidates`, else 1 (no ranking). The callback's
                `tokens` then hold every candidate row.
            speculative_window: decode images with lossless speculative Jacobi decoding, this many tokens per forward
                pass (`lumina_hf.speculative`; the same distribution as token-by-token decoding, fewer forwards). The
                default is the model's `generation_config.speculative_window`, else None (token by token). Not for
                `task="describe"`. With it, the callback is called for each step once every image has decided it.

        Returns:
            `LuminaMGPTPipelineOutput` (or a tuple `(images,)` with `return_dict=False`).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        guidance_scale = self._default("guidance_scale", task) if guidance_scale is None else guidance_scale
        temperature = self._default("temperature", task) if temperature is None else temperature
        image_top_k = (self._default("image_top_k", task) if task != "describe" else None) if top_k is None else top_k
        self.check_inputs(
            prompt, negative_prompt, height, width, guidance_scale, num_images_per_prompt, generator, top_k,
            temperature, image, task, output_type, callback_on_step_end_tensor_inputs, num_candidates, max_new_tokens,
            speculative_window,
        )
        window_is_default = speculative_window is None
        if window_is_default and task not in TEXT_TASKS:
            speculative_window = self._default_speculative_window()
        if num_candidates is None:
            num_candidates = self._default("num_candidates", None) if task is None else 1
        self._interrupt = False
        prompts = [prompt] if isinstance(prompt, str) or prompt is None else list(prompt)
        images = None
        if image is not None:
            images = image if isinstance(image, list) else [image]
            if prompt is None:
                prompts = [None] * len(images)
            elif len(images) != len(prompts):
                raise ValueError(f"{len(images)} images for {len(prompts)} prompts: give one image per prompt.")

        if task == "describe":
            return self._describe(images, num_images_per_prompt, temperature, top_k, generator, max_new_tokens, return_dict)

        cond, (h, w) = self._encode_prompts(prompts, images, task, height, width)
        negs = None
        if negative_prompt is not None:
            neg_list = [negative_prompt] * len(cond) if isinstance(negative_prompt, str) else list(negative_prompt)
            negs = [self.processor(text=n, return_tensors=None)["input_ids"][0] for n in neg_list]
        # one row per image, then per candidate of an image (rows of one image are neighbours)
        repeat = num_images_per_prompt * num_candidates
        cond = [c for c in cond for _ in range(repeat)]
        negs = None if negs is None else [n for n in negs for _ in range(repeat)]
        if num_candidates > 1:
            generator = self._candidate_generators(generator, num_candidates)

        layout = self.model.config.unirep
        total = layout.grid_length(*layout.grid_shape(h, w))
        if window_is_default and speculative_window:
            speculative_window = min(speculative_window, total)  # a model's default fits any image size
        with self.progress_bar(total=total) as bar:
            out = generate_image_tokens(
                self.model,
                cond,
                height=h,
                width=w,
                negative_prompts=negs,
                guidance_scale=guidance_scale,
                image_top_k=image_top_k,
                temperature=temperature,
                generator=generator,
                force_size=force_size,
                compile=compile,
                callback=self._step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs),
                progress_bar=bar,
                device=self._execution_device,
                speculative_window=speculative_window,
            )
        if out.interrupted:
            self.maybe_free_model_hooks()
            return LuminaMGPTPipelineOutput(images=[]) if return_dict else ([],)

        seqs = out.sequences if isinstance(out.sequences, list) else list(out.sequences)
        grids = [self.processor.extract_image_tokens(s.tolist())[0] for s in seqs]
        if num_candidates > 1:
            captions = [p for p in prompts for _ in range(num_images_per_prompt)]
            grids = self._best_candidates(grids, captions, num_candidates)
        result = self._postprocess(grids, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return LuminaMGPTPipelineOutput(images=result)

    def _default_speculative_window(self) -> int | None:
        """The model's `generation_config.speculative_window`, checked (None when it has none)."""
        window = getattr(getattr(self.model, "generation_config", None), "speculative_window", None)
        if window is not None:
            try:
                _check_int("speculative_window", window, minimum=0)
            except ValueError as err:
                raise ValueError(f"the model's generation_config is invalid: {err} Fix generation_config.json.") from None
        return window

    def _encode_prompts(self, prompts, images, task, height, width):
        """Each prompt as token ids (input images VQ-encoded here, so the ids are final) and the one image size
        (height, width) of the call."""
        proc = self.processor
        sizes, cond = [], []
        for i, p in enumerate(prompts):
            if task is not None:
                feats = proc.image_processor([images[i]])
                h, w = feats["pixel_values"].shape[-2:]
                h, w = (h, w) if height is None else (height, width)
                inputs = proc(text=self._task_text(task, p), images=[images[i]])  # placeholders: the model writes the codes
                ids = self.model.fill_image_placeholders(inputs["input_ids"], inputs["pixel_values"])[0][0].tolist()
            else:
                h = height or proc.image_processor.target_size
                w = width or proc.image_processor.target_size
                ids = proc(text=text_to_image_prompt(p, w, h), return_tensors=None)["input_ids"][0]
            sizes.append((h, w))
            cond.append(ids)
        if len(set(sizes)) > 1:
            raise ValueError(f"all images of one call must share a size, got {sorted(set(sizes))}: pass height/width.")
        return cond, sizes[0]

    def _step_callback(self, callback_on_step_end, tensor_inputs):
        """The decoding loop's per-step hook, with diffusers' callback contract: the named tensors go in, the
        returned ones replace them; returns whether to stop."""

        def on_step(step, tokens):
            if callback_on_step_end is not None:
                kwargs = {"tokens": tokens} if "tokens" in (tensor_inputs or ()) else {}
                outputs = callback_on_step_end(self, step, step, kwargs) or {}
                if outputs.get("tokens") is not None:
                    tokens.copy_(outputs["tokens"])
            return self.interrupt

        return on_step

    def _best_candidates(self, grids, captions, num_candidates):
        """Of each image's `num_candidates` neighbouring grids, the one whose caption the model finds most likely."""
        n_images = len(captions)
        scores = self.describe_log_likelihood(grids, [c for c in captions for _ in range(num_candidates)],
                                              chunk_size=n_images)
        best = scores.view(n_images, num_candidates).argmax(dim=1)
        return [grids[i * num_candidates + int(k)] for i, k in enumerate(best)]

    def _postprocess(self, grids, output_type):
        """Image-code grids -> the requested output type (stacked when every image has the same size)."""
        if output_type == "latent":
            return grids if len({tuple(g.shape) for g in grids}) > 1 else torch.stack(grids)
        decoded = []
        for g in grids:
            pixels = self.model.decode_image_tokens(g.unsqueeze(0).to(execution_device(self.model)))
            decoded.append(self.processor.image_processor.postprocess(pixels, "pt")[0])
        if output_type == "pil":
            return [PIL.Image.fromarray(d.permute(1, 2, 0).numpy(), "RGB") for d in decoded]
        same = len({tuple(d.shape) for d in decoded}) == 1
        stacked = [d.float() / 255.0 for d in decoded]
        if output_type == "pt":
            return torch.stack(stacked) if same else stacked
        arrs = [t.permute(1, 2, 0).numpy() for t in stacked]
        return np.stack(arrs) if same else arrs

    # ------------------------------------------------------------------ candidate ranking
    @staticmethod
    def _candidate_generators(generator, num_candidates: int):
        """One generator per candidate row. A generator given per image seeds that image's candidates (drawn
        from it, so a fixed seed still gives a fixed result and the candidates differ); a single generator or
        None is used as is over the whole batch."""
        if not isinstance(generator, (list, tuple)):
            return generator
        out = []
        for g in generator:
            seeds = torch.randint(0, 2**62, (num_candidates,), generator=g, device=g.device).tolist()
            out.extend(torch.Generator(device=g.device).manual_seed(int(s)) for s in seeds)
        return out

    @torch.no_grad()
    def describe_log_likelihood(self, grids, captions: list[str], chunk_size: int | None = None) -> torch.Tensor:
        """Log-likelihood (summed over its tokens and the closing separator) of each caption as the model's answer
        to "Describe the image in detail." about the matching image-code grid (`(rows, cols)` token ids, as
        `output_type="latent"` returns). Used by `num_candidates`; `chunk_size` rows per forward pass."""
        if len(grids) != len(captions):
            raise ValueError(f"{len(grids)} image grids for {len(captions)} captions: give one caption per grid.")
        proc = self.processor
        question = self._task_text("describe", None)
        by_start: dict[int, list[int]] = {}
        items = []
        for i, (grid, caption) in enumerate(zip(grids, captions)):
            ids, labels = proc.tokenize_conversation([("user", question), ("assistant", caption)], [proc.unirep_ids(grid)])
            items.append((ids, labels))
            by_start.setdefault(next(k for k, v in enumerate(labels) if v != -100), []).append(i)
        scores = torch.zeros(len(grids))
        device = execution_device(self.model)  # not model.device: CPU offload keeps weights on "meta"
        chunk = chunk_size or len(grids)
        # rows with the same image size share the question's length, so their answers begin at the same position
        # and only those positions need logits (`logits_to_keep`), not the whole image span
        for start, rows in by_start.items():
            for lo in range(0, len(rows), chunk):
                part = rows[lo : lo + chunk]
                batch = proc.pad([items[i][0] for i in part], [items[i][1] for i in part], side="right")
                keep = torch.arange(start - 1, batch["input_ids"].shape[1] - 1, device=device)
                logits = self.model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    logits_to_keep=keep,
                ).logits.float()
                target = batch["labels"][:, start:].to(device)
                logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                scores[part] = (logp * (target != -100)).sum(dim=1).cpu()
        return scores

    def _describe(self, images, num_images_per_prompt, temperature, top_k, generator, max_new_tokens, return_dict):
        proc = self.processor
        text = self._task_text("describe", None)
        inputs = [proc(text=text, images=[im]) for im in images]  # image placeholders: the model writes the codes
        ids = [self.model.fill_image_placeholders(x["input_ids"], x["pixel_values"])[0][0].tolist() for x in inputs]
        ids = [x for x in ids for _ in range(num_images_per_prompt)]
        batch = proc.pad(ids, side="left")
        if generator is not None:
            seed_gen = generator[0] if isinstance(generator, list) else generator
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=seed_gen)))
        processor = UniRepLogitsProcessor(self.model.config, self._default("image_top_k", None), top_k or self._default("text_top_k", None))
        out = self.model.generate(
            input_ids=batch["input_ids"].to(execution_device(self.model)),
            attention_mask=batch["attention_mask"].to(execution_device(self.model)),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=None,
            # the model's generation_config carries the image guidance scale, which transformers would apply to
            # text as its own (unbatched) classifier-free guidance: guidance is for images only
            guidance_scale=1.0,
            logits_processor=[processor],
            eos_token_id=self.model.config.separator_token_id,
            pad_token_id=self.model.config.pad_token_id,
        )
        texts = proc.batch_decode(out[:, batch["input_ids"].shape[1] :])
        self.maybe_free_model_hooks()
        if not return_dict:
            return (texts,)
        return LuminaMGPTPipelineOutput(images=[], text=texts)


# Argument errors are ValueErrors (wrong type or out of range alike), each naming the argument and what it accepts.
def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {type(value).__name__} {value!r}.")


def _check_number(name: str, value, minimum: float, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {type(value).__name__} {value!r}.")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value}.")


def _check_texts(name: str, value, allow_empty: bool) -> int:
    """A string or a non-empty list of strings; returns how many."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise ValueError(f"{name} must be a string or a list of strings, got {type(value).__name__}.")
    if not texts:
        raise ValueError(f"{name} is an empty list: give at least one string.")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{name}[{i}] must be a string, got {type(t).__name__} {t!r}.")
        if not allow_empty and not t.strip():
            raise ValueError(f"{name}[{i}] is empty: describe the image to generate.")
    return len(texts)


def _check_images(image) -> int:
    images = image if isinstance(image, list) else [image]
    if not images:
        raise ValueError("image is an empty list: give at least one image.")
    for i, im in enumerate(images):
        if isinstance(im, torch.Tensor) and im.is_floating_point() and not bool(torch.isfinite(im).all()):
            raise ValueError(f"image {i} holds NaN or infinite values.")
        if isinstance(im, np.ndarray) and np.issubdtype(im.dtype, np.floating) and not np.isfinite(im).all():
            raise ValueError(f"image {i} holds NaN or infinite values.")
    return len(images)


def _check_generators(generator, n_images: int, n_prompts: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, list) or not all(isinstance(g, torch.Generator) for g in generator):
        raise ValueError(
            f"generator must be a torch.Generator or a list of them, got {type(generator).__name__} {generator!r}: "
            "use torch.Generator().manual_seed(seed)."
        )
    if len(generator) != n_images:
        raise ValueError(
            f"got {len(generator)} generators for {n_images} images ({n_prompts} prompts x "
            f"{n_images // max(n_prompts, 1)}): give one per image or a single generator."
        )


__all__ = ["LuminaMGPTPipeline", "LuminaMGPTPipelineOutput"]
