"""Offload and sharding: the guided decoding loop (batched guidance, static cache) gives the same tokens when
accelerate spreads the decoder over two devices, or offloads its weights, as the same model unsplit.

Two devices on a CPU-only machine: "cpu" and "disk" (accelerate's disk offload: those modules' weights live in files
and are brought in at each forward). Sequential CPU offload is accelerate's `cpu_offload` with the CPU as the execution
device: weights on "meta" between calls, moved in per module, the same hooks `enable_sequential_cpu_offload()` puts on
a GPU pipeline. The GPU versions are marked `cuda`.
"""

import pytest
import torch
from accelerate import cpu_offload, infer_auto_device_map

from lumina_hf import LuminaMGPTForConditionalGeneration, LuminaMGPTPipeline
from lumina_hf.generation_lumina_mgpt import generate_image_tokens
from lumina_hf.nano import nano_path
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="offload to a GPU needs a CUDA GPU")
PROMPTS = [[0, 9300, 9301, 9302, 8710], [0, 9310, 9311, 8710]]


def module_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def decode(model, **kw):
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return generate_image_tokens(model, PROMPTS, height=64, width=64, guidance_scale=3.0, image_top_k=50,
                                 generator=gens, **kw).sequences


@pytest.fixture(scope="module")
def nano_model():
    return LuminaMGPTForConditionalGeneration.from_pretrained(nano_path(), subfolder="model", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def unsplit_tokens(nano_model):
    return decode(nano_model)


def test_device_map_over_cpu_and_disk_gives_the_unsplit_tokens(nano_model, unsplit_tokens, tmp_path):
    ref = nano_model
    layer = module_bytes(ref.model.layers[0])
    # room on the CPU for the embeddings, the VQGAN and about half the layers: the rest goes to disk
    budget = module_bytes(ref.model.embed_tokens) + module_bytes(ref.model.vqmodel) + 8 * layer
    device_map = infer_auto_device_map(ref, max_memory={"cpu": budget, "disk": 10**10},
                                       no_split_module_classes=ref._no_split_modules)
    layers_on = {k: v for k, v in device_map.items() if k.startswith("model.layers.")}
    assert set(layers_on.values()) == {"cpu", "disk"}
    # a decoder layer is never split: every entry is a whole layer (or a whole top-level module)
    assert all(k.count(".") == 2 for k in layers_on), sorted(layers_on)
    split = LuminaMGPTForConditionalGeneration.from_pretrained(
        nano_path(), subfolder="model", dtype=torch.float32, device_map=device_map, offload_folder=str(tmp_path)
    ).eval()
    assert split.lm_head.weight.device.type == "meta"  # its weights are on disk between calls
    torch.testing.assert_close(decode(split), unsplit_tokens, rtol=0, atol=0)


def test_device_map_auto_with_max_memory_and_the_plan_check(nano_model, unsplit_tokens, tmp_path):
    """`device_map="auto"` with a CPU budget below the model spills layers to disk; the planner's pre-load check lets
    it through because there is a disk to spill to."""
    budget = module_bytes(nano_model) // 2
    split = LuminaMGPTForConditionalGeneration.from_pretrained(
        nano_path(), subfolder="model", dtype=torch.float32, device_map="auto",
        max_memory={"cpu": budget, "disk": 10**10}, offload_folder=str(tmp_path),
    ).eval()
    assert "disk" in set(split.hf_device_map.values())
    torch.testing.assert_close(decode(split), unsplit_tokens, rtol=0, atol=0)


def tiny_pipe():
    pipe = LuminaMGPTPipeline(model=build_tiny_model(), processor=build_tiny_processor(64))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, **kw):
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    return pipe(["a red circle", "a cat"], height=64, width=64, generator=gens, guidance_scale=3.0,
                output_type="pt", **kw).images


def test_sequential_cpu_offload_gives_the_same_images():
    ref = images(tiny_pipe(), num_candidates=2)
    pipe = tiny_pipe()
    cpu_offload(pipe.model, execution_device=torch.device("cpu"))  # what enable_sequential_cpu_offload() attaches
    assert pipe.model.lm_head.weight.device.type == "meta" and pipe.model.model.vqmodel.decoder.conv_in.weight.device.type == "meta"
    # num_candidates=2 also runs the candidate-ranking forward on the offloaded model
    torch.testing.assert_close(images(pipe, num_candidates=2), ref, rtol=0, atol=0)


def test_model_cpu_offload_gives_the_same_images():
    ref = images(tiny_pipe())
    pipe = tiny_pipe()
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.model, "_hf_hook")
    torch.testing.assert_close(images(pipe), ref, rtol=0, atol=0)


def test_no_split_modules_name_the_decoder_layers_and_the_vqgan():
    model = build_tiny_model()
    classes = {type(m).__name__ for m in model.modules()}
    assert {"LuminaMGPTDecoderLayer", "LuminaMGPTVQGAN"} <= set(model._no_split_modules)
    assert set(model._no_split_modules) - {"LuminaMGPTSwinDecoderLayer"} <= classes
    # a budget smaller than one layer per device: accelerate moves whole layers on, never parts of one
    layer = module_bytes(model.model.layers[0])
    device_map = infer_auto_device_map(model, max_memory={"cpu": int(layer * 1.5), "disk": 10**10},
                                       no_split_module_classes=model._no_split_modules)
    assert not any(k.startswith("model.layers.") and k.count(".") > 2 for k in device_map)
    assert not any(k.startswith("model.vqmodel.") for k in device_map)


# ---------------------------------------------------------------------------------------------- CUDA only
@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_pipeline_offload_to_the_gpu_gives_the_same_images(mode):
    ref = tiny_pipe().to("cuda")
    expected = images(ref)
    pipe = tiny_pipe()
    (pipe.enable_model_cpu_offload if mode == "model" else pipe.enable_sequential_cpu_offload)()
    torch.testing.assert_close(images(pipe), expected, rtol=0, atol=0)


@pytest.mark.cuda
@needs_cuda
def test_device_map_over_gpu_and_cpu_gives_the_unsplit_tokens(nano_model):
    ref = LuminaMGPTForConditionalGeneration.from_pretrained(nano_path(), subfolder="model", dtype=torch.float32,
                                                             device_map="cuda").eval()
    n = ref.config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.norm": "cpu", "model.rotary_emb": 0, "model.vqmodel": 0, "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": (0 if i < n // 2 else "cpu") for i in range(n)})
    split = LuminaMGPTForConditionalGeneration.from_pretrained(nano_path(), subfolder="model", dtype=torch.float32,
                                                               device_map=device_map).eval()
    torch.testing.assert_close(decode(split), decode(ref), rtol=0, atol=0)
