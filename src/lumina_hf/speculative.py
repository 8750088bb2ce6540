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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .generation_lumina_mgpt import (
    ImageGenerationOutput,
    _DecodeStep,
    _guided_prompt_batch,
    _kept_compiled_step,
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
    return _kept_compiled_step(model, key, lambda: _WindowStep(model, code_ids, compile, cache_len))


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
    """Gumbel noise from uniform noise in (0, 1)."""
    return -torch.log(-torch.log(uniform))


@dataclass
class _Grid:
    """The images' steps as known before decoding: per row its prefix and span; per row and step the forced
    tokens (row ends, the end token and the end-token padding the window may reach)."""

    prefixes: list[list[int]]
    span: list[int]  # tokens after the size tokens, per row
    n_steps: int  # the longest span
    length: int  # steps held in the buffers: the image, then end-token padding the window may reach
    cols: torch.Tensor  # (batch, 1) grid columns
    forced_tok: torch.Tensor  # (batch, length) the known token, -1 where the model decides
    forced: torch.Tensor  # (batch, length) booleans
    complete_at: torch.Tensor  # (batch,) a row is complete once this many steps are decided
    end_token: int  # the image end token id


@dataclass
class _Jacobi:
    """What the decoding loop reads and never changes: the grid, the sampling options, the code tables, the
    prompt batch's mask and positions, and index vectors over the batch and the window."""

    grid: _Grid
    window: int
    batch: int
    use_cfg: bool
    guidance_scale: float
    image_top_k: int | None
    temperature: float
    do_sample: bool
    generator: object
    draft_init: str
    coupling: str
    device: torch.device
    code_ids: torch.Tensor  # code index -> token id
    code_of: torch.Tensor  # token id -> code index
    mask: torch.Tensor  # the prompt batch's 2-D attention mask over cache slots
    pad: torch.Tensor  # the same as booleans
    pos_next: torch.Tensor  # (rows, 1) position of step 0, per row
    prompt_len: int
    attn_impl: str
    dtype: torch.dtype
    row_idx: torch.Tensor  # arange(batch)
    k_idx: torch.Tensor  # arange(window)
    fed: torch.Tensor  # window position k predicts step c + 1 + k; the last one's draft is not fed

    @property
    def n_codes(self) -> int:
        """The number of image codes."""
        return self.code_ids.numel()

    def draw(self, n_per_row: int) -> torch.Tensor:
        """`(batch, n_per_row)` uniform noise from the call's generator(s)."""
        return draw_uniform(self.generator, self.batch, n_per_row, self.device)


@dataclass
class _LoopState:
    """What changes from forward to forward. The window's first fed token is step `c` (-1: the last prompt
    token); `q` and `gumbel` belong to the steps it predicts, `c + 1 .. c + W`."""

    tokens: torch.Tensor  # (batch, length) decided tokens, then the current drafts; forced steps hold their token
    q: torch.Tensor  # (batch, W, n_codes) the drafts' distributions
    gumbel: torch.Tensor | None  # (batch, W, n_codes) the drafts' coupled noise (sampling only)
    decided: torch.Tensor  # (batch,) steps decided per row
    c: int = -1
    front: int = 0  # steps decided for every row (reported to the callback / progress bar)
    bar_steps: int = 0  # steps the progress bar has counted
    interrupted: bool = False
    accepted: list[torch.Tensor] = field(default_factory=list)  # per forward, tokens each row decided


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
    device = torch.device(device) if device is not None else model.device
    W = int(window)
    grid = _grid_plan(cfg.unirep, sizes, W, device)
    use_cfg = guidance_scale != 1.0
    ids, mask, pos, prompt_len, cache_len = _guided_prompt_batch(
        cfg, prompts, negative_prompts, grid.prefixes, use_cfg, grid.n_steps, grid.length, device
    )
    code_ids = model.model.image_code_to_id.to(device)
    code_of = torch.zeros(cfg.vocab_size, dtype=torch.long, device=device)
    code_of[code_ids] = torch.arange(code_ids.numel(), device=device)
    run = _Jacobi(
        grid=grid, window=W, batch=len(prompts), use_cfg=use_cfg, guidance_scale=guidance_scale,
        image_top_k=image_top_k, temperature=temperature, do_sample=do_sample, generator=generator,
        draft_init=draft_init, coupling=coupling, device=device, code_ids=code_ids, code_of=code_of,
        mask=mask, pad=mask.bool(), pos_next=pos[:, -1:] + 1, prompt_len=prompt_len,
        # transformers has no public getter for the attention implementation; its own mask builders read this
        attn_impl=getattr(cfg, "_attn_implementation", None) or "sdpa", dtype=model.dtype,
        row_idx=torch.arange(len(prompts), device=device), k_idx=torch.arange(W, device=device),
        fed=torch.arange(W, device=device) < W - 1,
    )
    state = _first_drafts(run)

    step_fn = _window_step_for(model, code_ids, compile, cache_len, ids.shape[0], W, device)
    step_fn.start()
    logits = _prefill(model, step_fn, run, state, ids, pos)
    num_forwards = forwards_before + 1
    while True:
        _decide_window(run, state, logits)
        edited_rows = _report_steps(run, state, _slowest_front(run, state), callback, progress_bar)
        if state.interrupted or state.front >= grid.n_steps:
            break
        rewind = _advance_window(run, state, edited_rows)
        logits = _window_forward(step_fn, run, state, rewind)
        num_forwards += 1
    return _output(run, state, sizes, num_forwards)


def _grid_plan(layout, sizes, window: int, device) -> _Grid:
    """The grids of `sizes` and what is known in advance, per row and step: row ends, the end token and the
    padding after it."""
    batch = len(sizes)
    grid_rows = [layout.grid_shape(h, w)[0] for h, w in sizes]
    grid_cols = [layout.grid_shape(h, w)[1] for h, w in sizes]
    span = [layout.grid_length(r, c) for r, c in zip(grid_rows, grid_cols)]
    n_steps = max(span)
    length = n_steps + window + 1
    steps = torch.arange(length, device=device)
    rows_t = torch.tensor(grid_rows, device=device)[:, None]
    cols_t = torch.tensor(grid_cols, device=device)[:, None]
    grid_len = rows_t * (cols_t + 1)
    forced_tok = torch.full((batch, length), -1, dtype=torch.long, device=device)
    forced_tok = torch.where((steps < grid_len) & (steps % (cols_t + 1) == cols_t), layout.row_end_token_id, forced_tok)
    forced_tok = torch.where(steps >= grid_len, layout.image_end_token_id, forced_tok)
    return _Grid(
        prefixes=[layout.prefix(h, w) for h, w in sizes],
        span=span,
        n_steps=n_steps,
        length=length,
        cols=cols_t,
        forced_tok=forced_tok,
        forced=forced_tok >= 0,
        # a row is complete once every code is decided: the steps from its last row end on are forced
        complete_at=(grid_len - 1).squeeze(1),
        end_token=layout.image_end_token_id,
    )


def _init_drafts(run: _Jacobi, tokens: torch.Tensor, lo: int, hi: int, gumbel: torch.Tensor | None) -> torch.Tensor:
    """Draft tokens and their (one-hot or uniform) draft distributions for steps `lo..hi-1`, which have not
    been predicted yet. Writes the drafts into `tokens`; returns `q` of shape (batch, hi - lo, n_codes)."""
    grid, batch, n_codes, code_ids = run.grid, run.batch, run.n_codes, run.code_ids
    s = torch.arange(lo, hi, device=run.device)[None]
    if run.draft_init == "random":
        # uniform q; the draft is its Gumbel-max sample (the coupled noise of the position)
        choice = gumbel.argmax(-1) if gumbel is not None else torch.zeros_like(s.expand(batch, -1))
        q = torch.full((batch, hi - lo, n_codes), 1.0 / n_codes, device=run.device)
    else:
        if run.draft_init == "above":
            row = grid.cols + 1
            src = s - ((s - lo) // row + 1) * row  # the nearest step in the same column before `lo`
        else:
            src = torch.full_like(s, lo - 1)  # the last step before the new ones
        src = src.expand(batch, -1)
        src_tok = tokens.gather(1, src.clamp(min=0))
        usable = (src >= 0) & ~grid.forced.gather(1, src.clamp(min=0))
        # no earlier code in reach (the first window): the code of the last step before `lo`, else code 0
        fallback = tokens[:, lo - 1 : lo].expand_as(src_tok) if lo > 0 else None
        if fallback is not None:
            usable_fb = ~grid.forced[:, lo - 1 : lo].expand_as(src_tok)
            src_tok = torch.where(usable, src_tok, torch.where(usable_fb, fallback, code_ids[0]))
        else:
            src_tok = torch.where(usable, src_tok, code_ids[0])
        choice = run.code_of[src_tok]
        q = _one_hot(choice, n_codes)
    cur_forced = grid.forced[:, lo:hi]
    tokens[:, lo:hi] = torch.where(cur_forced, grid.forced_tok[:, lo:hi], code_ids[choice])
    return q


def _first_drafts(run: _Jacobi) -> _LoopState:
    """The loop's starting state: forced tokens in place, the first window's drafts (steps 0..W-1) with their
    draft distributions and coupled Gumbel noise, nothing decided."""
    W, n_codes = run.window, run.n_codes
    tokens = torch.where(run.grid.forced, run.grid.forced_tok, run.code_ids[0])
    decided = torch.zeros(run.batch, dtype=torch.long, device=run.device)
    gumbel = _gumbel(run.draw(W * n_codes).view(run.batch, W, n_codes)) if run.do_sample else None
    q = _init_drafts(run, tokens, 0, W, gumbel)
    return _LoopState(tokens=tokens, q=q, gumbel=gumbel, decided=decided)


def _feed_ids(run: _Jacobi, tokens: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The tokens of steps `lo..hi-1` as fed: once per row, twice (conditional, unconditional) with guidance."""
    t = tokens[:, lo:hi]
    return t.repeat(2, 1) if run.use_cfg else t


def _prefill(model, step_fn: _WindowStep, run: _Jacobi, state: _LoopState, ids, pos) -> torch.Tensor:
    """The first forward: the prompts with the first W - 1 drafts (steps 0..W-2), whose last W positions predict
    steps 0..W-1; returns their image-code logits. It goes through the model's own forward (hooks such as CPU
    offload move the model to the device first); the window step's head is loaded after it."""
    W, device = run.window, run.device
    first = torch.cat([ids, _feed_ids(run, state.tokens, 0, W - 1)], dim=1)
    first_pos = torch.cat([pos, run.pos_next + torch.arange(W - 1, device=device)], dim=1)
    prefill = model(input_ids=first, attention_mask=run.mask, position_ids=first_pos, cache=step_fn.cache,
                    use_cache=True, logits_to_keep=W)
    logits = prefill.logits[:, -W:].index_select(-1, run.code_ids.to(prefill.logits.device)).to(device)
    del prefill
    step_fn.load_head(model)
    return logits


def _target(run: _Jacobi, logits: torch.Tensor, gumbel: torch.Tensor | None):
    """The target distributions `p` at the window's steps, exactly as the plain sampler processes one step
    (guidance, top-k, temperature), with the log-probabilities (sampling only) and each position's redraft under
    its coupled noise (the argmax when greedy)."""
    lg = logits.float()
    if run.use_cfg:
        cond, unc = lg[: run.batch], lg[run.batch :]
        lg = unc + run.guidance_scale * (cond - unc)
    lg = top_k_filter(lg, run.image_top_k)
    if run.do_sample:
        logp = torch.log_softmax(lg / run.temperature, dim=-1)
        return logp.exp(), logp, (logp + gumbel).argmax(-1)
    redraft = lg.argmax(-1)
    return _one_hot(redraft, run.n_codes), None, redraft


def _verify(run: _Jacobi, state: _LoopState, p: torch.Tensor, draft: torch.Tensor, p_d, q_d):
    """Verify the window's drafts left to right: returns per row which positions were decided before this
    forward, the number of leading accepted positions `kstar`, and the code decided at position `kstar` (drawn
    from the residual of a rejected draft, or from `p` after the last fed draft)."""
    W, s_lo = run.window, state.c + 1
    if run.do_sample:
        u = run.draw(W + run.n_codes)
        u_acc, g_res = u[:, :W], _gumbel(u[:, W:])
    else:
        u_acc, g_res = torch.full((run.batch, W), 0.5, device=run.device), None
    already = (s_lo + run.k_idx)[None] < state.decided[:, None]
    ok = already | run.grid.forced[:, s_lo : s_lo + W] | (run.fed[None] & speculative_accept(p_d, q_d, u_acc))
    kstar = (ok.int().cumsum(1) == (run.k_idx + 1)[None]).sum(1)  # leading accepted positions, per row
    at = kstar.clamp(max=W - 1)
    q_at = state.q[run.row_idx, at] * run.fed[at][:, None]  # the unfed last draft counts as q = 0: sample from p
    res = residual_distribution(p[run.row_idx, at], q_at)
    new_code = (torch.log(res) + g_res).argmax(-1) if run.do_sample else res.argmax(-1)
    return already, kstar, new_code


def _coupled_redraft(run: _Jacobi, p, logp, q, draft, p_d, q_d, redraft: torch.Tensor) -> torch.Tensor:
    """The redraft of every window position from the new `p` under the chosen coupling: `redraft` as given
    ("gumbel", and greedy decoding), a fresh sample ("independent"), or the old draft kept with probability
    `min(1, p/q)` and else a residual sample ("maximal")."""
    if run.do_sample and run.coupling == "independent":
        # plain SJD: every redraft is a fresh sample of the new p
        return (logp + _gumbel(run.draw(run.window * run.n_codes).view(run.batch, run.window, run.n_codes))).argmax(-1)
    if run.do_sample and run.coupling == "maximal":
        # maximal coupling of the old draft (a sample of q) with the new p: keep it with probability
        # min(1, p/q), else draw from the residual (fresh noise); the result is a sample of p
        W, n_codes = run.window, run.n_codes
        u2 = run.draw(W + W * n_codes)
        keep = speculative_accept(p_d, q_d, u2[:, :W])
        res_all = residual_distribution(p, q)
        return torch.where(keep, draft, (torch.log(res_all) + _gumbel(u2[:, W:].view(run.batch, W, n_codes))).argmax(-1))
    return redraft


def _decide_window(run: _Jacobi, state: _LoopState, logits: torch.Tensor) -> None:
    """One forward's decisions: verify the window's drafts against the target distributions, write the decided
    tokens and the redrafts of the rest of the window into `state.tokens`, their draft distributions into
    `state.q`, and advance `state.decided` (recording the tokens each row decided in `state.accepted`)."""
    W, k_idx, code_ids, forced = run.window, run.k_idx, run.code_ids, run.grid.forced
    p, logp, redraft = _target(run, logits, state.gumbel)
    s_lo, s_hi = state.c + 1, state.c + 1 + W
    win_tok = state.tokens[:, s_lo:s_hi]
    draft = run.code_of[win_tok]
    p_d = p.gather(-1, draft[..., None]).squeeze(-1)
    q_d = state.q.gather(-1, draft[..., None]).squeeze(-1)
    already, kstar, new_code = _verify(run, state, p, draft, p_d, q_d)
    redraft = _coupled_redraft(run, p, logp, state.q, draft, p_d, q_d, redraft)
    after = k_idx[None] > kstar[:, None]
    choice = torch.where(after, redraft, torch.where(k_idx[None] == kstar[:, None], new_code[:, None], draft))
    state.tokens[:, s_lo:s_hi] = torch.where(forced[:, s_lo:s_hi] | already, win_tok, code_ids[choice])
    state.q = torch.where(after[..., None], p, state.q)
    new_decided = torch.maximum(state.decided, s_lo + kstar + (kstar < W).long())
    # tokens each row decided in this forward, up to its last code (the trailing row end and end are free)
    complete_at = run.grid.complete_at
    state.accepted.append(torch.minimum(new_decided, complete_at) - torch.minimum(state.decided, complete_at))
    state.decided = new_decided


def _slowest_front(run: _Jacobi, state: _LoopState) -> int:
    """The one host synchronisation of a forward: the steps every row has decided (all of them for a complete
    row)."""
    done_steps = torch.where(state.decided >= run.grid.complete_at, run.grid.n_steps, state.decided)
    return int(done_steps.min())


def _report_steps(run: _Jacobi, state: _LoopState, new_front: int, callback, progress_bar) -> torch.Tensor | None:
    """Report the steps every row has now decided (`state.front .. new_front - 1`), in order, to the progress bar
    and the callback as plain decoding does, then move `state.front` on. A callback may interrupt (sets
    `state.interrupted`) or edit tokens (see `_callback_edits`). Returns the rows whose tokens the callback edited,
    None when it edited none."""
    edited_rows = None
    if callback is not None or progress_bar is not None:
        before = state.tokens[:, state.front : new_front].clone() if callback is not None else None
        for s in range(state.front, new_front):
            if progress_bar is not None and s >= state.bar_steps:  # steps reported again after an edit count once
                progress_bar.update(1)
                state.bar_steps = s + 1
            if callback is not None and callback(s, state.tokens[:, : s + 1]):
                state.interrupted = s + 1 < run.grid.n_steps
                new_front = s + 1
                break
        if callback is not None and not state.interrupted:
            new_front, edited_rows = _callback_edits(state, before, new_front)
    state.front = new_front
    return edited_rows


def _callback_edits(state: _LoopState, before: torch.Tensor, new_front: int) -> tuple[int, torch.Tensor | None]:
    """One more synchronisation: did the callback replace tokens of the reported steps (`before`: them as they
    were)? An edited row keeps its prefix through its first edited step, which is fed next; what it had decided
    after that becomes drafts again (one-hot q: lossless given the edited prefix), decided and reported anew.
    Returns the new front and the edited rows (None when no row was edited)."""
    front = state.front
    diff = state.tokens[:, front:new_front] != before
    edited = diff.any(1)
    first = torch.where(edited, diff.int().argmax(1), new_front - front)
    first_min = int(first.min())
    if first_min < new_front - front:
        state.decided = torch.where(edited, front + first + 1, state.decided)
        return front + first_min + 1, edited
    return new_front, None


def _advance_window(run: _Jacobi, state: _LoopState, edited_rows: torch.Tensor | None) -> int:
    """Move the window to start at the slowest row's last decided token (a shift of 1..W steps): the steps
    entering it get first drafts and fresh coupled noise, and rows the callback edited get one-hot `q` over
    their window. Returns how many cache slots to rewind (back to the slot of the new first fed token)."""
    W, n_codes, c = run.window, run.n_codes, state.c
    c_new = state.front - 1
    shift = c_new - c
    fresh = _gumbel(run.draw(shift * n_codes).view(run.batch, shift, n_codes)) if run.do_sample else None
    q = torch.cat([state.q[:, shift:], _init_drafts(run, state.tokens, c + 1 + W, c_new + 1 + W, fresh)], dim=1)
    if run.do_sample:
        state.gumbel = torch.cat([state.gumbel[:, shift:], fresh], dim=1)
    if edited_rows is not None:
        onehot = _one_hot(run.code_of[state.tokens[:, c_new + 1 : c_new + 1 + W]], n_codes)
        q = torch.where(edited_rows[:, None, None], onehot, q)
    state.q = q
    state.c = c_new
    return c + W - c_new


def _window_forward(step_fn: _WindowStep, run: _Jacobi, state: _LoopState, rewind: int) -> torch.Tensor:
    """Rewind the cache's write position by `rewind` slots (to the slot of step `state.c`) and run the window
    forward from there; returns the image-code logits of the `W` predicted steps."""
    step_fn.cache.crop(-rewind)
    c, W = state.c, run.window
    positions = run.pos_next + c + run.k_idx[None]
    window_mask = _window_mask(run.pad, run.prompt_len + c, W, run.attn_impl, run.dtype)
    return step_fn(_feed_ids(run, state.tokens, c, c + W), positions, run.mask if window_mask is None else window_mask)


def _output(run: _Jacobi, state: _LoopState, sizes, num_forwards: int) -> ImageGenerationOutput:
    """The UniRep spans of the decided tokens (undecided codes of an interrupted call read as the end token; row
    ends stay where they are, as in plain decoding) with the call's statistics."""
    grid, front = run.grid, state.front
    out_tokens = state.tokens[:, : grid.n_steps].clone()
    if state.interrupted:
        out_tokens[:, front:] = torch.where(grid.forced[:, front : grid.n_steps], out_tokens[:, front:], grid.end_token)
    prefix = torch.tensor(grid.prefixes, dtype=torch.long, device=run.device)
    if len(set(sizes)) == 1:
        sequences = torch.cat([prefix, out_tokens], dim=1)
    else:
        sequences = [torch.cat([prefix[b], out_tokens[b, : grid.span[b]]]) for b in range(run.batch)]
    return ImageGenerationOutput(
        sequences=sequences,
        sizes=list(sizes),
        interrupted=state.interrupted,
        num_forwards=num_forwards,
        accepted_per_forward=torch.stack(state.accepted).cpu(),
    )
