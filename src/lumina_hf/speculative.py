"""Lossless speculative (Jacobi) decoding of Lumina-mGPT images: several image tokens per forward pass, drawn
from exactly the distribution of plain token-by-token decoding.

The method is Speculative Jacobi Decoding (SJD, Teng et al., arXiv 2410.01699) built into the batched guided
loop of `generation_lumina_mgpt`:

- Every forward feeds a fixed-size window of `W` tokens per row: the last decided token followed by `W - 1`
  draft tokens, through the static KV cache. Conditional and unconditional rows go through the same forward,
  so classifier-free guidance, the grid constraint, top-k and temperature are applied at every window position
  exactly as plain decoding applies them at one position. The forward yields the model's distribution `p` at
  the `W` positions after the fed tokens.
- Drafts are verified left to right with the speculative-sampling rule (Leviathan et al., arXiv 2211.17192;
  Chen et al., arXiv 2302.01318): a draft `d` drawn from a draft distribution `q` is accepted with probability
  `min(1, p(d) / q(d))`; the first rejected position is resampled from the normalised residual
  `max(0, p - q)`, and the position after the last fed draft is sampled from `p` itself. Whatever `q` is, each
  decided token then follows `p` given the decided prefix, so the output distribution is the plain sampler's.
  Greedy decoding (`do_sample=False`) is the same rule with one-hot `p` and `q`: a draft is kept when it is
  the argmax, which reproduces plain greedy decoding token for token.
- The undecided rest of the window is redrafted from the `p` just computed (conditioned on the drafts before
  it: the Jacobi refinement), which becomes its `q` for the next forward.
- Coupled draft noise: a position's draft is `argmax(log q + G)` with Gumbel noise `G` drawn once per position
  and reused every time the position is redrafted (the Gumbel-max form of sampling from `q`). While a
  position's context stays the same its draft does not change, so the drafts settle into a fixed point as in
  greedy Jacobi decoding instead of being re-randomised at every forward. This is still lossless: `G` of a
  position only ever decides that position's draft, and neither the decided prefix nor the draft distribution
  `q` of that position depend on it, so the draft is a sample of `q` when it is verified (acceptance uniforms
  and residual noise are fresh at every forward).
- UniRep structure: row-end and end tokens are known in advance; they are written into the window, never
  drafted or rejected. Positions entering the window start from the token above (same column, previous row;
  a deterministic draft, `q` one-hot; `draft_init="above"`, the default; `"left"` and `"random"` are the
  alternatives, all lossless). Later drafts come from the model; the first draft only matters until then.

Batches: rows accept different numbers of tokens. All rows share the cache slots of the window (slot = prompt
length + step), and each forward starts at the slowest row's last decided token; a row that is ahead re-feeds
its decided tokens from there (their keys and values are recomputed, identical) and verifies drafts in the rest
of its window. The cost: a row that is `a` tokens ahead of the slowest verifies `W - a` new positions in that
forward instead of `W`; the batch needs as many forwards as its slowest row anyway. Per-row cache offsets
would avoid the re-feeding but need per-row cache writes, which transformers' `StaticCache` does not offer.

Cache correctness: after each forward the cache's write position is moved back to the slot of the next first
fed token with the public `Cache.crop(-n)`; slots beyond it hold keys/values of rejected drafts, which the
causal mask over cache slots hides from every query, and the next forward overwrites them before any query
could reach them.

Host synchronisation: one per forward (the slowest row's progress, read to decide where the next window starts
and whether to stop), plus one more when a step callback is given (to see whether it edited tokens). The window
shape is fixed, so with `compile=True` the window step compiles once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .generation_lumina_mgpt import (
    _COMPILED_STEPS,
    ImageGenerationOutput,
    _cache_length,
    _DecodeStep,
    _left_pad,
    draw_uniform,
    top_k_filter,
)

logger = logging.getLogger(__name__)

DRAFT_INITS = ("above", "left", "random")
COUPLINGS = ("gumbel", "maximal", "independent")


class _WindowStep(_DecodeStep):
    """The decode step over a window: `(tokens (R, W), positions (R, W)) -> image-code logits (R, W, n_codes)`
    against the step's static cache; otherwise the single-token step (image-code rows of the head only,
    optional `torch.compile` with CUDA graphs, cache kept between compiled calls)."""

    def _step(self, token, position, mask, cache):
        hidden = self.decoder(
            input_ids=token, attention_mask=mask, position_ids=position, cache=cache, use_cache=True
        ).last_hidden_state
        # with a `device_map` the head may sit on another device than the loop: the logits come back to it
        return F.linear(hidden.to(self.head.device), self.head).to(self.code_ids.device)


def _window_step_for(model, code_ids, compile, cache_len: int, rows: int, window: int, device) -> _WindowStep:
    """As `_decode_step_for`: eager steps per call; a compiled one reused while its shapes stay the same. It takes
    the model's one slot for a kept compiled step (so `clear_decode_cache` frees it too)."""
    if not compile:
        return _WindowStep(model, code_ids, compile, cache_len)
    key = ("window", window, compile, cache_len, rows, model.dtype, torch.device(device))
    step = _COMPILED_STEPS.get(model)
    if step is None or getattr(step, "key", None) != key:
        _COMPILED_STEPS.pop(model, None)  # free the old cache before allocating the new one
        step = _WindowStep(model, code_ids, compile, cache_len)
        step.key = key
        _COMPILED_STEPS[model] = step
    return step


def speculative_accept(p_draft: torch.Tensor, q_draft: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The speculative-sampling acceptance test: a draft with probability `q_draft` under its draft distribution
    and `p_draft` under the model is kept with probability `min(1, p_draft / q_draft)` (`uniform` in (0, 1))."""
    return uniform * q_draft < p_draft


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where a rejected draft's replacement is drawn from: `max(0, p - q)` (unnormalised; sampling normalises).
    Falls back to `p` where the residual is empty (`p == q` up to rounding, when a rejection is impossible)."""
    res = (p - q).clamp(min=0)
    return torch.where(res.sum(-1, keepdim=True) > 0, res, p)


def _one_hot(index: torch.Tensor, n: int) -> torch.Tensor:
    """Float one-hot rows (`F.one_hot` reads the indices back to the host to check them)."""
    return (index[..., None] == torch.arange(n, device=index.device)).float()


def _window_mask(pad: torch.Tensor, start: int, window: int, attn_implementation: str, dtype) -> torch.Tensor | None:
    """The 4-D attention mask of a window forward: query `i` (cache slot `start + i`) sees the slots up to its
    own that hold tokens (`pad`, `(rows, cache_len)` booleans). Passing it ready-made keeps transformers'
    mask builder from reading the cache's write position back to the host (it does so for queries longer
    than one token). Boolean for SDPA, additive for eager attention; None for other implementations (they
    get the 2-D mask)."""
    if attn_implementation not in ("sdpa", "eager"):
        return None
    slots = torch.arange(pad.shape[1], device=pad.device)
    queries = start + torch.arange(window, device=pad.device)
    allowed = pad[:, None, None, :] & (slots[None, None, None, :] <= queries[None, None, :, None])
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=pad.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _gumbel(uniform: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(uniform))


@torch.no_grad()
def speculative_generate(
    model,
    prompts: Sequence[Sequence[int]],
    sizes: Sequence[tuple[int, int]],
    *,
    window: int,
    negative_prompts: Sequence[Sequence[int]] | None = None,
    guidance_scale: float = 4.0,
    image_top_k: int | None = 2000,
    temperature: float = 1.0,
    do_sample: bool = True,
    generator=None,
    compile: bool | str = False,
    callback: Callable[[int, torch.Tensor], bool] | None = None,
    progress_bar=None,
    draft_init: str = "above",
    coupling: str = "gumbel",
    device=None,
    forwards_before: int = 0,
) -> ImageGenerationOutput:
    """Generate one image per prompt (sizes already chosen) with speculative Jacobi decoding, `window` tokens per
    forward. Arguments as `generate_image_tokens`; `generator` is one generator or a list with one per prompt
    (as there, already checked); `device` where the inputs and the sampler live (default: the model's).
    `forwards_before`: forwards already spent (size sampling), added to `num_forwards`.

    The two choices below are lossless whatever their value; they only change how many drafts are accepted.

    `draft_init`: the first draft of a position entering the window: "above" (the token in the same column of
    the previous row, else the last token before it), "left" (the last token before the new positions) or
    "random" (uniform over the codes, as in SJD). `coupling`: how a position is redrafted from a new `p`:
    "gumbel" (the position's fixed Gumbel noise, see the module notes), "maximal" (keep the old draft with
    probability `min(1, p/q)`, else draw from `max(0, p - q)`: the maximal coupling of MC-SJD, arXiv
    2510.24211) or "independent" (a fresh sample every forward, as in SJD).

    Under sampling the result follows the plain sampler's distribution but not its exact tokens for a seed, and
    a row's tokens depend on the batch it is in (the number of forwards, hence of noise draws, does)."""
    if draft_init not in DRAFT_INITS:
        raise ValueError(f"draft_init must be one of {', '.join(DRAFT_INITS)}, got {draft_init!r}.")
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {', '.join(COUPLINGS)}, got {coupling!r}.")
    cfg = model.config
    layout = cfg.unirep
    device = torch.device(device) if device is not None else model.device
    batch = len(prompts)
    W = int(window)

    grid_rows = [layout.grid_shape(h, w)[0] for h, w in sizes]
    grid_cols = [layout.grid_shape(h, w)[1] for h, w in sizes]
    span = [layout.grid_length(r, c) for r, c in zip(grid_rows, grid_cols)]
    n_steps = max(span)
    length = n_steps + W + 1  # steps held in the buffers: the image, then end-token padding the window may reach
    prefixes = [layout.prefix(h, w) for h, w in sizes]

    use_cfg = guidance_scale != 1.0
    contexts = [list(p) + pre for p, pre in zip(prompts, prefixes)]
    if use_cfg:
        negs = negative_prompts or [[] for _ in range(batch)]
        contexts += [list(n) + pre for n, pre in zip(negs, prefixes)]
    prompt_len = max(len(c) for c in contexts)
    if prompt_len + n_steps > cfg.max_position_embeddings:
        raise ValueError(
            f"the prompt ({prompt_len} tokens) plus the image ({n_steps} tokens) exceed the model's context of "
            f"{cfg.max_position_embeddings} tokens: shorten the prompt or ask for a smaller image."
        )
    cache_len = _cache_length(prompt_len + length, cfg.max_position_embeddings)
    ids, mask, pos = _left_pad(contexts, cfg.pad_token_id, cache_len, device)
    pad = mask.bool()
    # transformers has no public getter for the attention implementation; its own mask builders read this property
    attn_impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
    pos_next = pos[:, -1:] + 1  # position of step 0, per row

    code_ids = model.model.image_code_to_id.to(device)
    n_codes = code_ids.numel()
    code_of = torch.zeros(cfg.vocab_size, dtype=torch.long, device=device)  # token id -> code index
    code_of[code_ids] = torch.arange(n_codes, device=device)

    # What is known in advance, per row and step: row ends, the end token and the padding after it.
    steps = torch.arange(length, device=device)
    rows_t = torch.tensor(grid_rows, device=device)[:, None]
    cols_t = torch.tensor(grid_cols, device=device)[:, None]
    grid_len = rows_t * (cols_t + 1)
    forced_tok = torch.full((batch, length), -1, dtype=torch.long, device=device)
    forced_tok = torch.where((steps < grid_len) & (steps % (cols_t + 1) == cols_t), layout.row_end_token_id, forced_tok)
    forced_tok = torch.where(steps >= grid_len, layout.image_end_token_id, forced_tok)
    forced = forced_tok >= 0
    # a row is complete once every code is decided: the steps from its last row end on are forced
    complete_at = (grid_len - 1).squeeze(1)

    # `tokens`: decided tokens, then the current drafts (token ids); forced steps hold their token from the start
    tokens = torch.where(forced, forced_tok, code_ids[0])
    decided = torch.zeros(batch, dtype=torch.long, device=device)
    row_idx = torch.arange(batch, device=device)
    k_idx = torch.arange(W, device=device)
    fed = k_idx < W - 1  # window position k predicts step c + 1 + k; the last one's draft is not fed

    def draw(n_per_row: int) -> torch.Tensor:
        return draw_uniform(generator, batch, n_per_row, device)

    def init_drafts(lo: int, hi: int, gumbel: torch.Tensor | None) -> torch.Tensor:
        """Draft tokens and their (one-hot or uniform) draft distributions for steps `lo..hi-1`, which have not
        been predicted yet. Writes the drafts into `tokens`; returns `q` of shape (batch, hi - lo, n_codes)."""
        s = torch.arange(lo, hi, device=device)[None]
        if draft_init == "random":
            # uniform q; the draft is its Gumbel-max sample (the coupled noise of the position)
            choice = gumbel.argmax(-1) if gumbel is not None else torch.zeros_like(s.expand(batch, -1))
            q = torch.full((batch, hi - lo, n_codes), 1.0 / n_codes, device=device)
        else:
            if draft_init == "above":
                row = cols_t + 1
                src = s - ((s - lo) // row + 1) * row  # the nearest step in the same column before `lo`
            else:
                src = torch.full_like(s, lo - 1)  # the last step before the new ones
            src = src.expand(batch, -1)
            src_tok = tokens.gather(1, src.clamp(min=0))
            usable = (src >= 0) & ~forced.gather(1, src.clamp(min=0))
            # no earlier code in reach (the first window): the code of the last step before `lo`, else code 0
            fallback = tokens[:, lo - 1 : lo].expand_as(src_tok) if lo > 0 else None
            if fallback is not None:
                usable_fb = ~forced[:, lo - 1 : lo].expand_as(src_tok)
                src_tok = torch.where(usable, src_tok, torch.where(usable_fb, fallback, code_ids[0]))
            else:
                src_tok = torch.where(usable, src_tok, code_ids[0])
            choice = code_of[src_tok]
            q = _one_hot(choice, n_codes)
        cur_forced = forced[:, lo:hi]
        tokens[:, lo:hi] = torch.where(cur_forced, forced_tok[:, lo:hi], code_ids[choice])
        return q

    def feed_ids(lo: int, hi: int) -> torch.Tensor:
        t = tokens[:, lo:hi]
        return t.repeat(2, 1) if use_cfg else t

    # window buffers for the predicted steps c+1 .. c+W: draft distributions and coupled Gumbel noise
    gumbel = _gumbel(draw(W * n_codes).view(batch, W, n_codes)) if do_sample else None
    q = init_drafts(0, W, gumbel)

    step_fn = _window_step_for(model, code_ids, compile, cache_len, len(contexts), W, device)
    step_fn.start()
    cache = step_fn.cache
    # first forward: the prompts with the first W - 1 drafts (steps 0..W-2); its last W positions predict 0..W-1.
    # It goes through the model's own forward (hooks such as CPU offload move the model to the device first).
    first = torch.cat([ids, feed_ids(0, W - 1)], dim=1)
    first_pos = torch.cat([pos, pos_next + torch.arange(W - 1, device=device)], dim=1)
    prefill = model(input_ids=first, attention_mask=mask, position_ids=first_pos, cache=cache, use_cache=True,
                    logits_to_keep=W)
    logits = prefill.logits[:, -W:].index_select(-1, code_ids.to(prefill.logits.device)).to(device)
    del prefill
    step_fn.load_head(model)
    num_forwards = forwards_before + 1
    c = -1  # step of the first fed token (-1: the last prompt token)
    front = 0  # steps decided for every row (reported to the callback / progress bar)
    accepted: list[torch.Tensor] = []
    interrupted = False
    bar_steps = 0

    while True:
        # ---- target distributions at steps c+1 .. c+W, exactly as the plain sampler processes one step
        lg = logits.float()
        if use_cfg:
            cond, unc = lg[:batch], lg[batch:]
            lg = unc + guidance_scale * (cond - unc)
        lg = top_k_filter(lg, image_top_k)
        if do_sample:
            logp = torch.log_softmax(lg / temperature, dim=-1)
            p = logp.exp()
            redraft = (logp + gumbel).argmax(-1)
        else:
            redraft = lg.argmax(-1)
            p = _one_hot(redraft, n_codes)

        # ---- verify left to right
        s_lo, s_hi = c + 1, c + 1 + W
        win_tok = tokens[:, s_lo:s_hi]
        draft = code_of[win_tok]
        p_d = p.gather(-1, draft[..., None]).squeeze(-1)
        q_d = q.gather(-1, draft[..., None]).squeeze(-1)
        if do_sample:
            u = draw(W + n_codes)
            u_acc, g_res = u[:, :W], _gumbel(u[:, W:])
        else:
            u_acc, g_res = torch.full((batch, W), 0.5, device=device), None
        already = (s_lo + k_idx)[None] < decided[:, None]
        ok = already | forced[:, s_lo:s_hi] | (fed[None] & speculative_accept(p_d, q_d, u_acc))
        kstar = (ok.int().cumsum(1) == (k_idx + 1)[None]).sum(1)  # leading accepted positions, per row
        at = kstar.clamp(max=W - 1)
        q_at = q[row_idx, at] * fed[at][:, None]  # the unfed last draft counts as q = 0: sample from p
        res = residual_distribution(p[row_idx, at], q_at)
        if do_sample:
            new_code = (torch.log(res) + g_res).argmax(-1)
        else:
            new_code = res.argmax(-1)

        if do_sample and coupling == "independent":
            # plain SJD: every redraft is a fresh sample of the new p
            redraft = (logp + _gumbel(draw(W * n_codes).view(batch, W, n_codes))).argmax(-1)
        elif do_sample and coupling == "maximal":
            # maximal coupling of the old draft (a sample of q) with the new p: keep it with probability
            # min(1, p/q), else draw from the residual (fresh noise); the result is a sample of p
            u2 = draw(W + W * n_codes)
            keep = speculative_accept(p_d, q_d, u2[:, :W])
            res_all = residual_distribution(p, q)
            redraft = torch.where(keep, draft, (torch.log(res_all) + _gumbel(u2[:, W:].view(batch, W, n_codes))).argmax(-1))
        after = k_idx[None] > kstar[:, None]
        choice = torch.where(after, redraft, torch.where(k_idx[None] == kstar[:, None], new_code[:, None], draft))
        tokens[:, s_lo:s_hi] = torch.where(forced[:, s_lo:s_hi] | already, win_tok, code_ids[choice])
        q = torch.where(after[..., None], p, q)
        new_decided = torch.maximum(decided, s_lo + kstar + (kstar < W).long())
        # tokens each row decided in this forward, up to its last code (the trailing row end and end are free)
        accepted.append(torch.minimum(new_decided, complete_at) - torch.minimum(decided, complete_at))
        decided = new_decided

        # ---- the one host synchronisation of the iteration: how far every row is
        done_steps = torch.where(decided >= complete_at, n_steps, decided)
        new_front = int(done_steps.min())
        edited_rows = None
        if callback is not None or progress_bar is not None:
            # report the steps every row has now decided, in order, as plain decoding does
            before = tokens[:, front:new_front].clone() if callback is not None else None
            for s in range(front, new_front):
                if progress_bar is not None and s >= bar_steps:  # steps reported again after an edit count once
                    progress_bar.update(1)
                    bar_steps = s + 1
                if callback is not None and callback(s, tokens[:, : s + 1]):
                    interrupted = s + 1 < n_steps
                    new_front = s + 1
                    break
            if callback is not None and not interrupted:
                # one more synchronisation: did the callback replace tokens? An edited row keeps its prefix
                # through its first edited step, which is fed next; what it had decided after that becomes drafts
                # again (one-hot q: lossless given the edited prefix), decided and reported anew
                diff = tokens[:, front:new_front] != before
                edited = diff.any(1)
                first = torch.where(edited, diff.int().argmax(1), new_front - front)
                first_min = int(first.min())
                if first_min < new_front - front:
                    decided = torch.where(edited, front + first + 1, decided)
                    edited_rows = edited
                    new_front = front + first_min + 1
        front = new_front
        if interrupted or front >= n_steps:
            break

        # ---- the next window starts at the slowest row's last decided token (1 <= shift <= W)
        c_new = front - 1
        shift = c_new - c
        fresh = _gumbel(draw(shift * n_codes).view(batch, shift, n_codes)) if do_sample else None
        q = torch.cat([q[:, shift:], init_drafts(c + 1 + W, c_new + 1 + W, fresh)], dim=1)
        if do_sample:
            gumbel = torch.cat([gumbel[:, shift:], fresh], dim=1)
        if edited_rows is not None:
            onehot = _one_hot(code_of[tokens[:, c_new + 1 : c_new + 1 + W]], n_codes)
            q = torch.where(edited_rows[:, None, None], onehot, q)
        cache.crop(-(c + W - c_new))  # rewind the write position to the slot of step c_new
        c = c_new
        positions = pos_next + c + k_idx[None]
        window_mask = _window_mask(pad, prompt_len + c, W, attn_impl, model.dtype)
        logits = step_fn(feed_ids(c, c + W), positions, mask if window_mask is None else window_mask)
        num_forwards += 1

    out_tokens = tokens[:, :n_steps].clone()
    if interrupted:  # undecided codes read as the end token; row ends stay where they are, as in plain decoding
        out_tokens[:, front:] = torch.where(forced[:, front:n_steps], out_tokens[:, front:], layout.image_end_token_id)
    prefix = torch.tensor(prefixes, dtype=torch.long, device=device)
    if len(set(sizes)) == 1:
        sequences = torch.cat([prefix, out_tokens], dim=1)
    else:
        sequences = [torch.cat([prefix[b], out_tokens[b, : span[b]]]) for b in range(batch)]
    return ImageGenerationOutput(
        sequences=sequences,
        sizes=list(sizes),
        interrupted=interrupted,
        num_forwards=num_forwards,
        accepted_per_forward=torch.stack(accepted).cpu(),
    )
