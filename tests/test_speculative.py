"""Speculative (Jacobi) decoding of images: the same tokens as plain decoding when greedy, the same distribution
when sampling (a two-sample test that also catches deliberately wrong acceptance rules), forwards counted like a
forward hook counts them, stale cache entries never attended, bad input refused before any forward, and the
pipeline around it. The independent reference is always the plain token-by-token loop."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode  # as in sync_guard: no public path

import lumina_hf.speculative as speculative
from lumina_hf import LuminaMGPTPipeline, text_to_image_prompt
from lumina_hf.generation_lumina_mgpt import generate_image_tokens
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor
from lumina_hf.unirep import UniRepLayout

END = 8196


def grid_tokens(rows: int, cols: int) -> int:
    return UniRepLayout.grid_length(rows, cols)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=3)


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(64)


@pytest.fixture
def pipe(model, processor):
    p = LuminaMGPTPipeline(model=model, processor=processor)
    p.set_progress_bar_config(disable=True)
    return p


def prompt_ids(processor, caption, w, h):
    return processor(text=text_to_image_prompt(caption, w, h), return_tensors=None)["input_ids"][0]


def two_prompts(processor, w, h):
    prompts = [prompt_ids(processor, "a red circle", w, h),
               prompt_ids(processor, "a much longer prompt about a blue square on a green background", w, h)]
    assert len(prompts[0]) != len(prompts[1])  # left padding is exercised
    return prompts


class ForwardCounter:
    """Counts forward passes of the decoder (`model.model`), whatever calls it."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.model.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------ greedy: exactly the plain tokens
@pytest.mark.parametrize("height,width", [(32, 32), (64, 32), (32, 96), (64, 64)])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_greedy_matches_plain_greedy(model, processor, height, width, guidance):
    prompts = two_prompts(processor, width, height)
    span = grid_tokens(height // 16, width // 16)
    plain = generate_image_tokens(model, prompts, height=height, width=width, guidance_scale=guidance, do_sample=False)
    for window in sorted({1, 3, 8, span} & set(range(1, span + 1))):
        spec = generate_image_tokens(model, prompts, height=height, width=width, guidance_scale=guidance,
                                     do_sample=False, speculative_window=window)
        assert torch.equal(spec.sequences, plain.sequences), window
        if window > 2:
            assert spec.num_forwards < plain.num_forwards, window


@pytest.mark.parametrize("draft_init", speculative.DRAFT_INITS)
def test_top_k_one_sampling_matches_plain_greedy(model, processor, draft_init, monkeypatch):
    """Sampling with top-k 1 is greedy decoding: the speculative sampler must give the plain greedy tokens, with
    every draft initialisation."""
    original = speculative.speculative_generate
    monkeypatch.setattr(speculative, "speculative_generate", lambda *a, **k: original(*a, draft_init=draft_init, **k))
    prompts = two_prompts(processor, 64, 32)
    plain = generate_image_tokens(model, prompts, height=32, width=64, guidance_scale=2.0, do_sample=False)
    spec = generate_image_tokens(model, prompts, height=32, width=64, guidance_scale=2.0, image_top_k=1,
                                 generator=[torch.Generator().manual_seed(i) for i in range(2)], speculative_window=6)
    assert torch.equal(spec.sequences, plain.sequences)


def test_greedy_with_sampled_sizes_matches_plain(processor):
    """`force_size=False`: the sizes come from the model (here different per prompt, so rows of one batch have
    different spans and finish at different steps)."""
    model = build_tiny_model(seed=1, max_size_units=3)
    prompts = [[0, 9300 + i, 9310 + 3 * i, 8710] for i in range(6)]
    plain = generate_image_tokens(model, prompts, force_size=False, do_sample=False, guidance_scale=2.0)
    assert len(set(plain.sizes)) > 1
    spec = generate_image_tokens(model, prompts, force_size=False, do_sample=False, guidance_scale=2.0,
                                 speculative_window=7)
    assert spec.sizes == plain.sizes
    assert all(torch.equal(a, b) for a, b in zip(spec.sequences, plain.sequences))


def test_compiled_window_step_gives_the_plain_tokens(model, processor):
    prompts = two_prompts(processor, 32, 64)
    plain = generate_image_tokens(model, prompts, height=64, width=32, do_sample=False)
    spec = generate_image_tokens(model, prompts, height=64, width=32, do_sample=False, speculative_window=4, compile=True)
    assert torch.equal(spec.sequences, plain.sequences)


# ------------------------------------------------------------------ sampling: the same distribution
STAT_POSITIONS = [0, 1, 2, 3, 5, 6, 7, 8]  # the 8 code steps of a 32x64 image (2 rows of 4 codes)
STAT_PAIRS = [(0, 1), (1, 6), (7, 8)]  # neighbours left/right and above/below
STAT_ALPHA = 1e-3  # chance that one comparison of a correct sampler fails (Bonferroni over its 11 tests)
STAT_N = 4000
STAT_KW = dict(height=32, width=64, guidance_scale=2.0, image_top_k=4, temperature=1.0)
STAT_PROMPT = [0, 9300, 9301, 8710]  # <s>, two text bytes, separator: short, so 2 x 4000 rows prefill fast


def _table(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """2 x K counts of the categories in two samples; categories seen fewer than 10 times in all are pooled."""
    cats = sorted(set(a.tolist()) | set(b.tolist()))
    ca = np.array([(a == c).sum() for c in cats])
    cb = np.array([(b == c).sum() for c in cats])
    keep = (ca + cb) >= 10
    table = np.stack([np.append(ca[keep], ca[~keep].sum()), np.append(cb[keep], cb[~keep].sum())])
    return table[:, table.sum(0) > 0]


def two_sample_pvalues(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Chi-square test of homogeneity of the tokens of two samples `(N, steps)`: each marginal of
    `STAT_POSITIONS` and each joint of `STAT_PAIRS`."""
    from scipy.stats import chi2_contingency

    x, y = x.numpy(), y.numpy()
    out = [chi2_contingency(_table(x[:, s], y[:, s]))[1] for s in STAT_POSITIONS]
    for s, t in STAT_PAIRS:
        out.append(chi2_contingency(_table(x[:, s] * 100_000 + x[:, t], y[:, s] * 100_000 + y[:, t]))[1])
    return out


@pytest.fixture(scope="module")
def plain_samples(model):
    seqs = generate_image_tokens(model, [STAT_PROMPT] * STAT_N, generator=torch.Generator().manual_seed(1), **STAT_KW)
    return seqs.sequences[:, 3:]


def speculative_samples(model, seed, **options):
    original = speculative.speculative_generate
    run = (lambda *a, **k: original(*a, **options, **k)) if options else original
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speculative, "speculative_generate", run)
        out = generate_image_tokens(model, [STAT_PROMPT] * STAT_N, generator=torch.Generator().manual_seed(seed),
                                    speculative_window=4, **STAT_KW)
    return out


@pytest.mark.statistical
@pytest.mark.parametrize(
    "options", [{}, {"coupling": "maximal", "draft_init": "random"}, {"coupling": "independent", "draft_init": "left"}],
    ids=["default", "maximal-random", "independent-left"],
)
def test_sampled_distribution_equals_plain_sampling(model, plain_samples, options):
    """Two-sample chi-square tests, speculative vs plain sampling, 4000 images each (guidance 2, top-k 4,
    temperature 1, window 4 on an 11-step image, so drafts are verified, rejected and refined): the marginal of
    every code position and three joints of neighbours. Bonferroni over the 11 tests: a correct sampler fails this
    with probability at most 1e-3 (the seeds are fixed, so the outcome is reproducible)."""
    out = speculative_samples(model, seed=2, **options)
    assert out.num_forwards < 11  # speculation happened: fewer forwards than the 11 of plain decoding
    pvals = two_sample_pvalues(plain_samples, out.sequences[:, 3:])
    assert min(pvals) > STAT_ALPHA / len(pvals), pvals


@pytest.mark.statistical
@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param({"speculative_accept": lambda p_d, q_d, u: torch.ones_like(p_d, dtype=torch.bool)}, id="always-accept"),
        pytest.param({"residual_distribution": lambda p, q: p}, id="resample-from-p"),
    ],
)
def test_distribution_test_catches_a_wrong_acceptance_rule(model, plain_samples, wrong, monkeypatch):
    """The test above can fail: with a wrong rule (accept every draft; or, subtler, resample a rejected position
    from p instead of max(0, p - q), which over-weights the drafts) the same comparison rejects."""
    for name, fn in wrong.items():
        monkeypatch.setattr(speculative, name, fn)
    out = speculative_samples(model, seed=2)
    pvals = two_sample_pvalues(plain_samples, out.sequences[:, 3:])
    assert min(pvals) < STAT_ALPHA / len(pvals), pvals


# ------------------------------------------------------------------ forwards, cache, statistics
@pytest.mark.parametrize("window", [None, 1, 4, 9])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_num_forwards_equals_a_forward_hook_count(model, processor, window, guidance):
    prompts = two_prompts(processor, 64, 32)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with ForwardCounter(model) as counter:
        out = generate_image_tokens(model, prompts, height=32, width=64, guidance_scale=guidance, generator=gens,
                                    speculative_window=window)
    assert out.num_forwards == counter.n > 0
    if window is None:
        assert out.accepted_per_forward is None
    else:
        # every decoding forward is accounted for, and the rows' accepted tokens add up to their codes and row ends
        assert out.accepted_per_forward.shape == (out.num_forwards, 2)
        assert out.accepted_per_forward.sum(0).tolist() == [2 * 5 - 1] * 2
        assert out.accepted_per_forward.max() <= window


def test_num_forwards_counts_size_sampling(processor):
    model = build_tiny_model(seed=1, max_size_units=3)
    with ForwardCounter(model) as counter:
        out = generate_image_tokens(model, [[0, 9300, 8710]], force_size=False, speculative_window=3,
                                    generator=torch.Generator().manual_seed(0))
    assert out.num_forwards == counter.n


def test_stale_cache_entries_are_never_attended(model, processor):
    """Before every forward, every cache slot at or beyond the cache's write position (the keys and values of
    rejected drafts, and slots never written) is filled with large garbage. Greedy speculative decoding must still
    give the plain tokens: those slots are overwritten or masked before any query reaches them. Control: the same
    garbage written into the last valid slot changes the result, so the garbage is visible when attended."""
    prompts = two_prompts(processor, 64, 64)
    plain = generate_image_tokens(model, prompts, height=64, width=64, guidance_scale=3.0, do_sample=False)
    starts = []

    def poison(valid: bool):
        def hook(module, args, kwargs):
            cache = kwargs.get("cache")
            # direct access to the static cache's tensors: test-only, to plant garbage (no public API writes a cache)
            if cache is None or not cache.layers[0].is_initialized:
                return
            n = int(cache.get_seq_length())
            starts.append(n)
            lo, hi = (n - 1, n) if valid else (n, None)
            gen = torch.Generator().manual_seed(len(starts))
            for layer in cache.layers:
                for t in (layer.keys, layer.values):
                    t[:, :, lo:hi] = 1e3 * torch.randn(t[:, :, lo:hi].shape, generator=gen)
        return hook

    handle = model.model.register_forward_pre_hook(poison(valid=False), with_kwargs=True)
    try:
        spec = generate_image_tokens(model, prompts, height=64, width=64, guidance_scale=3.0, do_sample=False,
                                     speculative_window=6)
    finally:
        handle.remove()
    assert torch.equal(spec.sequences, plain.sequences)
    # the write position was moved back over rejected drafts: some forward started below the previous one's end
    assert any(b < a + 6 for a, b in zip(starts, starts[1:]))

    handle = model.model.register_forward_pre_hook(poison(valid=True), with_kwargs=True)
    try:
        broken = generate_image_tokens(model, prompts, height=64, width=64, guidance_scale=3.0, do_sample=False,
                                       speculative_window=6)
    finally:
        handle.remove()
    assert not torch.equal(broken.sequences, plain.sequences)


class HostReads(TorchDispatchMode):
    """Counts the operators that read a tensor's value back to the host (`sync_guard.HOST_READ_OPS`: every
    `int()`, `bool()`, `.item()`, data-dependent shape, ...), outside the prompt's forward (the prefill, run by
    the model's own forward, may read; the decoding forwards call the decoder directly). On a GPU each read
    waits for the device."""

    def __init__(self, model):
        super().__init__()
        self.n, self.in_prefill = 0, False
        self.hooks = [model.register_forward_pre_hook(lambda *a: setattr(self, "in_prefill", True)),
                      model.register_forward_hook(lambda *a: setattr(self, "in_prefill", False))]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from sync_guard import HOST_READ_OPS

        if func in HOST_READ_OPS and not self.in_prefill:
            self.n += 1
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        return super().__exit__(*exc)


@pytest.mark.parametrize("with_callback", [False, True])
def test_host_reads_are_one_per_forward(model, processor, with_callback):
    """Speculative decoding reads the device once per forward (where the slowest row is), twice with a step
    callback (whether it replaced tokens); nothing per token, nothing inside the window forwards (their 4-D
    attention mask is built on the device, so transformers' mask builder does not read the cache position)."""
    prompts = two_prompts(processor, 64, 64)
    with HostReads(model) as reads:
        out = generate_image_tokens(model, prompts, height=64, width=64, guidance_scale=2.0, speculative_window=5,
                                    generator=torch.Generator().manual_seed(0),
                                    callback=(lambda s, t: False) if with_callback else None)
    assert out.num_forwards > 2
    assert reads.n == (2 if with_callback else 1) * out.num_forwards


def test_eager_attention_gives_the_plain_greedy_tokens(processor):
    """The window forwards pass their own 4-D mask: additive for eager attention, boolean for SDPA."""
    model = build_tiny_model(seed=3, attn_implementation="eager")
    prompts = two_prompts(processor, 64, 64)
    plain = generate_image_tokens(model, prompts, height=64, width=64, guidance_scale=3.0, do_sample=False)
    for window in (2, 6):
        spec = generate_image_tokens(model, prompts, height=64, width=64, guidance_scale=3.0, do_sample=False,
                                     speculative_window=window)
        assert torch.equal(spec.sequences, plain.sequences)


# ------------------------------------------------------------------ callbacks
def test_callback_edits_are_fed_and_steps_are_all_reported(model, processor):
    """A callback that replaces step 0's token: the result is plain greedy decoding fed the same token, and the
    callback sees every step, in order of first report."""
    p = prompt_ids(processor, "a red square", 64, 64)
    forced = 4 + 17

    def edit(step, tokens):
        if step == 0:
            tokens[:, 0] = forced

    plain = generate_image_tokens(model, [p], height=64, width=64, do_sample=False, callback=edit)
    steps = []

    def edit_and_log(step, tokens):
        steps.append(step)
        edit(step, tokens)

    spec = generate_image_tokens(model, [p], height=64, width=64, do_sample=False, callback=edit_and_log,
                                 speculative_window=8)
    assert int(spec.sequences[0, 3]) == forced
    assert torch.equal(spec.sequences, plain.sequences)
    total = grid_tokens(4, 4)
    assert sorted(set(steps)) == list(range(total))
    assert steps[-1] == total - 1


def test_callback_interrupt(model, processor):
    p = prompt_ids(processor, "a", 64, 64)
    plain = generate_image_tokens(model, [p], height=64, width=64, do_sample=False, callback=lambda s, t: s == 6)
    spec = generate_image_tokens(model, [p], height=64, width=64, do_sample=False, callback=lambda s, t: s == 6,
                                 speculative_window=8)
    assert spec.interrupted and plain.interrupted
    assert torch.equal(spec.sequences, plain.sequences)
    assert set(spec.sequences[0, 3 + 7 :].tolist()) <= {END, 8803}  # no code decided after the interrupt


# ------------------------------------------------------------------ bad input, before any forward
@pytest.mark.parametrize(
    "window,match",
    [(-1, "integer >= 0"), (2.0, "integer >= 0"), (True, "integer >= 0"), ("4", "integer >= 0"),
     (8, "larger than the image span \\(7 tokens")],
)
def test_bad_window_refused_before_any_forward(model, processor, window, match):
    p = prompt_ids(processor, "a", 32, 32)

    def fail(*args):
        raise AssertionError("a forward ran before the input was checked")

    handle = model.model.register_forward_pre_hook(fail)
    try:
        with pytest.raises(ValueError, match=match):
            generate_image_tokens(model, [p], height=32, width=32, speculative_window=window)
    finally:
        handle.remove()


def test_window_beyond_the_largest_sampled_size_refused_before_size_sampling(processor):
    model = build_tiny_model(seed=1, max_size_units=3)  # at most 96x96: 6 x (6 + 1) + 1 = 43 tokens
    handle = model.model.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(AssertionError("forward ran")))
    try:
        with pytest.raises(ValueError, match="larger than the image span \\(43 tokens"):
            generate_image_tokens(model, [[0, 9300, 8710]], force_size=False, speculative_window=44)
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt="a", speculative_window=-2), "integer >= 0"),
        (dict(prompt="a", speculative_window=False), "integer >= 0"),
        (dict(prompt="a", height=32, width=64, speculative_window=12), "larger than the image span \\(11 tokens"),
        (dict(image=Image.new("RGB", (64, 64), "red"), task="describe", speculative_window=4), "answers in text"),
    ],
)
def test_pipeline_bad_window_refused_before_any_forward(pipe, kwargs, match):
    calls = []
    handle = pipe.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            pipe(**kwargs)
    finally:
        handle.remove()
    assert calls == []


# ------------------------------------------------------------------ pipeline
def test_pipeline_speculative_matches_plain_with_top_k_one(pipe):
    kw = dict(height=64, width=64, guidance_scale=3.0, top_k=1, output_type="latent",
              generator=[torch.Generator().manual_seed(i) for i in range(2)])
    plain = pipe(["a red circle", "a blue square"], **kw).images
    kw["generator"] = [torch.Generator().manual_seed(i) for i in range(2)]
    spec = pipe(["a red circle", "a blue square"], speculative_window=8, **kw).images
    assert torch.equal(plain, spec)


def test_pipeline_window_default_from_generation_config(pipe, monkeypatch):
    kw = dict(height=64, width=64, top_k=1, output_type="latent", generator=torch.Generator().manual_seed(0))
    with ForwardCounter(pipe.model) as plain:
        base = pipe("a red circle", **kw).images
    with ForwardCounter(pipe.model) as explicit:
        pipe("a red circle", speculative_window=8, **kw)
    monkeypatch.setattr(pipe.model.generation_config, "speculative_window", 8, raising=False)
    with ForwardCounter(pipe.model) as default:
        images = pipe("a red circle", **kw).images
    assert torch.equal(images, base)
    assert default.n == explicit.n < plain.n
    # the default does not apply to text answers (no error for task="describe")
    out = pipe(image=Image.new("RGB", (64, 64), "red"), task="describe", max_new_tokens=2,
               generator=torch.Generator().manual_seed(0))
    assert len(out.text) == 1


def test_pipeline_speculative_composes_with_num_candidates(pipe):
    kw = dict(height=64, width=64, top_k=1, output_type="latent", num_candidates=3,
              generator=torch.Generator().manual_seed(0))
    plain = pipe("a red circle", **kw).images
    spec = pipe("a red circle", speculative_window=5, **kw).images
    assert torch.equal(plain, spec)


def test_pipeline_generation_config_window_is_checked_and_fits_any_size(pipe, monkeypatch):
    kw = dict(height=32, width=64, top_k=1, output_type="latent", generator=torch.Generator().manual_seed(0))
    base = pipe("a red circle", **kw).images
    monkeypatch.setattr(pipe.model.generation_config, "speculative_window", 1000, raising=False)
    kw["generator"] = torch.Generator().manual_seed(0)
    assert torch.equal(pipe("a red circle", **kw).images, base)  # a default larger than the image is clipped to it
    monkeypatch.setattr(pipe.model.generation_config, "speculative_window", -1, raising=False)
    with pytest.raises(ValueError, match="generation_config is invalid: speculative_window"):
        pipe("a red circle", **kw)
