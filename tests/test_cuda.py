"""GPU checks (`pytest -m cuda`, run by benchmarks/device_check.py): bf16 end to end with the VQGAN in fp32,
per-image CUDA generators, a decode loop that never synchronises, compiled decoding with CUDA graphs, and the
pipeline's device placements (`pipe.to("cuda")`, `enable_model_cpu_offload()`, `device_map="auto"`).

Every test skips on a machine without CUDA; the pipeline tests also skip where diffusers (or accelerate) is
not installed, saying so. Images are tiny (32x64 px: 2 rows of 4 codes) so the whole file runs in seconds
after compilation.
"""

import pytest
import torch

from lumina_hf import LuminaMGPTForConditionalGeneration, text_to_image_prompt
from lumina_hf.generation_lumina_mgpt import generate_image_tokens
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU: run `pytest -m cuda` (or benchmarks/device_check.py) on a GPU machine",
    ),
]

START, END, ROW_END, SIZE_BASE = 8197, 8196, 8803, 8804
HEIGHT, WIDTH = 32, 64


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(64)


@pytest.fixture(scope="module")
def prompts(processor):
    captions = ["a red circle", "a much longer prompt about a blue square on a green background"]
    return [processor(text=text_to_image_prompt(c, WIDTH, HEIGHT), return_tensors=None)["input_ids"][0] for c in captions]


@pytest.fixture
def exact_fp32():
    """fp32 matmuls in full precision (no TF32) for the tests that compare fp32 tokens across kernels."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def cuda_generators(seeds):
    return [torch.Generator("cuda").manual_seed(s) for s in seeds]


def assert_well_formed(sequences, model):
    """UniRep spans of a HEIGHT x WIDTH image: prefix, rows of image codes each closed by a row end, end token."""
    rows, cols = HEIGHT // 16, WIDTH // 16
    codes = set(model.config.image_code_to_token_id())
    for seq in sequences.tolist():
        assert seq[:3] == [START, SIZE_BASE + HEIGHT // 32, SIZE_BASE + WIDTH // 32]
        assert seq[-1] == END
        grid = torch.tensor(seq[3:-1]).view(rows, cols + 1)
        assert (grid[:, -1] == ROW_END).all()
        assert set(grid[:, :-1].flatten().tolist()) <= codes


def test_bf16_on_cuda_with_the_vqgan_in_fp32(processor, prompts):
    model = build_tiny_model(seed=3).to("cuda", torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.is_cuda
    assert all(p.dtype == torch.float32 and p.is_cuda for p in model.vqmodel.parameters())

    out = generate_image_tokens(model, prompts, height=HEIGHT, width=WIDTH, generator=cuda_generators([0, 1]))
    assert out.sequences.is_cuda
    assert_well_formed(out.sequences, model)
    # per-image CUDA generators: the same seeds give the same images, other seeds other images
    again = generate_image_tokens(model, prompts, height=HEIGHT, width=WIDTH, generator=cuda_generators([0, 1]))
    assert torch.equal(out.sequences, again.sequences)
    other = generate_image_tokens(model, prompts, height=HEIGHT, width=WIDTH, generator=cuda_generators([2, 3]))
    assert not torch.equal(out.sequences, other.sequences)

    grid = processor.extract_image_tokens(out.sequences[0].tolist())[0]
    pixels = model.decode_image_tokens(grid.unsqueeze(0).cuda())
    assert pixels.is_cuda and pixels.dtype == torch.float32 and tuple(pixels.shape) == (1, 3, HEIGHT, WIDTH)
    assert torch.isfinite(pixels).all()


def test_cuda_gives_the_tokens_of_cpu_with_cpu_generators(prompts, exact_fp32):
    """Same fp32 weights, same CPU generators (their draws are copied to the GPU without blocking): the GPU run
    writes the tokens the CPU run writes. No top-k here: a top-k boundary tie could flip on rounding noise."""
    model = build_tiny_model(seed=3)
    kwargs = dict(height=HEIGHT, width=WIDTH, guidance_scale=3.0, image_top_k=None, temperature=0.8)
    on_cpu = generate_image_tokens(model, prompts, generator=[torch.Generator().manual_seed(10 + i) for i in range(2)], **kwargs)
    model.to("cuda")
    on_gpu = generate_image_tokens(model, prompts, generator=[torch.Generator().manual_seed(10 + i) for i in range(2)], **kwargs)
    assert on_gpu.sequences.is_cuda
    assert torch.equal(on_gpu.sequences.cpu(), on_cpu.sequences)


def test_decode_loop_never_synchronizes_on_cuda(prompts, monkeypatch):
    """The per-token loop under `torch.cuda.set_sync_debug_mode("error")`: any operation that makes the host wait
    for the GPU raises. CUDA generators, CPU generators (pinned non-blocking copies), one generator, greedy."""
    import lumina_hf.generation_lumina_mgpt as gen

    original = gen._decode_loop

    def guarded(*args, **kwargs):
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(before)

    monkeypatch.setattr(gen, "_decode_loop", guarded)
    model = build_tiny_model(seed=3).to("cuda", torch.bfloat16)
    for generator in (cuda_generators([0, 1]), [torch.Generator().manual_seed(i) for i in range(2)], torch.Generator("cuda").manual_seed(0)):
        out = generate_image_tokens(model, prompts, height=HEIGHT, width=WIDTH, generator=generator)
        assert_well_formed(out.sequences, model)
    out = generate_image_tokens(model, prompts, height=HEIGHT, width=WIDTH, do_sample=False)
    assert_well_formed(out.sequences, model)


def test_compiled_decode_with_cuda_graphs(prompts, exact_fp32):
    """`compile="reduce-overhead"`: one graph, replayed as a CUDA graph (no cudagraph skip), no recompilation for a
    second image of the same batch size with a prompt of another length, and the tokens of the eager loop."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = build_tiny_model(seed=3).to("cuda")
    kwargs = dict(height=HEIGHT, width=WIDTH, image_top_k=None)  # no top-k boundary ties (see above)
    results = []
    for prompt in prompts:
        batch = [prompt, prompt]
        eager = generate_image_tokens(model, batch, generator=cuda_generators([0, 1]), **kwargs)
        compiled = generate_image_tokens(model, batch, generator=cuda_generators([0, 1]), compile="reduce-overhead", **kwargs)
        results.append(torch.equal(eager.sequences, compiled.sequences))
    assert counters["stats"]["unique_graphs"] == 1, "the decode step recompiled (or broke into several graphs)"
    assert not counters["graph_break"]
    assert counters["inductor"]["cudagraph_skips"] == 0, "inductor did not use CUDA graphs for the decode step"
    assert results == [True, True]


def test_device_map_auto_in_bf16(tmp_path, prompts):
    pytest.importorskip("accelerate", reason="device_map needs accelerate")
    build_tiny_model(seed=3).save_pretrained(tmp_path / "model")
    model = LuminaMGPTForConditionalGeneration.from_pretrained(tmp_path / "model", device_map="auto", dtype=torch.bfloat16)
    assert model.lm_head.weight.is_cuda and model.lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.vqmodel.parameters())
    out = generate_image_tokens(model, prompts, height=HEIGHT, width=WIDTH, generator=cuda_generators([0, 1]))
    assert_well_formed(out.sequences, model)


# ---------------------------------------------------------------------- the diffusers pipeline
def make_pipeline():
    pytest.importorskip("diffusers", reason="the pipeline needs diffusers")
    from lumina_hf import LuminaMGPTPipeline

    pipe = LuminaMGPTPipeline(model=build_tiny_model(seed=3), processor=build_tiny_processor(64))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_to_cuda_in_bf16():
    pipe = make_pipeline()
    pipe.to(torch.bfloat16)
    pipe.to("cuda")
    assert pipe._execution_device.type == "cuda"
    assert pipe.model.lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.is_cuda for p in pipe.model.vqmodel.parameters())
    out = pipe(["a red circle", "a blue square"], height=HEIGHT, width=WIDTH, generator=cuda_generators([0, 1]), output_type="pt")
    assert tuple(out.images.shape) == (2, 3, HEIGHT, WIDTH)
    again = pipe(["a red circle", "a blue square"], height=HEIGHT, width=WIDTH, generator=cuda_generators([0, 1]), output_type="pt")
    assert torch.equal(out.images, again.images)
    pil = pipe("a red circle", height=HEIGHT, width=WIDTH, generator=torch.Generator("cuda").manual_seed(0)).images
    assert pil[0].size == (WIDTH, HEIGHT)


def test_model_cpu_offload_runs_on_the_gpu():
    """`enable_model_cpu_offload()`: the model runs on the GPU during the call (its decoder's output is on CUDA),
    is back on the CPU afterwards, and writes the tokens of the same pipeline moved to the GPU."""
    reference = make_pipeline().to("cuda")
    want = reference("a red circle", height=HEIGHT, width=WIDTH, generator=torch.Generator("cuda").manual_seed(0), output_type="latent").images

    pytest.importorskip("accelerate", reason="model CPU offload needs accelerate")
    pipe = make_pipeline()
    pipe.enable_model_cpu_offload()
    seen = []
    hook = pipe.model.model.norm.register_forward_hook(lambda module, args, output: seen.append(output.device.type))
    try:
        got = pipe("a red circle", height=HEIGHT, width=WIDTH, generator=torch.Generator("cuda").manual_seed(0), output_type="latent").images
    finally:
        hook.remove()
    assert seen and set(seen) == {"cuda"}
    assert pipe.model.lm_head.weight.device.type == "cpu"
    assert torch.equal(got.cpu(), want.cpu())
