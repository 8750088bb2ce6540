"""Guided image decoding for Lumina-mGPT (classifier-free guidance on raw logits, the UniRep grid
constraint, top-k, temperature), on public transformers APIs only (the model's `forward`, `StaticCache`,
`LogitsProcessor`).

Why our own loop instead of `model.generate(guidance_scale=...)`: transformers runs the unconditional
branch as a second, eager forward per step (the reference's cost: the weights are read twice per step).
Here the conditional and unconditional rows are one left-padded batch with one static KV cache, and the
sampler only looks at the image-code logits inside an image.

The per-token loop never waits for the device: what each step writes (an image code, a row end, the image
end) is planned on the host from Python ints before the loop, and noise, guidance, top-k and sampling stay
on the device, so on a GPU the host queues steps ahead of the kernels. The decode step can be
`torch.compile`d (with CUDA graphs in "reduce-overhead" mode): its inputs have fixed shapes (the static cache
length is rounded up to a multiple of 256), so it compiles once per batch size.

Sampling (`lumina_hf.sampling`) is Gumbel-max with per-row generators: a row's result does not depend on the
batch it is in.
"""

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, StaticCache

from .padding import left_pad_prompts as _left_pad
from .sampling import (
    draw_uniform,
    gumbel_sample,
    normalize_generators,
    top_k_filter,
)
from .unirep import VQ_FACTOR

logger = logging.getLogger(__name__)


@dataclass
class ImageGenerationOutput:
    """`sequences`: `(batch, span)` UniRep spans `[start, h, w, grid..., end]` (a list of 1-D tensors when
    the rows have different sizes); `sizes`: `(height, width)` in pixels per row; `interrupted`: True when a
    callback stopped the loop early (the spans are then incomplete); `num_forwards`: forward passes of the
    decoder the call ran (size sampling, prompt and decoding steps); `accepted_per_forward`: speculative
    decoding only, `(forwards, batch)` tokens each row decided in each decoding forward (0 once the row was
    complete), the acceptance-length distribution."""

    sequences: torch.Tensor | list[torch.Tensor]
    sizes: list[tuple[int, int]]
    interrupted: bool = False
    num_forwards: int | None = None
    accepted_per_forward: torch.Tensor | None = None


class UniRepLogitsProcessor(LogitsProcessor):
    """Grid constraint and interleaved top-k for `model.generate` (no guidance): inside an open image (after
    `<racm3:break>` and before `<eoss>`), the two size tokens are limited to size ids and sampled with
    `image_top_k`, then each row allows only image codes and ends with the row-end token, and the last row
    is followed by the end token; outside images, `text_top_k` applies. Everything is computed with tensor
    ops on `input_ids` (no host synchronisation)."""

    def __init__(self, config, image_top_k: int | None = 2000, text_top_k: int | None = 10):
        self.cfg = config
        self.image_top_k, self.text_top_k = image_top_k, text_top_k
        self.code_ids = None

    def _codes_mask(self, vocab: int, device) -> torch.Tensor:
        if self.code_ids is None or self.code_ids.device != device:
            table = torch.tensor(self.cfg.image_code_to_token_id(), device=device)
            self.code_ids = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.code_ids[table] = True
        return self.code_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cfg = self.cfg
        b, n = input_ids.shape
        vocab = scores.shape[-1]
        idx = torch.arange(n, device=input_ids.device).expand(b, n)
        last_start = torch.where(input_ids == cfg.image_start_token_id, idx, -1).max(dim=1).values
        last_end = torch.where(input_ids == cfg.image_end_token_id, idx, -1).max(dim=1).values
        open_image = last_start > last_end
        k = (n - 1 - last_start).clamp(min=0)  # tokens generated after the start token
        start_c = last_start.clamp(min=0)
        h_tok = input_ids.gather(1, (start_c + 1).clamp(max=n - 1).unsqueeze(1)).squeeze(1)
        w_tok = input_ids.gather(1, (start_c + 2).clamp(max=n - 1).unsqueeze(1)).squeeze(1)
        f = cfg.patch_size // VQ_FACTOR  # image codes per size unit
        rows = (h_tok - cfg.size_token_base_id).clamp(min=1) * f
        cols = (w_tok - cfg.size_token_base_id).clamp(min=1) * f
        pos = k - 2  # position inside the grid
        in_size = open_image & (k < 2)
        in_grid = open_image & (k >= 2)
        total = rows * (cols + 1)
        is_row_end = in_grid & (pos < total) & ((pos % (cols + 1)) == cols)
        is_end = in_grid & (pos >= total)
        is_code = in_grid & ~is_row_end & ~is_end

        allowed = torch.ones_like(scores, dtype=torch.bool)
        vid = torch.arange(vocab, device=scores.device)
        size_ok = (vid > cfg.size_token_base_id) & (vid <= cfg.size_token_base_id + cfg.max_size_units)
        allowed = torch.where(in_size[:, None], size_ok[None], allowed)
        allowed = torch.where(is_code[:, None], self._codes_mask(vocab, scores.device)[None], allowed)
        allowed = torch.where(is_row_end[:, None], (vid == cfg.image_row_end_token_id)[None], allowed)
        allowed = torch.where(is_end[:, None], (vid == cfg.image_end_token_id)[None], allowed)
        scores = scores.masked_fill(~allowed, float("-inf"))
        if self.image_top_k or self.text_top_k:
            img = top_k_filter(scores, self.image_top_k)
            txt = top_k_filter(scores, self.text_top_k)
            scores = torch.where(open_image[:, None], img, txt)
        return scores


# torch.compile modes accepted by `compile=` (True means the default mode). The two that capture CUDA graphs
# replay one recorded graph per batch size; its output buffer is reused by the next replay.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# The static cache length is rounded up to a multiple of this, so prompts of different lengths share one
# compiled decode step (the cache and the attention mask have the same shape).
CACHE_LENGTH_MULTIPLE = 256


def _check_compile(compile) -> None:
    if isinstance(compile, bool):
        return
    if not isinstance(compile, str) or compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r} is not a torch.compile mode: use True, False or one of {', '.join(COMPILE_MODES)}.")


def _cache_length(total: int, max_positions: int) -> int:
    """`total` rounded up to a multiple of `CACHE_LENGTH_MULTIPLE`, but never past the model's context (unless
    `total` itself is)."""
    rounded = -(-total // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE
    return max(total, min(rounded, max_positions))


class _DecodeStep:
    """One decoding step `(token (R, 1), position (R, 1)) -> image-code logits (R, n_codes)` against a static
    cache. Only the lm_head rows of the image codes are applied (inside an image nothing else can be
    sampled), which skips most of the 65536-wide head. Optionally `torch.compile`d: every input has a fixed
    shape, so it compiles once per batch size and cache length.

    A compiled step keeps its cache and its gathered head between calls (see `_decode_step_for`): CUDA graphs
    are recorded against fixed addresses, and new tensors every image would force a new recording."""

    def __init__(self, model, code_ids: torch.Tensor, compile: bool | str, cache_len: int):
        # the decoder, not the whole model: `_COMPILED_STEPS` is keyed weakly by the model
        self.decoder = model.model
        self.compile = compile
        self.cache_len = cache_len
        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
        self.head = None
        self.code_ids = code_ids
        self.marks_steps = compile in _CUDA_GRAPH_MODES
        fn = self._step
        if compile:
            mode = compile if isinstance(compile, str) and compile != "default" else None
            fn = torch.compile(fn, mode=mode, fullgraph=False, dynamic=False)
        self.fn = fn

    def start(self) -> None:
        """Ready for a new image: an empty cache (the same tensors, zeroed)."""
        self.cache.reset()

    def load_head(self, model) -> None:
        """Gather the image-code rows of the model's current lm_head (adapters may have changed it since the
        last call), into the same tensor when the step already has one. Called after the prefill, which has
        put the model on its execution device."""
        rows = _image_code_head(model.lm_head, self.code_ids).detach()
        if self.head is None or self.head.shape != rows.shape or self.head.device != rows.device or self.head.dtype != rows.dtype:
            self.head = rows
            if self.compile:
                # a fixed address across images: CUDA graphs read it in place instead of copying it every step
                torch._dynamo.mark_static_address(self.head)
        else:
            self.head.copy_(rows)

    def _step(self, token, position, mask, cache):
        hidden = self.decoder(
            input_ids=token, attention_mask=mask, position_ids=position, cache=cache, use_cache=True
        ).last_hidden_state
        # with a `device_map` the head may sit on another device than the loop: the logits come back to it
        return F.linear(hidden[:, -1].to(self.head.device), self.head).to(self.code_ids.device)

    def __call__(self, token, position, mask):
        if self.marks_steps:
            # each replay overwrites the previous step's output buffer, which has been consumed by now
            torch.compiler.cudagraph_mark_step_begin()
        return self.fn(token, position, mask, self.cache)


# The last compiled decode step of each model (one per model: a 7B cache at batch 16 holds tens of GB).
_COMPILED_STEPS: "weakref.WeakKeyDictionary[torch.nn.Module, _DecodeStep]" = weakref.WeakKeyDictionary()


def _decode_step_for(model, code_ids: torch.Tensor, compile: bool | str, cache_len: int, rows: int, device) -> _DecodeStep:
    """A decode step for `rows` cache rows of `cache_len` positions. Eager steps are built for each call;
    a compiled step is reused while the model, mode, batch shape, dtype and device stay the same, so that the
    compiled graph (and any CUDA graph recorded for it) sees the same cache tensors image after image."""
    if not compile:
        return _DecodeStep(model, code_ids, compile, cache_len)
    key = (compile, cache_len, rows, model.dtype, torch.device(device))
    return _kept_compiled_step(model, key, lambda: _DecodeStep(model, code_ids, compile, cache_len))


def _kept_compiled_step(model, key: tuple, build: Callable[[], object]):
    """The model's kept compiled step when it was built for `key` (same shapes, dtype, device), else a new one
    from `build()` that replaces it (one per model: the old one's cache is freed before the new one is made)."""
    step = _COMPILED_STEPS.get(model)
    if step is None or getattr(step, "key", None) != key:
        _COMPILED_STEPS.pop(model, None)
        step = build()
        step.key = key
        _COMPILED_STEPS[model] = step
    return step


def clear_decode_cache(model=None) -> None:
    """Drop the compiled decode step (and its static KV cache) kept for `model`, or for every model. The next
    compiled call allocates a new cache; on CUDA the memory returns to PyTorch's allocator."""
    if model is None:
        _COMPILED_STEPS.clear()
    else:
        _COMPILED_STEPS.pop(model, None)


def _decode_loop(
    step_fn: _DecodeStep,
    logits: torch.Tensor,
    schedule: list[str],
    *,
    out_tokens: torch.Tensor,
    code_ids: torch.Tensor,
    position: torch.Tensor,
    mask: torch.Tensor,
    guidance_scale: float,
    use_cfg: bool,
    image_top_k: int | None,
    temperature: float,
    do_sample: bool,
    generator,
    grid_shape: tuple[torch.Tensor, torch.Tensor] | None,
    callback,
    progress_bar,
) -> bool:
    """The per-token loop: sample step `s` from `logits`, write it to `out_tokens[:, s]`, feed it. Returns True
    when the callback interrupted it before the last step.

    Nothing here reads a device value on the host: what each step writes ("code", "row_end", "end", or
    "mixed" for rows of different grid sizes, resolved per row on the device from `grid_shape`) is planned
    in `schedule` from Python ints, and noise, guidance, top-k and sampling stay on the device. The host
    only queues work, so on CUDA it runs ahead of the GPU."""
    batch, n_steps = out_tokens.shape
    n_codes = code_ids.numel()
    device = out_tokens.device
    for s, kind in enumerate(schedule):
        # Noise is drawn at every grid position before the end token (row ends included), so a row's draws
        # do not depend on the sizes of the other rows in the batch.
        noise = draw_uniform(generator, batch, n_codes, device) if do_sample and kind != "end" else None
        if kind in ("code", "mixed"):
            code_logits = logits.float()
            if use_cfg:
                cond, unc = code_logits[:batch], code_logits[batch:]
                code_logits = unc + guidance_scale * (cond - unc)
            code_logits = top_k_filter(code_logits, image_top_k)
            choice = gumbel_sample(code_logits, noise, temperature) if do_sample else code_logits.argmax(-1)
            token = code_ids[choice]
            if kind == "mixed":
                rows_t, cols_t, row_end, end = grid_shape
                token = torch.where(s % (cols_t + 1) == cols_t, row_end, token)
                token = torch.where(rows_t * (cols_t + 1) <= s, end, token)
            out_tokens[:, s] = token
        # "row_end" and "end" steps: `out_tokens` already holds the forced token (filled before the loop)
        logits = None  # the step's output has been consumed (a CUDA-graph replay reuses its buffer)
        if progress_bar is not None:
            progress_bar.update(1)
        # the callback sees the tokens so far and may replace them in place: what it leaves is what is fed
        if callback is not None and callback(s, out_tokens[:, : s + 1]):
            return s + 1 < n_steps
        if s + 1 == n_steps or schedule[s + 1] == "end":
            continue  # the end token is forced: no logits needed for it
        feed = out_tokens[:, s].repeat(2) if use_cfg else out_tokens[:, s]
        position = position + 1
        logits = step_fn(feed[:, None], position, mask)
    return False


def _image_code_head(lm_head: torch.nn.Module, code_ids: torch.Tensor) -> torch.Tensor:
    """The LM-head rows of the image codes, `(n_codes, hidden)`, as a plain tensor on the head's execution device.
    Offloaded weights (CPU/disk offload, `device_map`) are brought in for the copy; a head quantized with torchao is
    dequantized (only these rows are kept)."""
    from .offload import weights_on_execution_device

    with weights_on_execution_device(lm_head):
        weight = lm_head.weight
        if type(weight) not in (torch.Tensor, torch.nn.Parameter) and hasattr(weight, "dequantize"):
            weight = weight.dequantize()  # e.g. torchao's Int8Tensor: no row indexing on the packed data
        if not weight.is_floating_point():
            raise ValueError(
                f"lm_head holds {weight.dtype} weights this sampler cannot read: keep 'lm_head' in the quantization "
                "config's modules_to_not_convert (lumina_hf.quantization.KEEP_UNQUANTIZED)."
            )
        return weight.index_select(0, code_ids.to(weight.device))


class _CountedCalls:
    """A decode step that counts its calls (for `ImageGenerationOutput.num_forwards`)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def _sample_sizes(model, prompts, image_top_k, temperature, do_sample, generator, device) -> list[tuple[int, int]]:
    """The reference lets the model write the two size tokens (no guidance, image top-k). We do the same on
    the conditional rows, limited to valid size ids (an id below the size range would give a negative grid)."""
    cfg = model.config
    contexts = [list(p) + [cfg.image_start_token_id] for p in prompts]
    ids, mask, pos = _left_pad(contexts, cfg.pad_token_id, max(len(c) for c in contexts), device)
    lo, hi = cfg.size_token_base_id + 1, cfg.size_token_base_id + cfg.max_size_units
    picked = []
    for _ in range(2):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        vocab = logits.shape[-1]
        allowed = torch.zeros(vocab, dtype=torch.bool, device=device)
        allowed[lo : hi + 1] = True
        logits = top_k_filter(logits.masked_fill(~allowed, float("-inf")), image_top_k)
        if do_sample:
            tok = gumbel_sample(logits, draw_uniform(generator, len(prompts), vocab, device), temperature)
        else:
            tok = logits.argmax(-1)
        picked.append(tok)
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(tok[:, None])], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
    layout = cfg.unirep
    return [(layout.size_from_token(h), layout.size_from_token(w)) for h, w in zip(*picked)]


@torch.no_grad()
def generate_image_tokens(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    height: int | None = None,
    width: int | None = None,
    negative_prompts: Sequence[Sequence[int]] | None = None,
    guidance_scale: float = 4.0,
    image_top_k: int | None = 2000,
    temperature: float = 1.0,
    do_sample: bool = True,
    generator: torch.Generator | list[torch.Generator] | None = None,
    force_size: bool = True,
    compile: bool | str = False,
    callback: Callable[[int, torch.Tensor], bool] | None = None,
    progress_bar=None,
    device: torch.device | str | None = None,
    speculative_window: int | None = None,
) -> ImageGenerationOutput:
    """Generate one image per prompt with classifier-free guidance: the conditional and unconditional rows
    share one batch and one static KV cache, and the per-token loop never waits for the device.

    Args:
        prompts: token id lists, each the full conditional context up to and including the last user
            separator (`<s>...<reserved08706>`); the image prefix is appended here.
        height, width: pixels (multiples of the 32 px grid unit). Forced as the size tokens when
            `force_size`; otherwise the model samples them as the reference does.
        negative_prompts: per-prompt unconditional context before the image prefix (default: none, i.e.
            the unconditional row is the image alone `[<racm3:break>, h, w, ...]`, positions from 0).
        guidance_scale: `uncond + g * (cond - uncond)` on raw logits inside the image; 1.0 skips the
            unconditional rows.
        image_top_k, temperature, do_sample: sampling after guidance and the grid constraint.
        generator: one `torch.Generator`, or a list with one per prompt (results then do not depend on
            the batch a prompt is in). On CUDA, generators on the GPU keep the noise there; CPU generators
            work too (their draws are copied over without blocking).
        compile: `torch.compile` the decode step: True (default mode) or one of `COMPILE_MODES`;
            "reduce-overhead" and "max-autotune" replay it as a CUDA graph on GPUs. It compiles once per
            batch size (and per 256-token bucket of prompt + image length); the compiled step keeps its
            static cache for the next call of the same shape (`clear_decode_cache(model)` frees it), so
            compiled calls on one model must not run concurrently.
        callback: `callback(step, tokens_so_far) -> stop`, called after every step; return a Python bool
            (True interrupts the loop). A tensor returned here would make the host wait for the device.
        progress_bar: an object with `update(n)` (e.g. a tqdm bar).
        device: where the inputs and the sampler live (default: the model's device). A pipeline with
            model CPU offload passes its execution device: the first forward moves the model there.
        speculative_window: `None` or 0 for plain decoding (one token per forward); `N >= 1` for lossless
            speculative Jacobi decoding (`lumina_hf.speculative`): each forward feeds `N` tokens per row (the
            last decided one and `N - 1` drafts) and decides up to `N`, sampling the same distribution as plain
            decoding (the same tokens when greedy). Under sampling the tokens for a given seed differ from
            plain decoding's and depend on the batch. At most the image's span (its tokens after the size
            tokens).
    """
    _check_request(model.config, prompts, negative_prompts, guidance_scale, image_top_k, temperature, do_sample,
                   speculative_window)
    _check_compile(compile)
    generator = normalize_generators(generator, len(prompts))
    from .offload import execution_device

    # not `model.device`: with CPU offload the weights sit on "meta" (or the CPU) between calls
    device = torch.device(device) if device is not None else execution_device(model)
    layout = model.config.unirep
    if force_size:
        if height is None or width is None:
            raise ValueError("height and width are required when force_size=True.")
        layout.size_units(height, "height")
        layout.size_units(width, "width")
    # the span of the largest image the call can make: the requested size, or the largest the model may sample
    largest_side = layout.max_size_units * layout.patch_size
    most = layout.grid_length(*layout.grid_shape(*((height, width) if force_size else (largest_side,) * 2)))
    if speculative_window and speculative_window > most:
        raise ValueError(
            f"speculative_window={speculative_window} is larger than the image span ({most} tokens after the size "
            f"tokens): use at most {most}."
        )
    if force_size:
        sizes, forwards_before = [(height, width)] * len(prompts), 0
    else:
        sizes, forwards_before = _sample_sizes(model, prompts, image_top_k, temperature, do_sample, generator, device), 2
    sampling = dict(negative_prompts=negative_prompts, guidance_scale=guidance_scale, image_top_k=image_top_k,
                    temperature=temperature, do_sample=do_sample, generator=generator, compile=compile,
                    callback=callback, progress_bar=progress_bar, device=device, forwards_before=forwards_before)
    if speculative_window:
        from .speculative import speculative_generate

        largest = max(layout.grid_length(*layout.grid_shape(h, w)) for h, w in sizes)
        if speculative_window > largest:
            logger.info("speculative_window %d > the sampled images' span %d: using %d", speculative_window, largest, largest)
        return speculative_generate(model, prompts, sizes, window=min(speculative_window, largest), **sampling)
    return _token_by_token(model, prompts, sizes, **sampling)


def _check_request(cfg, prompts, negative_prompts, guidance_scale, image_top_k, temperature, do_sample,
                   speculative_window) -> None:
    """Refuse sampling arguments that cannot work, before anything runs on the device."""
    if not prompts:
        raise ValueError("no prompts given.")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}.")
    if image_top_k is not None and image_top_k < 1:
        raise ValueError(f"image_top_k must be >= 1 (or None for no top-k), got {image_top_k}.")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}.")
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts: give one per prompt.")
    if getattr(cfg, "mask_image_logits", False):
        raise ValueError(
            "this model's config has mask_image_logits=True (stock Chameleon): its forward hides every image-code "
            "logit, so it cannot write images. Set model.config.mask_image_logits = False to generate."
        )
    if speculative_window is not None:
        if isinstance(speculative_window, bool) or not isinstance(speculative_window, int) or speculative_window < 0:
            raise ValueError(
                f"speculative_window must be an integer >= 0 (the tokens per forward; 0 or None for plain decoding), "
                f"got {speculative_window!r}."
            )


def _step_plan(cfg, sizes, n_steps, device):
    """The step schedule, planned from Python ints so that the decode loop never reads the device: per step its
    kind (a free code, a forced row end / end token; "mixed" when rows have different grids, resolved per row on
    the device), the output buffer with the forced tokens already written, and for mixed grids the per-row grid
    tensors."""
    layout = cfg.unirep
    batch = len(sizes)
    grid_rows = [layout.grid_shape(h, w)[0] for h, w in sizes]
    grid_cols = [layout.grid_shape(h, w)[1] for h, w in sizes]
    if len(set(sizes)) == 1:
        schedule = layout.step_kinds(grid_rows[0], grid_cols[0], n_steps)
        forced = [cfg.image_row_end_token_id if k == "row_end" else cfg.image_end_token_id for k in schedule]
        return schedule, torch.tensor([forced] * batch, dtype=torch.long).to(device), None
    out_tokens = torch.full((batch, n_steps), cfg.image_end_token_id, dtype=torch.long, device=device)
    grid_shape = (
        torch.tensor(grid_rows, device=device),
        torch.tensor(grid_cols, device=device),
        torch.full((batch,), cfg.image_row_end_token_id, dtype=torch.long, device=device),
        torch.full((batch,), cfg.image_end_token_id, dtype=torch.long, device=device),
    )
    return ["mixed"] * n_steps, out_tokens, grid_shape


def _guided_prompt_batch(cfg, prompts, negative_prompts, prefixes, use_cfg: bool, n_steps: int, cache_steps: int,
                         device):
    """The left-padded prompt rows of a guided batch: each prompt followed by its image prefix, then with guidance
    the negative prompts (default: empty) followed by the same prefixes. Refuses a longest context that leaves no
    room for the image's `n_steps` in the model's context. The cache holds the longest context plus `cache_steps`,
    rounded up by `_cache_length`. Returns `ids, mask, pos` (left-padded to the cache length), the longest
    context's length and the cache length."""
    contexts = [list(p) + pre for p, pre in zip(prompts, prefixes)]
    if use_cfg:
        negs = negative_prompts or [[] for _ in range(len(prompts))]
        contexts += [list(n) + pre for n, pre in zip(negs, prefixes)]
    prompt_len = max(len(c) for c in contexts)
    if prompt_len + n_steps > cfg.max_position_embeddings:
        raise ValueError(
            f"the prompt ({prompt_len} tokens) plus the image ({n_steps} tokens) exceed the model's context of "
            f"{cfg.max_position_embeddings} tokens: shorten the prompt or ask for a smaller image."
        )
    cache_len = _cache_length(prompt_len + cache_steps, cfg.max_position_embeddings)
    ids, mask, pos = _left_pad(contexts, cfg.pad_token_id, cache_len, device)
    return ids, mask, pos, prompt_len, cache_len


def _token_by_token(model, prompts, sizes, *, negative_prompts, guidance_scale, image_top_k, temperature, do_sample,
                    generator, compile, callback, progress_bar, device, forwards_before) -> ImageGenerationOutput:
    """Plain guided decoding of the images of `sizes`: one token per row per forward."""
    cfg = model.config
    layout = cfg.unirep
    batch = len(prompts)
    span = [layout.grid_length(*layout.grid_shape(h, w)) for h, w in sizes]
    n_steps = max(span)
    prefixes = [layout.prefix(h, w) for h, w in sizes]

    use_cfg = guidance_scale != 1.0
    ids, mask, pos, _, cache_len = _guided_prompt_batch(cfg, prompts, negative_prompts, prefixes, use_cfg, n_steps,
                                                        n_steps, device)

    # Image codes in code order: the sampler works on this gathered slice of the vocabulary.
    code_ids = model.model.image_code_to_id.to(device)
    schedule, out_tokens, grid_shape = _step_plan(cfg, sizes, n_steps, device)

    step_fn = _decode_step_for(model, code_ids, compile, cache_len, ids.shape[0], device)
    step_fn.start()
    # The prompt goes through the model's own forward (so hooks such as CPU offload move the model to the
    # device first); only the last position's image-code logits are kept.
    prefill = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=step_fn.cache, use_cache=True, logits_to_keep=1)
    logits = prefill.logits[:, -1].index_select(-1, code_ids.to(prefill.logits.device)).to(device)
    del prefill
    step_fn.load_head(model)
    counted = _CountedCalls(step_fn)
    interrupted = _decode_loop(
        counted,
        logits,
        schedule,
        out_tokens=out_tokens,
        code_ids=code_ids,
        position=pos[:, -1:],
        mask=mask,
        guidance_scale=guidance_scale,
        use_cfg=use_cfg,
        image_top_k=image_top_k,
        temperature=temperature,
        do_sample=do_sample,
        generator=generator,
        grid_shape=grid_shape,
        callback=callback,
        progress_bar=progress_bar,
    )

    prefix = torch.tensor(prefixes, dtype=torch.long).to(device)
    if grid_shape is None:
        sequences = torch.cat([prefix, out_tokens], dim=1)
    else:
        sequences = [torch.cat([prefix[b], out_tokens[b, : span[b]]]) for b in range(batch)]
    return ImageGenerationOutput(
        sequences=sequences, sizes=sizes, interrupted=interrupted, num_forwards=forwards_before + 1 + counted.calls
    )


__all__ = [
    "COMPILE_MODES",
    "ImageGenerationOutput",
    "clear_decode_cache",
    "UniRepLogitsProcessor",
    "generate_image_tokens",
    "gumbel_sample",
    "draw_uniform",
    "top_k_filter",
]
