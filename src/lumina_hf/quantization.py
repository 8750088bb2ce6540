"""Quantized weights for Lumina-mGPT through the standard Hugging Face configs.

Nothing here is needed to quantize: `LuminaMGPTForConditionalGeneration.from_pretrained(path,
quantization_config=TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=KEEP_UNQUANTIZED))` and
`LuminaMGPTPipeline.from_pretrained(path, quantization_config=PipelineQuantizationConfig(quant_mapping={"model":
...}))` work as for any transformers model. The helpers build those configs for the two common cases ("int8",
"int4"), and `check_quantization_request` turns the requests that cannot run into one clear error before any
weight is read.

What is quantized, and why: only the decoder layers' linear weights (q/k/v/o projections and the MLP), which
are nearly all of the weights and of the memory traffic per decoding step. Kept in their precision
(`KEEP_UNQUANTIZED`, passed as `modules_to_not_convert`):
- the VQGAN (`model.vqmodel`): it runs once per image (no speed to gain), is small next to the decoder, its
  weights are convolutions that weight-only linear quantization does not cover, and its codebook lookup and decoder
  decide the pixels directly; the model also declares it in `_keep_in_fp32_modules_strict`, so it stays float32
  whatever dtype the language model has;
- the token embeddings (`model.embed_tokens`): a lookup, not a matmul, read one row per step;
- the LM head (`lm_head`): the sampler reads only the rows of the 8192 image codes and copies them once per
  generation (`n_codes x hidden`); the logits decide every sampled token, and guidance multiplies their
  differences by the guidance scale (4 by default), so rounding errors there are amplified. Quantizing it saves
  one layer's worth of memory at most. To quantize it anyway, leave "lm_head" out of `modules_to_not_convert`:
  the sampler then dequantizes the image-code rows once.

Backends: torchao (`pip install "lumina-hf[quantization]"`) int8 weight-only runs on CPU and CUDA; its int4
weight-only kernels (`Int4WeightOnlyConfig`) need a CUDA GPU. bitsandbytes 8-bit and 4-bit (`pip install
bitsandbytes`) need a CUDA GPU.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)

KEEP_UNQUANTIZED = ["lm_head", "model.embed_tokens", "model.vqmodel"]
QUANTIZATIONS = ("int8", "int4")
BACKENDS = ("torchao", "bitsandbytes")
INSTALL = {
    "torchao": 'torchao (pip install "lumina-hf[quantization]", or pip install torchao)',
    "bitsandbytes": "bitsandbytes (pip install bitsandbytes; it needs a CUDA GPU)",
}


def backend_available(backend: str) -> bool:
    """Whether the quantization backend's package is importable (found without importing it)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    return importlib.util.find_spec(backend) is not None


def require_backend(backend: str) -> None:
    """`ImportError` naming the package to install when `backend` is missing."""
    if not backend_available(backend):
        raise ImportError(f"{backend} quantization needs the package {INSTALL[backend]}.")


def _wants_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, dict):
        return any(_wants_cuda(d) for d in device.values())
    text = str(device)
    return text == "auto" or text.startswith("cuda")


def check_kind(kind: str, backend: str = "torchao", device=None) -> None:
    """Check that `kind` ("int8"/"int4") with `backend` can run on `device` (a device string, a `device_map`, or None
    for the CPU), before anything is loaded: the backend must be installed, torchao int4 and bitsandbytes need CUDA."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantization must be 'int8' or 'int4', got {kind!r}.")
    require_backend(backend)
    cuda_asked = _wants_cuda(device)
    needs_cuda = backend == "bitsandbytes" or kind == "int4"
    if not needs_cuda:
        return
    what = "bitsandbytes quantization" if backend == "bitsandbytes" else "torchao int4 weight-only (Int4WeightOnlyConfig)"
    if not torch.cuda.is_available():
        raise ValueError(
            f"{what} has no CPU kernels and this machine has no CUDA GPU: use int8 (torchao int8 weight-only runs on "
            "the CPU) or a machine with a CUDA GPU."
        )
    if not cuda_asked:
        raise ValueError(
            f"{what} runs on CUDA only and quantizes the weights while they are loaded: load them onto the GPU "
            "(device_map='cuda', or --device cuda on the command line)."
        )


def torchao_config(kind: str, group_size: int = 128, modules_to_not_convert: list[str] | None = None):
    """transformers `TorchAoConfig` for torchao weight-only "int8" (`Int8WeightOnlyConfig`, per output channel) or
    "int4" (`Int4WeightOnlyConfig(group_size)`, CUDA only), leaving `KEEP_UNQUANTIZED` in their precision."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantization must be 'int8' or 'int4', got {kind!r}.")
    require_backend("torchao")
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    quant_type = Int8WeightOnlyConfig() if kind == "int8" else Int4WeightOnlyConfig(group_size=group_size)
    skip = list(KEEP_UNQUANTIZED if modules_to_not_convert is None else modules_to_not_convert)
    return TorchAoConfig(quant_type, modules_to_not_convert=skip)


def bitsandbytes_config(kind: str, compute_dtype=torch.bfloat16, modules_to_not_convert: list[str] | None = None):
    """transformers `BitsAndBytesConfig`: "int8" is LLM.int8() (`load_in_8bit`), "int4" is NF4 (`load_in_4bit`,
    computing in `compute_dtype`), leaving `KEEP_UNQUANTIZED` in their precision. CUDA only."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantization must be 'int8' or 'int4', got {kind!r}.")
    require_backend("bitsandbytes")
    from transformers import BitsAndBytesConfig

    skip = list(KEEP_UNQUANTIZED if modules_to_not_convert is None else modules_to_not_convert)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=skip)


def model_quantization_config(kind: str, backend: str = "torchao", **kwargs):
    """The transformers quantization config for `kind` with `backend` ("torchao" or "bitsandbytes")."""
    if backend == "torchao":
        return torchao_config(kind, **kwargs)
    if backend == "bitsandbytes":
        return bitsandbytes_config(kind, **kwargs)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")


def pipeline_quantization_config(kind: str, backend: str = "torchao", **kwargs):
    """diffusers `PipelineQuantizationConfig` that quantizes the pipeline's `model` component (a transformers model)
    with `model_quantization_config(kind, backend)`; the processor is not a module and is left as it is."""
    from diffusers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping={"model": model_quantization_config(kind, backend, **kwargs)})


def quantize_in_place(model: torch.nn.Module, kind: str, group_size: int = 128,
                      modules_to_not_convert: list[str] | None = None) -> torch.nn.Module:
    """Quantize an already built model with torchao's `quantize_` (same configs and same modules kept as
    `torchao_config`; for models made in memory, e.g. the random tiny model). Returns `model`."""
    check_kind(kind, "torchao", next(model.parameters()).device.type)
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    skip = tuple(KEEP_UNQUANTIZED if modules_to_not_convert is None else modules_to_not_convert)

    def wanted(module: torch.nn.Module, name: str) -> bool:
        kept = any(name == s or name.startswith(s + ".") for s in skip)
        return isinstance(module, torch.nn.Linear) and not kept

    config = Int8WeightOnlyConfig() if kind == "int8" else Int4WeightOnlyConfig(group_size=group_size)
    quantize_(model, config, filter_fn=wanted)
    return model


def describe_config(quantization_config) -> tuple[str, str | None]:
    """`(backend, kind)` of a transformers quantization config: backend "torchao", "bitsandbytes" or another
    method name, kind "int8", "int4" or None when it is neither."""
    method = getattr(quantization_config, "quant_method", None)
    method = getattr(method, "value", method)
    method = str(method) if method is not None else type(quantization_config).__name__
    if method == "torchao":
        name = type(getattr(quantization_config, "quant_type", None)).__name__.lower()
        kind = "int4" if "int4" in name else ("int8" if "int8" in name else None)
        return "torchao", kind
    if method == "bitsandbytes":
        if getattr(quantization_config, "load_in_4bit", False):
            return "bitsandbytes", "int4"
        if getattr(quantization_config, "load_in_8bit", False):
            return "bitsandbytes", "int8"
        return "bitsandbytes", None
    return method, None


def check_quantization_request(quantization_config, device_map=None) -> None:
    """Called by `LuminaMGPTForConditionalGeneration.from_pretrained` before any weight is read: refuse a
    quantization that cannot run here (backend missing, int4 or bitsandbytes without a CUDA GPU or with the
    weights loaded onto the CPU), with the fix in the message."""
    if quantization_config is None:
        return
    if isinstance(quantization_config, dict):  # a config.json of a saved quantized model: transformers checks it
        return
    backend, kind = describe_config(quantization_config)
    if backend == "bitsandbytes":
        require_backend("bitsandbytes")
        check_kind(kind or "int8", "bitsandbytes", device_map)
    elif backend == "torchao" and kind == "int4":
        check_kind("int4", "torchao", device_map)


__all__ = [
    "BACKENDS",
    "KEEP_UNQUANTIZED",
    "QUANTIZATIONS",
    "backend_available",
    "bitsandbytes_config",
    "check_kind",
    "check_quantization_request",
    "describe_config",
    "model_quantization_config",
    "pipeline_quantization_config",
    "quantize_in_place",
    "require_backend",
    "torchao_config",
]
