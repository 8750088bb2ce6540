"""The converted model's config and the plan of every output tensor (source, shape, dtype, shard)."""


from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..configuration_lumina_mgpt import LuminaMGPTConfig, taming_to_vq_config_dict
from .sources import TOKENIZER_SPECIALS, VQ_PREFIX, TensorInfo, dtype_name, image_vocabulary_map

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ config
def _qk_norm_layout(published: dict[str, Any], tensors: dict[str, TensorInfo]) -> tuple[str, int]:
    """("grouped", mp) or ("per_head", mp), read from layer 0's q/k-norm weight shapes."""
    heads = int(published["num_attention_heads"])
    kv = int(published.get("num_key_value_heads") or heads)
    qn, kn = "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"
    for name in (qn, kn):
        if name not in tensors:
            raise ValueError(f"the checkpoint has no tensor {name}: not a Chameleon checkpoint with q/k-norm.")
        if len(tensors[name].shape) != 2:
            raise ValueError(f"tensor {name} has shape {list(tensors[name].shape)}; expected [model_parallel_size, head_dim].")
    q_rows, k_rows = tensors[qn].shape[0], tensors[kn].shape[0]
    config_mp = int(published.get("model_parallel_size") or 1)
    if q_rows == heads and k_rows == kv and q_rows > 1 and q_rows != config_mp:
        return "per_head", config_mp if heads % config_mp == 0 and kv % config_mp == 0 else 1
    if q_rows == k_rows and heads % q_rows == 0 and kv % q_rows == 0:
        if q_rows != config_mp:
            logger.warning(
                "config.json says model_parallel_size=%d but the grouped q/k-norm weights have %d groups (%s %s): "
                "using %d from the weights", config_mp, q_rows, qn, list(tensors[qn].shape), q_rows,
            )
        return "grouped", q_rows
    raise ValueError(
        f"q/k-norm shapes {qn} {list(tensors[qn].shape)} and {kn} {list(tensors[kn].shape)} fit neither the grouped "
        f"layout [model_parallel_size, head_dim] nor the per-head layout ({heads} query heads, {kv} key/value heads)."
    )


def build_config(
    published: dict[str, Any],
    tensors: dict[str, TensorInfo],
    vq_config: dict[str, Any],
    tokenizer,
    dtype: torch.dtype | None,
) -> LuminaMGPTConfig:
    """The output `LuminaMGPTConfig`: the published sizes and fork fields, the VQ config of vqgan.yaml, the
    image-code vocabulary of the tokenizer and the q/k-norm layout of the weights."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if key not in published:
            raise ValueError(f"the checkpoint's config.json has no {key}.")
    layout, mp = _qk_norm_layout(published, tensors)
    d = dict(published)
    for key in ("model_type", "vocabulary_map", "vq_config", "torch_dtype", "dtype", "transformers_version",
                "_name_or_path", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id"):
        d.pop(key, None)
    if "mask_image_logits" not in published:
        # Stock Chameleon always masks the image logits; only the Lumina-mGPT fork (which says so) does not.
        logger.warning("config.json has no mask_image_logits (not a Lumina-mGPT fork config): keeping stock Chameleon's masking")
        d["mask_image_logits"] = True
    pub_vq = published.get("vq_config")
    if isinstance(pub_vq, dict):
        pub_flat = taming_to_vq_config_dict(pub_vq)
        diff = {k: (pub_flat[k], v) for k, v in vq_config.items() if k in pub_flat and pub_flat[k] != v and k != "resolution"}
        if diff:
            logger.warning("config.json's vq_config differs from vqgan.yaml (%s): using vqgan.yaml", diff)

    vmap = image_vocabulary_map(tokenizer)
    vocab = tokenizer.get_vocab()
    vocab_size = int(published["vocab_size"])
    too_big = [(n, i) for n, i in vocab.items() if i >= vocab_size]
    if too_big:
        raise ValueError(f"the tokenizer has ids beyond the model's vocab_size {vocab_size} (e.g. {too_big[0]}): it does not belong to this checkpoint.")
    if "<image>" not in vmap:
        raise ValueError("the tokenizer has no <image> (or <reserved08707>) token: it is not a Chameleon vocabulary.")
    pub_map = published.get("vocabulary_map")
    if isinstance(pub_map, dict):
        for name, tid in vmap.items():
            if name in pub_map and int(pub_map[name]) != tid:
                raise ValueError(
                    f"the tokenizer puts {name} at id {tid} but the checkpoint's vocabulary_map says {pub_map[name]}: "
                    "the tokenizer does not belong to this checkpoint."
                )
    specials = {
        "separator_token_id": "<reserved08706>",
        "image_start_token_id": "<racm3:break>",
        "image_end_token_id": "<eoss>",
        "image_row_end_token_id": "<reserved08799>",
        "size_token_base_id": "<reserved08800>",
    }
    for field, name in specials.items():
        if name not in vocab:
            raise ValueError(f"the tokenizer has no {name} ({field}): it is not a Chameleon vocabulary.")
        d[field] = int(vocab[name])
    d.update(
        architectures=["LuminaMGPTForConditionalGeneration"],
        vocabulary_map=vmap,
        vq_config=vq_config,
        qk_norm_layout=layout,
        model_parallel_size=mp,
        bos_token_id=int(vocab[TOKENIZER_SPECIALS["bos_token"]]),
        pad_token_id=int(vocab[TOKENIZER_SPECIALS["pad_token"]]),
        eos_token_id=int(vocab["<reserved08706>"]),
        image_placeholder_token_id=vmap["<image>"],
    )
    if dtype is not None:
        d["dtype"] = dtype_name(dtype)
    else:
        lm_dtypes = {t.dtype for k, t in tensors.items() if t.dtype.is_floating_point}
        if len(lm_dtypes) == 1:
            d["dtype"] = dtype_name(lm_dtypes.pop())
    try:
        config = LuminaMGPTConfig.from_dict(d)
        config.image_code_to_token_id()  # the tokenizer covers the VQGAN codebook, inside the image id range
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - strict dataclass validation raises TypeError and friends
        raise ValueError(f"the checkpoint's config.json does not make a valid Lumina-mGPT config: {err}") from err
    return config


def expected_state_shapes(config: LuminaMGPTConfig) -> dict[str, tuple[int, ...]]:
    """Persistent state-dict key -> shape of `LuminaMGPTForConditionalGeneration(config)`, built on the meta
    device (no memory)."""
    from ..modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration

    with torch.device("meta"):
        model = LuminaMGPTForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ planning
@dataclass
class PlanEntry:
    out_key: str
    source: str | None  # safetensors file, or None for a VQ tensor held in memory
    src_key: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def _first_names(names: list[str], most: int = 5) -> str:
    """The first `most` tensor names for a message, with " ..." when there are more."""
    return ", ".join(names[:most]) + (" ..." if len(names) > most else "")


def check_and_plan(
    expected: dict[str, tuple[int, ...]],
    tensors: dict[str, TensorInfo],
    vq_state: dict[str, torch.Tensor],
    dtype: torch.dtype | None,
) -> list[PlanEntry]:
    """Match checkpoint tensors to the model's state dict (names and shapes) and order them for writing:
    input file by input file (so one input file is open at a time), VQGAN (float32) last."""
    lm_expected = {k: s for k, s in expected.items() if not k.startswith(VQ_PREFIX)}
    vq_expected = {k[len(VQ_PREFIX):]: s for k, s in expected.items() if k.startswith(VQ_PREFIX)}
    ignored = sorted(k for k in tensors if k.startswith(VQ_PREFIX) or k.endswith("rotary_emb.inv_freq"))
    if ignored:
        logger.info("ignoring %d checkpoint tensors (the VQGAN comes from --vqgan; rotary buffers are recomputed): %s",
                    len(ignored), _first_names(ignored))
    unexpected = sorted(k for k in tensors if k not in lm_expected and k not in ignored)
    if unexpected:
        raise ValueError(
            f"the checkpoint holds tensors this architecture does not have: {_first_names(unexpected)}"
            f" (config.json and the weights disagree)."
        )
    missing = [k for k in lm_expected if k not in tensors]
    if missing:
        raise ValueError(f"the checkpoint lacks tensor(s) {_first_names(missing)}.")
    for key, shape in lm_expected.items():
        if tensors[key].shape != shape:
            raise ValueError(
                f"tensor {key} has shape {list(tensors[key].shape)} in {os.path.basename(tensors[key].file)}, "
                f"but config.json implies {list(shape)}."
            )
    vq_missing = [k for k in vq_expected if k not in vq_state]
    if vq_missing:
        raise ValueError(f"vqgan.ckpt lacks VQGAN tensor(s) {_first_names(vq_missing)} (or vqgan.yaml does not describe it).")
    vq_unexpected = sorted(k for k in vq_state if k not in vq_expected)
    if vq_unexpected:
        raise ValueError(f"vqgan.ckpt holds tensors vqgan.yaml does not describe: {', '.join(vq_unexpected[:5])}.")
    for key, shape in vq_expected.items():
        if tuple(vq_state[key].shape) != shape:
            raise ValueError(f"vqgan.ckpt tensor {key} has shape {list(vq_state[key].shape)}, but vqgan.yaml implies {list(shape)}.")

    order = {k: i for i, k in enumerate(expected)}
    files = list(dict.fromkeys(tensors[k].file for k in lm_expected))
    plan: list[PlanEntry] = []
    for fname in files:
        keys = sorted((k for k in lm_expected if tensors[k].file == fname), key=order.__getitem__)
        for k in keys:
            info = tensors[k]
            out_dtype = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
            plan.append(PlanEntry(k, fname, k, info.shape, out_dtype))
    for k in vq_expected:
        plan.append(PlanEntry(VQ_PREFIX + k, None, k, vq_expected[k], torch.float32))
    return plan


def split_shards(plan: list[PlanEntry], max_bytes: int) -> list[list[PlanEntry]]:
    shards: list[list[PlanEntry]] = [[]]
    size = 0
    for e in plan:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards

