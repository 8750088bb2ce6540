"""Memory planning for Lumina-mGPT image generation: how much memory a run needs, computed from the config alone
(no weights are read), and whether a `max_memory` budget can hold it.

`memory_estimate(config, height, width, batch_size, dtype, quantization=...)` predicts the peak of the guided
decoding loop (`lumina_hf.generation_lumina_mgpt.generate_image_tokens`) followed by the VQGAN decode, as the sum of:

- **weights**: the language model (embeddings, decoder layers, final norm, LM head) in `dtype`, with the decoder
  layers' linear weights at their quantized size when `quantization` is "int8" or "int4" (the embeddings, the LM
  head and the VQGAN are not quantized: see `lumina_hf.quantization`); the VQGAN in float32; the non-persistent
  buffers (code <-> token-id tables, rotary frequencies).
- **decode head**: the sampler's copy of the LM-head rows of the image codes (`n_codes x hidden` in `dtype`).
- **KV cache**: the static cache, one key and one value tensor per layer of
  `(rows, kv_heads, cache_length, head_dim)` in `dtype`, where `rows = batch_size x num_candidates x 2` with
  guidance (a conditional and an unconditional row per image) and `cache_length = prompt + 3 + grid` tokens, rounded up as the decoding loop rounds it (a multiple of 256 within
  the model's context).
- **activations**: the larger of the prefill (every prompt position at once) and one decoding step (one position,
  attention over the whole cache, the code logits and the sampler's temporaries).
- **candidate ranking** (only with `num_candidates > 1`): the forward pass that scores each candidate's caption
  likelihood, `batch_size` rows at a time over the image span plus the text, with its cache and the float32
  log-softmax over the vocabulary at the caption positions.
- **VQGAN activations**: decoding one image to pixels (the pipeline decodes images one at a time): five float32
  feature maps of the decoder's full-resolution level alive at once inside a residual block, plus the mid-block
  attention matrix.

The decode phase (weights + head + cache + activations), the ranking phase and the VQGAN phase (weights + VQGAN
activations) do not overlap: the cache and the head are freed before candidates are ranked and images decoded.
`MemoryEstimate.peak` is the largest phase. Allocator overhead (caching allocators, fragmentation, library workspaces) is not included.

`check_max_memory(...)` places that estimate on the devices of a `max_memory` mapping (as accelerate would: whole
decoder layers in order, each with its share of the cache) and raises `InsufficientMemoryError` when it does not
fit, naming the options that would (int8 or int4 weights, CPU offload, a smaller batch).
"""

from __future__ import annotations

import logging
import re
import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8", "int4")
# bytes per element of the activations and logits the sampler keeps in float32
_FP32 = 4
# torchao's default group size of int4 weight-only quantization (Int4WeightOnlyConfig(group_size=128))
INT4_GROUP_SIZE = 128
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class InsufficientMemoryError(ValueError):
    """The memory budget cannot hold the requested generation. `options` lists the alternatives that would fit
    (possibly empty), each a short description such as "int4 weights (peak 7.1 GiB)"."""

    def __init__(self, message: str, options: list[str] | None = None):
        super().__init__(message)
        self.options = list(options or [])


def format_bytes(n: float) -> str:
    """Bytes as a short human string in binary units (KiB, MiB, GiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def parse_size(value) -> int:
    """`20GiB`, `"20 GB"`, `"512MiB"`, 1e9 or an int -> bytes (GB = 10**9, GiB = 2**30, as accelerate reads them)."""
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}.")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a memory size must be >= 0, got {value!r}.")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*", str(value).lower())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"not a memory size: {value!r} (write e.g. 20GiB, 512MB or a number of bytes).")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _dtype_bytes(dtype) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype (float32, bfloat16, float16), got {dtype!r}.")
    return torch.empty((), dtype=dtype).element_size()


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def linear_weight_bytes(out_features: int, in_features: int, dtype_bytes: int, quantization: str | None,
                        group_size: int = INT4_GROUP_SIZE) -> int:
    """Stored size of one bias-free linear weight `(out, in)`:
    - unquantized: `out * in * dtype_bytes`;
    - "int8" (torchao `Int8WeightOnlyConfig`, per output channel): int8 values plus a float32 scale and an int8 zero
      point per row, `out * in + out * 5`;
    - "int4" (torchao `Int4WeightOnlyConfig`, groups of `group_size` along the input): two values per byte plus a
      bfloat16 scale and zero point per group, `out * in / 2 + 4 * out * ceil(in / group_size)`."""
    if quantization is None:
        return out_features * in_features * dtype_bytes
    if quantization == "int8":
        return out_features * in_features + out_features * 5
    if quantization == "int4":
        groups = -(-in_features // group_size)
        return out_features * in_features // 2 + 4 * out_features * groups
    raise ValueError(f"quantization must be None, 'int8' or 'int4', got {quantization!r}.")


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted memory of one text-to-image generation, in bytes (see the module docstring for each term).

    `layer_weights` and `layer_kv_cache` are per decoder layer (what a device holding that layer needs);
    `largest_module` is the largest single module moved at a time by sequential CPU offload."""

    weights: int
    vqgan_weights: int
    buffers: int
    decode_head: int
    kv_cache: int
    prefill_activations: int
    decode_activations: int
    vqgan_activations: int
    ranking_activations: int
    layer_weights: int
    layer_kv_cache: int
    embedding_weights: int
    lm_head_weights: int
    largest_module: int
    rows: int
    cache_length: int
    settings: dict = field(default_factory=dict)

    @property
    def resident(self) -> int:
        """Memory held for the whole run: every weight and buffer."""
        return self.weights + self.vqgan_weights + self.buffers

    @property
    def decode_phase(self) -> int:
        return self.resident + self.decode_head + self.kv_cache + max(self.prefill_activations, self.decode_activations)

    @property
    def vqgan_phase(self) -> int:
        return self.resident + self.vqgan_activations

    @property
    def ranking_phase(self) -> int:
        return self.resident + self.ranking_activations

    @property
    def peak(self) -> int:
        """Predicted peak: the largest of the decoding, candidate-ranking and VQGAN phases."""
        return max(self.decode_phase, self.ranking_phase, self.vqgan_phase)

    def table(self) -> str:
        """The estimate as an aligned text table, one term per line, ending with the peak."""
        s = self.settings
        lines = [
            f"memory plan: {s.get('height')}x{s.get('width')}, batch {s.get('batch_size')}"
            f"{' x ' + str(s.get('num_candidates')) + ' candidates' if s.get('num_candidates', 1) > 1 else ''}, "
            f"{'guidance (' + str(self.rows) + ' rows)' if s.get('guidance') else 'no guidance'}, "
            f"dtype {s.get('dtype')}, weights {s.get('quantization') or 'not quantized'}, "
            f"cache {self.cache_length} tokens",
        ]
        rows = [
            ("language model weights", self.weights),
            ("VQGAN weights (float32)", self.vqgan_weights),
            ("buffers", self.buffers),
            ("sampler's image-code head", self.decode_head),
            ("KV cache", self.kv_cache),
            ("activations (prefill)", self.prefill_activations),
            ("activations (decode step)", self.decode_activations),
            ("VQGAN decode activations", self.vqgan_activations),
            ("candidate ranking (forward)", self.ranking_activations),
            ("peak: decoding phase", self.decode_phase),
            ("peak: ranking phase", self.ranking_phase),
            ("peak: VQGAN phase", self.vqgan_phase),
            ("predicted peak", self.peak),
        ]
        width = max(len(name) for name, _ in rows)
        lines += [f"  {name:<{width}}  {format_bytes(value):>11}" for name, value in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _vqgan_counts(config) -> tuple[int, int, int]:
    """(parameter bytes, buffer bytes, widest full-resolution decoder channels) of the VQGAN, counted on the meta
    device: the module is built without allocating any memory."""
    return _vqgan_counts_cached(config.vq_config.to_json_string())


@functools.lru_cache(maxsize=8)
def _vqgan_counts_cached(vq_json: str) -> tuple[int, int, int]:
    import json

    from .configuration_lumina_mgpt import LuminaMGPTVQConfig
    from .modeling_vqgan import LuminaMGPTVQGAN

    vq_config = LuminaMGPTVQConfig(**{k: v for k, v in json.loads(vq_json).items() if k not in ("model_type", "transformers_version")})
    with torch.device("meta"):
        vq = LuminaMGPTVQGAN._from_config(vq_config)
    params = sum(p.numel() * 4 for p in vq.parameters())  # the VQGAN is always float32
    buffers = sum(b.numel() * b.element_size() for b in vq.buffers())
    top_channels = vq.config.base_channels * vq.config.channel_multiplier[0]
    return params, buffers, top_channels


def memory_estimate(
    config,
    height: int,
    width: int,
    batch_size: int = 1,
    dtype=torch.bfloat16,
    quantization: str | None = None,
    guidance: bool = True,
    num_candidates: int = 1,
    prompt_length: int = 64,
    group_size: int = INT4_GROUP_SIZE,
) -> MemoryEstimate:
    """Predict the memory of generating `batch_size` images of `width x height` pixels with `config`
    (a `LuminaMGPTConfig`), before any weight is loaded.

    Args:
        dtype: the language model's dtype (the VQGAN stays float32).
        quantization: None, "int8" or "int4": the decoder layers' linear weights quantized (weight-only).
        guidance: whether classifier-free guidance runs (an unconditional row per image); False for
            `guidance_scale=1.0`.
        num_candidates: candidates sampled per image (`num_candidates` of the pipeline), all in one batch.
        prompt_length: tokens of the conditional prompt (the tokenized conversation up to the image prefix).
        group_size: int4 quantization group size.

    Returns a `MemoryEstimate`; `.peak` is the predicted peak in bytes, `.table()` the breakdown.
    """
    _check_estimate_args(batch_size, num_candidates, prompt_length, quantization)
    layout = config.unirep
    layout.size_units(height, "height")
    layout.size_units(width, "width")
    b = _dtype_bytes(dtype)
    d = _dims(config)
    w = _weight_bytes(config, d, b, quantization, group_size)
    vq_params, vq_buffers, top_channels = _vqgan_counts(config)

    # ---- sequence lengths
    rows = batch_size * num_candidates * (2 if guidance else 1)
    grid_rows, grid_cols = layout.grid_shape(height, width)
    prompt = prompt_length + 3  # + the image prefix (start token and the two size tokens)
    cache_length = _decode_cache_length(config, prompt + layout.grid_length(grid_rows, grid_cols))

    layer_kv = _kv_bytes(d, rows, cache_length, b)
    prefill, decode = _decode_activation_bytes(d, b, rows, prompt, cache_length)
    return MemoryEstimate(
        weights=w.total,
        vqgan_weights=vq_params,
        buffers=_buffer_bytes(d, vq_buffers),
        decode_head=d.codes * d.hidden * b,
        kv_cache=d.layers * layer_kv,
        prefill_activations=prefill,
        decode_activations=decode,
        vqgan_activations=_vqgan_activation_bytes(top_channels, height, width, grid_rows * grid_cols),
        ranking_activations=_ranking_bytes(d, b, layout, height, width, batch_size, num_candidates, prompt),
        layer_weights=w.layer,
        layer_kv_cache=layer_kv,
        embedding_weights=w.embedding,
        lm_head_weights=w.lm_head,
        largest_module=w.largest_module,
        rows=rows,
        cache_length=cache_length,
        settings=dict(height=height, width=width, batch_size=batch_size, dtype=str(dtype).removeprefix("torch."),
                      quantization=quantization, guidance=guidance, num_candidates=num_candidates,
                      prompt_length=prompt_length, num_layers=d.layers),
    )


# ------------------------------------------------------------------------------------ terms of the estimate
def _check_estimate_args(batch_size: int, num_candidates: int, prompt_length: int, quantization: str | None) -> None:
    """Refuse counts below 1 (or not integers) and an unknown quantization."""
    for name, value in (("batch_size", batch_size), ("num_candidates", num_candidates), ("prompt_length", prompt_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantization must be None, 'int8' or 'int4', got {quantization!r}.")


class _Dims(NamedTuple):
    """The sizes of the language model that the estimate uses."""

    hidden: int
    intermediate: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    codes: int  # image codes of the VQGAN codebook


def _dims(config) -> _Dims:
    return _Dims(config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers,
                 config.num_attention_heads, config.num_key_value_heads, _head_dim(config),
                 len(config.image_code_to_token_id()))


class _Weights(NamedTuple):
    """Bytes of the language model's weights: all of them, one decoder layer, the embeddings, the LM head, and the
    largest single module."""

    total: int
    layer: int
    embedding: int
    lm_head: int
    largest_module: int


def _layer_linears(d: _Dims) -> list[tuple[int, int]]:
    """`(out, in)` of one decoder layer's linear weights: q, k, v, o, then the MLP's gate, up and down."""
    h, hd, inter = d.hidden, d.head_dim, d.intermediate
    return [(d.heads * hd, h), (d.kv_heads * hd, h), (d.kv_heads * hd, h), (h, d.heads * hd), (inter, h), (inter, h), (h, inter)]


def _qk_norm_elements(config, d: _Dims) -> int:
    """Elements of one layer's q-norm and k-norm parameters (weight and bias each)."""
    if config.qk_norm_layout == "grouped":
        groups = config.model_parallel_size or 1
        return 2 * 2 * groups * d.head_dim
    return 2 * (d.heads + d.kv_heads) * d.head_dim


def _weight_bytes(config, d: _Dims, b: int, quantization: str | None, group_size: int) -> _Weights:
    """The language model's weights in `b`-byte elements, the decoder layers' linears quantized as asked."""
    linears = [linear_weight_bytes(o, i, b, quantization, group_size) for o, i in _layer_linears(d)]
    layer = sum(linears) + (2 * d.hidden + _qk_norm_elements(config, d)) * b  # + input and post-attention RMSNorm
    embedding = d.vocab * d.hidden * b
    lm_head = d.vocab * d.hidden * b
    total = embedding + d.layers * layer + d.hidden * b + lm_head
    return _Weights(total, layer, embedding, lm_head, max(embedding, lm_head, max(linears)))


def _buffer_bytes(d: _Dims, vq_buffers: int) -> int:
    """Non-persistent buffers: code -> id (n_codes int64), id -> code (vocab int64), rotary inverse frequencies
    (head_dim / 2, float32), plus the VQGAN's."""
    return d.codes * 8 + d.vocab * 8 + (d.head_dim // 2) * 4 + vq_buffers


def _decode_cache_length(config, length: int) -> int:
    """The cache length the decoding loop allocates for `length` tokens (rounded up: one compiled shape per bucket)."""
    from .generation_lumina_mgpt import _cache_length

    return _cache_length(length, config.max_position_embeddings)


def _kv_bytes(d: _Dims, rows: int, length: int, b: int) -> int:
    """One layer's key and value cache, `(rows, kv_heads, length, head_dim)` each (static: allocated in full at
    the first forward)."""
    return 2 * rows * d.kv_heads * length * d.head_dim * b


def _position_bytes(d: _Dims, b: int, attended: int) -> int:
    """Activations of one position in one layer attending over `attended` positions: the residual stream, its
    normalised copy, q, k, v, the attention output and the o_proj output (hidden-sized), the MLP's gate, up and
    their product (intermediate-sized), plus the float32 attention weights and the float32 additive mask."""
    per_position = (6 * d.hidden + 3 * d.intermediate) * b
    return per_position + d.heads * attended * _FP32 + attended * _FP32


def _decode_activation_bytes(d: _Dims, b: int, rows: int, prompt: int, cache_length: int) -> tuple[int, int]:
    """`(prefill, one decoding step)`: every prompt position at once, then one position plus the sampler's float32
    tensors over the codebook (logits, the guided logits, the top-k filtered copy, log-softmax, the uniform noise
    and its Gumbel transform)."""
    prefill = rows * prompt * _position_bytes(d, b, cache_length)
    decode = rows * _position_bytes(d, b, cache_length) + 6 * rows * d.codes * _FP32
    return prefill, decode


def _vqgan_activation_bytes(top_channels: int, height: int, width: int, latent_positions: int) -> int:
    """VQGAN decode of one image. The widest maps are the full-resolution level's; inside one of its residual
    blocks five are alive at once: the block input (kept for the shortcut), the first swish output (held by the
    local variable while the second half runs), and the second half's conv, norm and swish outputs. Plus the
    mid-block attention matrix (softmax input and output) at the latent resolution and the RGB output."""
    pixels = height * width
    return 5 * top_channels * pixels * _FP32 + 2 * latent_positions**2 * _FP32 + 3 * pixels * _FP32


def _ranking_bytes(d: _Dims, b: int, layout, height: int, width: int, batch_size: int, num_candidates: int,
                   prompt: int) -> int:
    """Candidate ranking (0 unless num_candidates > 1): one forward per chunk of `batch_size` rows over the
    describe question, the candidate's image span and the caption (about the prompt's length), with its own cache,
    and the float32 log-softmax over the caption positions."""
    if num_candidates <= 1:
        return 0
    length = layout.span_length(height, width) + prompt
    ranking = batch_size * length * _position_bytes(d, b, length)
    ranking += d.layers * _kv_bytes(d, batch_size, length, b)
    ranking += 2 * batch_size * prompt * d.vocab * _FP32
    return ranking

# ---------------------------------------------------------------------------------------------------- budgets
def normalize_max_memory(max_memory: dict) -> dict:
    """`{device: size}` with sizes in bytes. Devices are GPU indices (0, 1, ...), "cuda:N", "cpu", "mps", "xpu:N"
    or "disk"; sizes as `parse_size` reads them."""
    if not isinstance(max_memory, dict) or not max_memory:
        raise ValueError(f"max_memory must be a non-empty dict {{device: size}}, e.g. {{0: '20GiB', 'cpu': '64GiB'}}, got {max_memory!r}.")
    out = {}
    for device, size in max_memory.items():
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        out[device] = parse_size(size)
    return out


def _accelerators(budget: dict) -> list:
    return [d for d in budget if d not in ("cpu", "disk")]


def _place(estimate: MemoryEstimate, devices: list, budget: dict) -> bool:
    """Can the model and its cache run from `devices` (in order) within `budget`? Modules are placed as accelerate
    fills devices: the embeddings and then whole decoder layers (each with its share of the cache) in order, then the
    final norm and LM head; the first device also holds the VQGAN, the buffers, the sampler's head and the larger
    of the activations or the VQGAN's decode activations."""
    if not devices:
        return False
    first = devices[0]
    free = {d: budget[d] for d in devices}
    working = estimate.vqgan_weights + estimate.buffers + max(
        estimate.decode_head + max(estimate.prefill_activations, estimate.decode_activations), estimate.vqgan_activations
    )
    free[first] -= working
    items = [estimate.embedding_weights]
    items += [estimate.layer_weights + estimate.layer_kv_cache] * estimate.settings["num_layers"]
    items += [estimate.lm_head_weights]
    i = 0
    for size in items:
        while i < len(devices) and free[devices[i]] < size:
            i += 1
        if i == len(devices):
            return False
        free[devices[i]] -= size
    return all(v >= 0 for v in free.values())


def fits(estimate: MemoryEstimate, max_memory: dict, offload: bool = False) -> bool:
    """Whether `estimate` fits `max_memory`. Without `offload`, everything runs from the accelerators named in the
    budget (or from "cpu" when it names none). With `offload` (sequential CPU offload), the CPU holds the weights and
    the first accelerator the cache, the activations and the largest module being run."""
    budget = normalize_max_memory(max_memory)
    accel = _accelerators(budget)
    if not offload:
        return _place(estimate, accel or ["cpu"], budget)
    if not accel:
        return False  # offloading to the CPU needs an accelerator to run on
    gpu_need = (estimate.kv_cache + estimate.decode_head + estimate.buffers + estimate.largest_module
                + max(estimate.prefill_activations, estimate.decode_activations, estimate.vqgan_activations))
    cpu_need = estimate.weights + estimate.vqgan_weights
    return budget[accel[0]] >= gpu_need and budget.get("cpu", 0) >= cpu_need


def check_max_memory(config, max_memory: dict, height: int, width: int, batch_size: int = 1, dtype=torch.bfloat16,
                     quantization: str | None = None, offload: bool = False, **kwargs) -> MemoryEstimate:
    """Raise `InsufficientMemoryError` unless the generation described by the arguments (as for `memory_estimate`)
    fits `max_memory`; the error names the alternatives that would fit (int8 or int4 weights, sequential CPU
    offload, the largest batch size that fits), or says that none does. Returns the estimate when it fits."""
    estimate = memory_estimate(config, height, width, batch_size, dtype, quantization, **kwargs)
    if fits(estimate, max_memory, offload):
        return estimate
    budget = normalize_max_memory(max_memory)
    options = []
    for q in QUANTIZATIONS:
        if q == quantization or (quantization == "int4" and q == "int8"):
            continue
        alt = replace_quantization(config, estimate, q)
        if fits(alt, budget, offload):
            options.append(f"{q} weights (quantization={q!r}, peak {format_bytes(alt.peak)})")
    if not offload and fits(estimate, budget, offload=True):
        options.append(
            "sequential CPU offload (pipe.enable_sequential_cpu_offload(): the accelerator holds the cache and one "
            f"module at a time, the CPU {format_bytes(estimate.weights + estimate.vqgan_weights)} of weights)"
        )
    for smaller in range(batch_size - 1, 0, -1):
        alt = memory_estimate(config, height, width, smaller, dtype, quantization, **kwargs)
        if fits(alt, budget, offload):
            options.append(f"batch_size={smaller} (peak {format_bytes(alt.peak)})")
            break
    where = ", ".join(f"{d}: {format_bytes(v)}" for d, v in budget.items())
    need = f"needs {format_bytes(estimate.peak)} at its peak" + (
        f" ({format_bytes(estimate.layer_weights + estimate.layer_kv_cache)} per decoder layer, which is never split)")
    if options:
        message = (f"max_memory ({where}) cannot hold this generation: it {need}. Options that fit: "
                   + "; ".join(options) + ".")
    else:
        message = (f"max_memory ({where}) cannot hold this generation: it {need}, and neither int8 nor int4 weights, "
                   "CPU offload nor a batch of 1 fits. Give more memory (or a smaller image).")
    raise InsufficientMemoryError(message, options)


def replace_quantization(config, estimate: MemoryEstimate, quantization: str | None) -> MemoryEstimate:
    """`estimate` recomputed with other weights (same sizes, batch and settings)."""
    s = estimate.settings
    return memory_estimate(config, s["height"], s["width"], s["batch_size"], s["dtype"], quantization,
                           guidance=s["guidance"], num_candidates=s["num_candidates"], prompt_length=s["prompt_length"])


def weights_estimate(config, dtype=torch.bfloat16, quantization: str | None = None) -> int:
    """Bytes of every weight and buffer (language model in `dtype`, quantized as asked; VQGAN in float32)."""
    layout = config.unirep
    side = layout.patch_size
    return memory_estimate(config, side, side, 1, dtype, quantization, guidance=False, prompt_length=1).resident


def check_weights_fit(config, max_memory: dict, dtype=torch.bfloat16, quantization: str | None = None,
                      offload_folder=None) -> None:
    """Before `from_pretrained` reads any weight: raise `InsufficientMemoryError` when `max_memory` (without a "disk"
    entry or an `offload_folder` to spill to) cannot hold the weights at all, naming the quantizations that would."""
    budget = normalize_max_memory(max_memory)
    if "disk" in budget or offload_folder is not None:
        return
    total = sum(budget.values())
    need = weights_estimate(config, dtype, quantization)
    if need <= total:
        return
    options = []
    for q in QUANTIZATIONS:
        if q != quantization and weights_estimate(config, dtype, q) <= total:
            options.append(f"{q} weights ({format_bytes(weights_estimate(config, dtype, q))})")
    options.append("disk offload (offload_folder=..., slow)")
    where = ", ".join(f"{d}: {format_bytes(v)}" for d, v in budget.items())
    raise InsufficientMemoryError(
        f"max_memory ({where}, {format_bytes(total)} in all) cannot hold the weights: they take {format_bytes(need)} "
        f"in {str(dtype).removeprefix('torch.')}{' with ' + quantization + ' layers' if quantization else ''}. "
        "Options: " + "; ".join(options) + ".",
        options,
    )


__all__ = [
    "InsufficientMemoryError",
    "MemoryEstimate",
    "check_max_memory",
    "check_weights_fit",
    "fits",
    "format_bytes",
    "linear_weight_bytes",
    "memory_estimate",
    "normalize_max_memory",
    "parse_size",
    "weights_estimate",
]
