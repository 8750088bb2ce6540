"""Guided image decoding for Lumina-mGPT, on public transformers APIs only
(the model's `forward`, `StaticCache`, `LogitsProcessor`).

Why our own loop instead of `model.generate(guidance_scale=...)`: transformers runs the unconditional
branch as a second, eager forward per step (the reference's cost: the weights are read twice per step).
Here the conditional and unconditional rows are one left-padded batch with one static KV cache, the grid
constraint is computed from the step index alone (no host synchronisation), and the sampler only looks at
the image-code logits inside an image.

Sampling uses the Gumbel-max form of multinomial sampling: `argmax(log_softmax(z / T) - log(-log U))`
with `U` uniform noise drawn per row and per step from that row's `torch.Generator` over the codebook (in
code order). It samples exactly the softmax distribution, and makes a row's result independent of the
batch it is in (given a per-row generator) and reproducible by a plain reference loop.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, StaticCache

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


def normalize_generators(generator, batch_size: int) -> list[torch.Generator] | torch.Generator | None:
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(
                f"got a list of {len(generator)} generators for {batch_size} images: give one per image "
                "(prompts x num_images_per_prompt) or a single generator."
            )
        return list(generator)
    return generator


def draw_uniform(generator, rows: int, n: int, device) -> torch.Tensor:
    """`(rows, n)` uniform noise in (0, 1): one draw of `n` per row from that row's generator, or one
    `(rows, n)` draw from a single generator."""
    if isinstance(generator, list):
        u = torch.stack([torch.rand(n, generator=g, device=g.device) for g in generator]).to(device)
    else:
        gen_device = generator.device if generator is not None else device
        u = torch.rand((rows, n), generator=generator, device=gen_device).to(device)
    return u.clamp_(min=torch.finfo(u.dtype).tiny)


def gumbel_sample(logits: torch.Tensor, uniform: torch.Tensor, temperature: float) -> torch.Tensor:
    """Index sampled from `softmax(logits / temperature)` (rows), using the given uniform noise. Entries at
    -inf (filtered by top-k or a constraint) are never chosen."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return torch.argmax(logp - torch.log(-torch.log(uniform)), dim=-1)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    if k is None or k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


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


def _left_pad(contexts: list[list[int]], pad_id: int, total: int, device):
    """Left-padded `(R, L)` ids, a `(R, total)` attention mask (ones after the prompt) and position ids."""
    n = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), n), pad_id, dtype=torch.long)
    mask = torch.ones((len(contexts), total), dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, n - len(c) :] = torch.tensor(c, dtype=torch.long)
        mask[i, : n - len(c)] = 0
    pos = (mask[:, :n].cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


class _DecodeStep:
    """One decoding step `(token (R, 1), position (R, 1)) -> image-code logits (R, n_codes)` against a static
    cache. Only the lm_head rows of the image codes are applied (inside an image nothing else can be
    sampled), which skips most of the 65536-wide head. Optionally `torch.compile`d: every input has a fixed
    shape, so it compiles once per batch size."""

    def __init__(self, model, code_ids: torch.Tensor, compile: bool | str = False):
        self.model = model
        self.head = model.lm_head.weight.index_select(0, code_ids)
        fn = self._step
        if compile:
            mode = compile if isinstance(compile, str) else None
            fn = torch.compile(fn, mode=mode, fullgraph=False, dynamic=False)
        self.fn = fn
        self.calls = 0

    def _step(self, token, position, mask, cache):
        hidden = self.model.model(
            input_ids=token, attention_mask=mask, position_ids=position, cache=cache, use_cache=True
        ).last_hidden_state
        return F.linear(hidden[:, -1], self.head)

    def __call__(self, token, position, mask, cache):
        self.calls += 1
        return self.fn(token, position, mask, cache)


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
    speculative_window: int | None = None,
) -> ImageGenerationOutput:
    """Generate one image per prompt with classifier-free guidance (Lumina-mGPT's sampler: guidance on raw logits
    inside the image, the UniRep grid constraint, image top-k, temperature).

    Args:
        prompts: token id lists, each the full conditional context up to and including the last user
            separator (`<s>...<reserved08706>`); the image prefix is appended here.
        height, width: pixels (multiples of the 32 px grid unit). Forced as the size tokens when
            `force_size`; otherwise the model samples them as in the reference.
        negative_prompts: per-prompt unconditional context before the image prefix (default: none, i.e.
            the unconditional row is the image alone `[<racm3:break>, h, w, ...]`, positions from 0).
        guidance_scale: `uncond + g * (cond - uncond)` on raw logits inside the image; 1.0 skips the
            unconditional rows.
        image_top_k, temperature, do_sample: sampling after guidance and the grid constraint.
        generator: one `torch.Generator`, or a list with one per prompt (results then do not depend on
            the batch a prompt is in).
        compile: `torch.compile` the decode step (`True` or a mode such as "reduce-overhead").
        callback: `callback(step, tokens_so_far) -> stop`; returning True interrupts the loop.
        progress_bar: an object with `update(n)` (e.g. a tqdm bar).
        speculative_window: `None` or 0 for plain decoding (one token per forward); `N >= 1` for lossless
            speculative Jacobi decoding (`lumina_hf.speculative`): each forward feeds `N` tokens per row (the
            last decided one and `N - 1` drafts) and decides up to `N`, sampling the same distribution as plain
            decoding (the same tokens when greedy). Under sampling the tokens for a given seed differ from
            plain decoding's and depend on the batch. At most the image's span (its tokens after the size
            tokens).
    """
    cfg = model.config
    if not prompts:
        raise ValueError("no prompts given.")
    batch = len(prompts)
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}.")
    if image_top_k is not None and image_top_k < 1:
        raise ValueError(f"image_top_k must be >= 1 (or None for no top-k), got {image_top_k}.")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}.")
    if negative_prompts is not None and len(negative_prompts) != batch:
        raise ValueError(f"{len(negative_prompts)} negative prompts for {batch} prompts: give one per prompt.")
    generator = normalize_generators(generator, batch)
    device = model.device
    layout = cfg.unirep
    if speculative_window is not None:
        if isinstance(speculative_window, bool) or not isinstance(speculative_window, int) or speculative_window < 0:
            raise ValueError(
                f"speculative_window must be an integer >= 0 (the tokens per forward; 0 or None for plain decoding), "
                f"got {speculative_window!r}."
            )

    if force_size:
        if height is None or width is None:
            raise ValueError("height and width are required when force_size=True.")
        layout.size_units(height, "height")
        layout.size_units(width, "width")
        sizes = [(height, width)] * batch
    # the span of the largest image the call can make: the requested size, or the largest the model may sample
    largest_side = layout.max_size_units * layout.patch_size
    most = layout.grid_length(*layout.grid_shape(*((height, width) if force_size else (largest_side,) * 2)))
    if speculative_window and speculative_window > most:
        raise ValueError(
            f"speculative_window={speculative_window} is larger than the image span ({most} tokens after the size "
            f"tokens): use at most {most}."
        )
    if not force_size:
        sizes = _sample_sizes(model, prompts, image_top_k, temperature, do_sample, generator, device)
    forwards_before = 0 if force_size else 2

    if speculative_window:
        from .speculative import speculative_generate

        largest = max(layout.grid_length(*layout.grid_shape(h, w)) for h, w in sizes)
        if speculative_window > largest:
            logger.info("speculative_window %d > the sampled images' span %d: using %d", speculative_window, largest, largest)
        return speculative_generate(
            model, prompts, sizes, window=min(speculative_window, largest), negative_prompts=negative_prompts,
            guidance_scale=guidance_scale, image_top_k=image_top_k, temperature=temperature, do_sample=do_sample,
            generator=generator, compile=compile, callback=callback, progress_bar=progress_bar,
            forwards_before=forwards_before,
        )

    # The step schedule is planned here from Python ints, so the decode loop never reads the device.
    grid_rows = [layout.grid_shape(h, w)[0] for h, w in sizes]
    grid_cols = [layout.grid_shape(h, w)[1] for h, w in sizes]
    uniform = len(set(sizes)) == 1
    span = [layout.grid_length(*layout.grid_shape(h, w)) for h, w in sizes]
    n_steps = max(span)
    prefixes = [layout.prefix(h, w) for h, w in sizes]

    use_cfg = guidance_scale != 1.0
    contexts = [list(p) + pre for p, pre in zip(prompts, prefixes)]
    if use_cfg:
        negs = negative_prompts or [[] for _ in range(batch)]
        contexts += [list(n) + pre for n, pre in zip(negs, prefixes)]
    if max(len(c) for c in contexts) + n_steps > cfg.max_position_embeddings:
        raise ValueError(
            f"the prompt ({max(len(c) for c in contexts)} tokens) plus the image ({n_steps} tokens) exceed the "
            f"model's context of {cfg.max_position_embeddings} tokens: shorten the prompt or ask for a smaller image."
        )
    prompt_len = max(len(c) for c in contexts)
    total = prompt_len + n_steps
    ids, mask, pos = _left_pad(contexts, cfg.pad_token_id, total, device)

    # Image codes in code order: the sampler works on this gathered slice of the vocabulary.
    code_ids = model.model.image_code_to_id.to(device)
    n_codes = code_ids.numel()
    out_tokens = torch.full((batch, n_steps), cfg.image_end_token_id, dtype=torch.long, device=device)
    row_end = torch.full((batch,), cfg.image_row_end_token_id, dtype=torch.long, device=device)
    end = torch.full((batch,), cfg.image_end_token_id, dtype=torch.long, device=device)
    schedule = layout.step_kinds(grid_rows[0], grid_cols[0], n_steps) if uniform else ["mixed"] * n_steps
    if not uniform:  # per-row grid shapes, on the device once, for the per-step masks
        rows_t = torch.tensor(grid_rows, device=device)
        cols_t = torch.tensor(grid_cols, device=device)

    cache = StaticCache(config=cfg, max_cache_len=total)
    step_fn = _DecodeStep(model, code_ids, compile)
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    logits = F.linear(hidden.last_hidden_state[:, -1], step_fn.head)
    position = pos[:, -1:]
    interrupted = False
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
                token = torch.where(s % (cols_t + 1) == cols_t, row_end, token)
                token = torch.where(rows_t * (cols_t + 1) <= s, end, token)
        else:
            token = row_end if kind == "row_end" else end
        out_tokens[:, s] = token
        if progress_bar is not None:
            progress_bar.update(1)
        # the callback sees the tokens so far and may replace them in place: what it leaves is what is fed
        if callback is not None and callback(s, out_tokens[:, : s + 1]):
            interrupted = s + 1 < n_steps
            break
        if s + 1 == n_steps or schedule[s + 1] == "end":
            continue  # the end token is forced: no logits needed for it
        feed = out_tokens[:, s].repeat(2) if use_cfg else out_tokens[:, s]
        position = position + 1
        logits = step_fn(feed[:, None], position, mask, cache)

    prefix = torch.tensor(prefixes, dtype=torch.long, device=device)
    if uniform:
        sequences = torch.cat([prefix, out_tokens], dim=1)
    else:
        sequences = [torch.cat([prefix[b], out_tokens[b, : span[b]]]) for b in range(batch)]
    return ImageGenerationOutput(
        sequences=sequences, sizes=sizes, interrupted=interrupted, num_forwards=forwards_before + 1 + step_fn.calls
    )


__all__ = [
    "ImageGenerationOutput",
    "UniRepLogitsProcessor",
    "generate_image_tokens",
    "gumbel_sample",
    "draw_uniform",
    "top_k_filter",
]
