"""Guided image decoding: exactness against a plain reference loop, well-formed spans, reproducibility,
the sampled distribution, and the pipeline / CLI around it."""


import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from lumina_hf import LuminaMGPTPipeline, text_to_image_prompt
from lumina_hf.generation_lumina_mgpt import UniRepLogitsProcessor, generate_image_tokens
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor

START, END, ROW_END, SIZE_BASE = 8197, 8196, 8803, 8804
PIL_IMAGE = Image.new("RGB", (64, 64), "red")


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=3)


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(128)


def prompt_ids(processor, caption, w, h):
    return processor(text=text_to_image_prompt(caption, w, h), return_tensors=None)["input_ids"][0]


def reference_generate(model, prompt, height, width, guidance, top_k, temperature, generator, do_sample=True):
    """SPEC.md section 6 written plainly: one prompt, two separate forwards per step (conditional and
    unconditional, each with its own cache), full-vocabulary logits, guidance, grid constraint, top-k,
    temperature, then sampling. Noise: per grid position before the end token, `torch.rand(n_codes)` from
    the generator, the noise of a vocabulary id being that of its VQ code (the documented scheme)."""
    cfg = model.config
    code_of = {int(t): c for c, t in enumerate(cfg.image_code_to_token_id())}
    code_ids = torch.tensor(sorted(code_of))
    rows, cols = height // 16, width // 16
    prefix = [START, SIZE_BASE + height // 32, SIZE_BASE + width // 32]
    cond_ids = torch.tensor([list(prompt) + prefix])
    unc_ids = torch.tensor([prefix])
    cond_cache, unc_cache = DynamicCache(config=cfg), DynamicCache(config=cfg)
    cond = model(cond_ids, cache=cond_cache, use_cache=True).logits[0, -1].float()
    unc = model(unc_ids, cache=unc_cache, use_cache=True).logits[0, -1].float()
    out = []
    total = rows * (cols + 1)
    for pos in range(total + 1):
        noise = torch.rand(len(code_of), generator=generator) if do_sample and pos < total else None
        logits = unc + guidance * (cond - unc)
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        if pos == total:
            allowed[END] = True
        elif pos % (cols + 1) == cols:
            allowed[ROW_END] = True
        else:
            allowed[code_ids] = True
        logits = logits.masked_fill(~allowed, float("-inf"))
        if pos < total and pos % (cols + 1) != cols:
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
            if do_sample:
                logp = torch.log_softmax(logits / temperature, dim=-1)
                g = torch.full_like(logp, float("-inf"))
                ids_ok = torch.isfinite(logp).nonzero().flatten()
                codes = torch.tensor([code_of[int(i)] for i in ids_ok])
                g[ids_ok] = logp[ids_ok] - torch.log(-torch.log(noise[codes].clamp(min=torch.finfo(torch.float32).tiny)))
                token = int(g.argmax())
            else:
                token = int(logits.argmax())
        else:
            token = int(allowed.nonzero()[0, 0])
        out.append(token)
        if pos == total:
            break
        t = torch.tensor([[token]])
        cond = model(t, cache=cond_cache, use_cache=True).logits[0, -1].float()
        unc = model(t, cache=unc_cache, use_cache=True).logits[0, -1].float()
    return prefix + out


@pytest.mark.parametrize("do_sample", [False, True])
def test_batched_loop_matches_plain_reference(model, processor, do_sample):
    height, width = 32, 64  # non-square: 2 rows x 4 cols of codes
    captions = ["a red circle", "a much longer prompt about a blue square on a green background"]
    prompts = [prompt_ids(processor, c, width, height) for c in captions]
    assert len(prompts[0]) != len(prompts[1])  # left padding is exercised
    gens = [torch.Generator().manual_seed(10 + i) for i in range(2)]
    ours = generate_image_tokens(
        model, prompts, height=height, width=width, guidance_scale=3.0, image_top_k=20, temperature=0.8,
        do_sample=do_sample, generator=gens,
    ).sequences
    for i, p in enumerate(prompts):
        ref = reference_generate(
            model, p, height, width, 3.0, 20, 0.8, torch.Generator().manual_seed(10 + i), do_sample=do_sample
        )
        assert ours[i].tolist() == ref


@pytest.mark.parametrize("height,width", [(32, 32), (64, 32), (32, 96), (64, 64)])
def test_spans_are_well_formed_and_decode_to_the_size(model, processor, height, width):
    p = prompt_ids(processor, "x", width, height)
    out = generate_image_tokens(model, [p, p], height=height, width=width, generator=torch.Generator().manual_seed(0))
    rows, cols = height // 16, width // 16
    allowed_codes = set(model.config.image_code_to_token_id())
    for seq in out.sequences.tolist():
        assert seq[:3] == [START, SIZE_BASE + height // 32, SIZE_BASE + width // 32]
        assert seq[-1] == END
        grid = torch.tensor(seq[3:-1]).view(rows, cols + 1)
        assert (grid[:, -1] == ROW_END).all()
        assert set(grid[:, :-1].flatten().tolist()) <= allowed_codes
        grids = processor.extract_image_tokens(seq)
        pixels = model.decode_image_tokens(grids[0].unsqueeze(0))
        assert tuple(pixels.shape) == (1, 3, height, width)


def test_seeds_reproducible_and_batch_independent(model, processor):
    a = prompt_ids(processor, "a red circle", 64, 64)
    b = prompt_ids(processor, "two green triangles and a long tail of words", 64, 64)

    def run(prompts, seeds, **kw):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return generate_image_tokens(model, prompts, height=64, width=64, generator=gens, **kw).sequences

    first, again = run([a], [1]), run([a], [1])
    assert torch.equal(first, again)
    assert not torch.equal(run([a], [1]), run([a], [2]))
    # greedy and sampled: a prompt alone gives what it gives inside a batch
    assert torch.equal(run([a], [1], do_sample=False)[0], run([b, a], [5, 1], do_sample=False)[1])
    assert torch.equal(run([a], [1])[0], run([b, a], [5, 1])[1])


def test_guidance_one_skips_unconditional_rows(model, processor):
    p = prompt_ids(processor, "a", 32, 32)
    calls = []
    hook = model.model.register_forward_pre_hook(lambda m, args, kw: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        generate_image_tokens(model, [p], height=32, width=32, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
        assert set(calls) == {1}
        calls.clear()
        generate_image_tokens(model, [p], height=32, width=32, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
        assert set(calls) == {2}  # conditional and unconditional rows in one forward
    finally:
        hook.remove()


def test_negative_prompt_changes_unconditional_context(model, processor):
    p = prompt_ids(processor, "a red circle", 32, 32)
    neg = processor(text="blurry", return_tensors=None)["input_ids"][0]
    plain = generate_image_tokens(model, [p], height=32, width=32, do_sample=False, guidance_scale=5.0).sequences
    with_neg = generate_image_tokens(
        model, [p], height=32, width=32, do_sample=False, guidance_scale=5.0, negative_prompts=[neg]
    ).sequences
    assert not torch.equal(plain, with_neg)


def test_sampled_frequencies_match_processed_distribution(model, processor):
    """First code of a 32x32 image: guidance 2.5, top-k 6, temperature 0.7. Chi-square goodness of fit
    over the 6 kept codes with N=1500 draws; the test fails by chance with probability 1e-4."""
    from scipy.stats import chi2

    cfg = model.config
    p = prompt_ids(processor, "a red circle", 32, 32)
    g, k, temp, n = 2.5, 6, 0.7, 1500
    prefix = [START, SIZE_BASE + 1, SIZE_BASE + 1]
    with torch.no_grad():
        cond = model(torch.tensor([p + prefix])).logits[0, -1].float()
        unc = model(torch.tensor([prefix])).logits[0, -1].float()
    code_ids = torch.tensor(cfg.image_code_to_token_id())
    guided = (unc + g * (cond - unc))[code_ids]
    top = torch.topk(guided, k)
    probs = torch.softmax(top.values / temp, dim=-1).double()
    expected_ids = code_ids[top.indices]

    # one conditional row per draw, all sharing one generator: a single batched run
    seqs = generate_image_tokens(
        model, [p] * n, height=32, width=32, guidance_scale=g, image_top_k=k, temperature=temp,
        generator=torch.Generator().manual_seed(1234),
    ).sequences
    first = seqs[:, 3]
    assert set(first.tolist()) <= set(expected_ids.tolist())
    counts = torch.tensor([(first == t).sum().item() for t in expected_ids], dtype=torch.float64)
    stat = float(((counts - n * probs) ** 2 / (n * probs)).sum())
    assert stat < chi2.ppf(1 - 1e-4, df=k - 1), (counts.tolist(), (n * probs).tolist())


def test_sampled_sizes(processor):
    model = build_tiny_model(seed=1, max_size_units=3)
    p = prompt_ids(processor, "a", 64, 64)
    out = generate_image_tokens(model, [p, p, p], force_size=False, generator=[torch.Generator().manual_seed(i) for i in range(3)])
    seqs = out.sequences if isinstance(out.sequences, list) else list(out.sequences)
    for (h, w), seq in zip(out.sizes, seqs):
        assert 32 <= h <= 96 and 32 <= w <= 96
        grids = processor.extract_image_tokens(seq.tolist())
        assert tuple(grids[0].shape) == (h // 16, w // 16)


def test_logits_processor_enforces_grid_in_generate(model):
    """Interleaved output through `model.generate`: an image opened mid-answer follows the grid rules."""
    cfg = model.config
    proc = UniRepLogitsProcessor(cfg, image_top_k=50, text_top_k=10)
    prompt = torch.tensor([[0, 9300, 9301, 8710, START, SIZE_BASE + 1, SIZE_BASE + 2]])
    torch.manual_seed(0)
    out = model.generate(prompt, max_new_tokens=2 * 5 + 1, do_sample=True, top_k=None, logits_processor=[proc])
    new = out[0, prompt.shape[1] :].tolist()
    grid = torch.tensor(new[:-1]).view(2, 5)
    assert (grid[:, -1] == ROW_END).all() and new[-1] == END
    assert set(grid[:, :-1].flatten().tolist()) <= set(cfg.image_code_to_token_id())
    # outside an image only the text top-k survive
    scores = proc(torch.tensor([[0, 9300]]), torch.randn(1, cfg.vocab_size))
    assert int(torch.isfinite(scores).sum()) == 10


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(image_top_k=0), "image_top_k"),
        (dict(generator=[torch.Generator()] * 3), "generators"),
        (dict(height=40), "multiple of 32"),
    ],
)
def test_loop_bad_input(model, processor, kwargs, match):
    p = prompt_ids(processor, "a", 32, 32)
    args = dict(height=32, width=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate_image_tokens(model, [p, p], **args)


def test_prompt_longer_than_context(processor):
    model = build_tiny_model(max_position_embeddings=64)
    p = prompt_ids(processor, "a " * 40, 32, 32)
    with pytest.raises(ValueError, match="context"):
        generate_image_tokens(model, [p], height=32, width=32)


# ---------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def pipe(model):
    p = LuminaMGPTPipeline(model=model, processor=build_tiny_processor(64))
    p.set_progress_bar_config(disable=True)
    return p


def test_pipeline_outputs_and_num_images(pipe):
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    out = pipe(["a red circle", "a blue square"], height=64, width=64, num_images_per_prompt=2, generator=gens)
    assert len(out.images) == 4 and all(im.size == (64, 64) for im in out.images)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    arr = pipe(["a red circle", "a blue square"], height=64, width=64, num_images_per_prompt=2, generator=gens, output_type="np").images
    assert arr.shape == (4, 64, 64, 3) and arr.dtype == np.float32
    assert np.array_equal(np.round(arr[3] * 255).astype(np.uint8), np.array(out.images[3]))
    pt = pipe("a", height=32, width=64, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert tuple(pt.shape) == (1, 3, 32, 64) and 0 <= float(pt.min()) and float(pt.max()) <= 1
    lat = pipe("a", height=32, width=64, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert tuple(lat.shape) == (1, 2, 4)


def test_pipeline_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    again = LuminaMGPTPipeline.from_pretrained(tmp_path / "pipe")
    again.set_progress_bar_config(disable=True)
    a = pipe("a red circle", height=64, width=64, generator=torch.Generator().manual_seed(7), output_type="np").images
    b = again("a red circle", height=64, width=64, generator=torch.Generator().manual_seed(7), output_type="np").images
    assert np.array_equal(a, b)


def test_pipeline_callback_interrupt(pipe):
    seen = []

    def cb(p, step, t, kwargs):
        seen.append(kwargs["tokens"].shape[1])
        if step == 3:
            p._interrupt = True
        return {}

    out = pipe("a", height=64, width=64, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["tokens"])
    assert seen == [1, 2, 3, 4] and out.images == []


def test_pipeline_omni_task(pipe):
    src = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 48, 3), dtype=np.uint8))
    out = pipe(image=src, task="depth", generator=torch.Generator().manual_seed(0))
    bucket = pipe.processor.image_processor.select_bucket(48, 96)
    assert out.images[0].size == bucket
    text = pipe(image=src, task="describe", max_new_tokens=4, generator=torch.Generator().manual_seed(0)).text
    assert isinstance(text[0], str)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt="a", height=40, width=64), "nearest valid sizes"),
        (dict(prompt="a", num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(prompt="a", guidance_scale=-1), "guidance_scale"),
        (dict(prompt="a", top_k=0), "top_k"),
        (dict(prompt="a", generator=[torch.Generator()] * 2), "generators"),
        (dict(task="depth"), "input image"),
        (dict(prompt="a", output_type="jpg"), "output_type"),
        (dict(prompt="a", num_candidates=0), "num_candidates must be an integer"),
        (dict(prompt="a", num_candidates=2.0), "num_candidates must be an integer"),
        (dict(image=PIL_IMAGE, task="depth", num_candidates=2), "no caption to rank by"),
    ],
)
def test_pipeline_bad_input_before_compute(pipe, kwargs, match):
    calls = []
    hook = pipe.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            pipe(**kwargs)
    finally:
        hook.remove()
    assert calls == []


def plain_describe_log_likelihood(model, processor, grid, caption):
    """Reference: the whole conversation through the model, log-softmax at every position, summed over the
    answer's labels."""
    question = "Describe the image in detail. <|image|>"
    ids, labels = processor.tokenize_conversation([("user", question), ("assistant", caption)], [processor.unirep_ids(grid)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if labels[t] != -100)


def test_describe_log_likelihood_matches_plain_reference(pipe):
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    square = pipe(["a", "b", "c"], height=64, width=64, generator=gens, output_type="latent").images
    wide = pipe("d", height=32, width=64, generator=torch.Generator().manual_seed(5), output_type="latent").images
    grids = [square[0], wide[0], square[1], square[2]]  # two sizes in one call, captions of different lengths
    captions = ["a red circle on a blue background", "a green square", "a red circle on a blue background", "white"]
    got = pipe.describe_log_likelihood(grids, captions, chunk_size=2)
    want = [plain_describe_log_likelihood(pipe.model, pipe.processor, g, c) for g, c in zip(grids, captions)]
    assert torch.allclose(got, torch.tensor(want), atol=1e-3, rtol=1e-4)
    assert len(set(round(w, 3) for w in want)) == 4  # the scores do tell the items apart
    with pytest.raises(ValueError, match="one caption per grid"):
        pipe.describe_log_likelihood(grids, captions[:3])


def test_num_candidates_keeps_the_best_described_candidate(pipe):
    """With `num_candidates`, each image's generator seeds its candidates; the result must be the candidate
    (generated here one by one with those seeds) that the plain reference scores highest for its prompt."""
    prompts, n_cand = ["a red circle", "a blue square on a yellow background"], 4
    got = pipe(prompts, height=64, width=64, output_type="latent", num_candidates=n_cand,
               generator=[torch.Generator().manual_seed(10 + i) for i in range(2)]).images
    chosen = []
    for i, prompt in enumerate(prompts):
        seeds = torch.randint(0, 2**62, (n_cand,), generator=torch.Generator().manual_seed(10 + i)).tolist()
        cands = pipe([prompt] * n_cand, height=64, width=64, output_type="latent",
                     generator=[torch.Generator().manual_seed(int(s)) for s in seeds]).images
        assert len({tuple(c.flatten().tolist()) for c in cands}) == n_cand  # the candidates differ
        scores = [plain_describe_log_likelihood(pipe.model, pipe.processor, c, prompt) for c in cands]
        chosen.append(cands[int(np.argmax(scores))])
    assert torch.equal(got, torch.stack(chosen))
    # the same generators give the same choice
    again = pipe(prompts, height=64, width=64, output_type="latent", num_candidates=n_cand,
                 generator=[torch.Generator().manual_seed(10 + i) for i in range(2)]).images
    assert torch.equal(got, again)


def test_num_candidates_default_comes_from_the_generation_config(pipe, monkeypatch):
    calls = []
    original = pipe.describe_log_likelihood

    def counting(grids, captions, **kwargs):
        calls.append(len(grids))
        return original(grids, captions, **kwargs)

    monkeypatch.setattr(pipe, "describe_log_likelihood", counting)
    try:
        pipe.model.generation_config.num_candidates = 3
        out = pipe("a", height=64, width=64, generator=torch.Generator().manual_seed(0))
        assert len(out.images) == 1 and calls == [3]
        pipe(image=out.images[0], task="depth", generator=torch.Generator().manual_seed(0))  # Omni: no ranking
        assert calls == [3]
        pipe("a", height=64, width=64, num_candidates=1, generator=torch.Generator().manual_seed(0))
        assert calls == [3]
    finally:
        del pipe.model.generation_config.num_candidates


def test_cli_generate_writes_image(tmp_path):
    from lumina_hf.cli import main

    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", "tiny-random", "--height", "160", "--width", "320", "-o", str(out)]) == 0
    assert Image.open(out).size == (320, 160)
    with pytest.raises(SystemExit, match="not one of"):
        main(["generate", "a", "--model", "tiny-random", "--height", "40", "--width", "64", "-o", str(tmp_path / "y.png")])
    assert not (tmp_path / "y.png").exists()


def test_compiled_decode_step_compiles_once_and_gives_the_same_tokens(model, processor):
    """`compile="reduce-overhead"` (CUDA graphs on a GPU; plain inductor code on CPU): the decode step compiles
    once, in one graph, and a second image of the same batch size with a prompt of another length runs without
    a recompilation. Every image has the tokens of the eager loop."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    short = prompt_ids(processor, "a red circle", 32, 32)
    long = prompt_ids(processor, "two green triangles on a white background, seen from above", 32, 32)
    assert len(short) != len(long)

    def run(prompt, compile):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return generate_image_tokens(model, [prompt, prompt], height=32, width=32, generator=gens, compile=compile).sequences

    first = run(short, "reduce-overhead")
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    second = run(long, "reduce-overhead")
    assert counters["stats"]["unique_graphs"] == 1, "the second image recompiled the decode step"
    assert torch.equal(first, run(short, False)) and torch.equal(second, run(long, False))
    with pytest.raises(ValueError, match="not a torch.compile mode"):
        generate_image_tokens(model, [short], height=32, width=32, compile="fast")


def test_pipeline_to_dtype_keeps_vqgan_fp32():
    p = LuminaMGPTPipeline(model=build_tiny_model(), processor=build_tiny_processor(64))
    before = {k: v.clone() for k, v in p.model.vqmodel.state_dict().items()}
    p.to(torch.bfloat16)
    assert p.model.lm_head.weight.dtype == torch.bfloat16
    after = p.model.vqmodel.state_dict()
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in after.items() if v.is_floating_point())
    p.set_progress_bar_config(disable=True)
    out = p("a", height=32, width=64, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (64, 32)


def test_text_generate_with_pixel_values_matches_offline_ids(model):
    """The README's transformers-only path: placeholders + pixel_values through `model.generate` give the same
    answer as final ids; a generation_config holding the *image* guidance (4.0) does not turn on text CFG."""
    proc = build_tiny_processor(64)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    lazy = proc(text="Describe the image in detail. <|image|>", images=[img])
    offline = proc(text="Describe the image in detail. <|image|>", images=[img], vq_model=model)
    model.generation_config.guidance_scale = 4.0
    try:
        a = model.generate(**lazy, max_new_tokens=6, do_sample=False)
        b = model.generate(input_ids=offline["input_ids"], attention_mask=offline["attention_mask"], max_new_tokens=6, do_sample=False)
        manual = offline["input_ids"]
        for _ in range(6):  # plain greedy loop, no guidance
            nxt = model(manual).logits[:, -1].argmax(-1, keepdim=True)
            manual = torch.cat([manual, nxt], 1)
            if int(nxt) == model.config.separator_token_id:
                break
    finally:
        model.generation_config.guidance_scale = None
    assert torch.equal(a, b)
    assert a[0, : manual.shape[1]].tolist() == manual[0].tolist()


def test_cli_default_model_is_nano_with_a_clear_error_when_absent(tmp_path, monkeypatch):
    import lumina_hf.nano as nano
    from lumina_hf.cli import main

    monkeypatch.setattr(nano, "WEIGHTS_DIR", str(tmp_path / "no-weights"))
    with pytest.raises(SystemExit, match="nano model is not in this installation"):
        main(["generate", "a red circle", "-o", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------- a loop that never waits for the device
def guarded_loop(monkeypatch):
    """Run `_decode_loop` (the per-token loop, not the prefill) under the host-read guard; returns the list of
    offending calls seen across all guarded runs."""
    from sync_guard import no_host_reads

    import lumina_hf.generation_lumina_mgpt as gen

    seen = []
    original = gen._decode_loop

    def wrapper(*args, **kwargs):
        with no_host_reads() as offenders:
            try:
                return original(*args, **kwargs)
            finally:
                seen.extend(offenders)

    monkeypatch.setattr(gen, "_decode_loop", wrapper)
    return seen


def test_decode_loop_never_reads_the_device(model, processor, monkeypatch):
    """Sampled with per-image generators, with one generator, greedy, without guidance, with a callback and a
    progress bar, and with rows of different sizes (sampled size tokens): no `.item()`, `int()`, `bool()`,
    `.tolist()`, scalar read or data-dependent shape inside the per-token loop."""
    seen = guarded_loop(monkeypatch)
    p = prompt_ids(processor, "a red circle", 64, 32)
    q = prompt_ids(processor, "a much longer prompt about two blue squares", 64, 32)
    steps = []

    class Bar:
        def update(self, n):
            steps.append(n)

    runs = [
        dict(generator=[torch.Generator().manual_seed(i) for i in range(2)], callback=lambda s, t: False, progress_bar=Bar()),
        dict(generator=torch.Generator().manual_seed(0)),
        dict(do_sample=False, guidance_scale=1.0),
    ]
    for kw in runs:
        out = generate_image_tokens(model, [p, q], height=32, width=64, guidance_scale=kw.pop("guidance_scale", 3.0), **kw)
        assert tuple(out.sequences.shape) == (2, 3 + 2 * 5 + 1)
    assert len(steps) == 2 * 5 + 1
    small = build_tiny_model(seed=1, max_size_units=3)
    mixed = generate_image_tokens(small, [p, q, p], force_size=False, generator=[torch.Generator().manual_seed(i) for i in range(3)])
    assert len(set(mixed.sizes)) == 3  # these seeds give three sizes: the per-row ("mixed") schedule ran
    assert seen == []


def test_sync_guard_catches_a_host_read(model, processor, monkeypatch):
    """The guard is not blind: an `int(tensor)` slipped into the loop (here inside the sampler) fails the run."""
    import lumina_hf.generation_lumina_mgpt as gen
    from sync_guard import HostReadError

    seen = guarded_loop(monkeypatch)
    original = gen.gumbel_sample

    def reads_back(logits, uniform, temperature):
        choice = original(logits, uniform, temperature)
        int(choice[0])  # a host read, as a careless edit would add
        return choice

    monkeypatch.setattr(gen, "gumbel_sample", reads_back)
    p = prompt_ids(processor, "a", 32, 32)
    with pytest.raises(HostReadError):
        generate_image_tokens(model, [p], height=32, width=32, generator=torch.Generator().manual_seed(0))
    assert seen and all("__int__" in s or "_local_scalar_dense" in s for s in seen)


def test_prefill_goes_through_the_model_forward(model, processor):
    """The prompt is run by the model's own forward, once per call (hooks on it, such as diffusers' model CPU
    offload, move the model to its execution device first); the decode steps call the decoder directly."""
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        p = prompt_ids(processor, "a", 32, 32)
        generate_image_tokens(model, [p, p], height=32, width=32, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert calls == [1]
