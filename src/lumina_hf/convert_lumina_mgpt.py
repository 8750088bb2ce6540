"""Convert a published Lumina-mGPT checkpoint plus Meta's Chameleon VQGAN into one self-contained folder.

Inputs, exactly as published (SPEC.md section 1):
- the Alpha-VLLM checkpoint folder (or Hub id): `config.json` (`model_type: "chameleon"`, the fork's keys),
  sharded safetensors with `model.safetensors.index.json` (or one `model.safetensors`), q/k-norm weights
  grouped as `[model_parallel_size, head_dim]`;
- Meta's `tokenizer/` folder: `vqgan.yaml` (taming-transformers config) and `vqgan.ckpt` (a torch pickle
  with a `state_dict`, read with `weights_only=True`);
- a tokenizer: the HF `tokenizer.json` (shipped by the 768 repo) or Meta's `text_tokenizer.json`.

Output: a diffusers pipeline folder that `LuminaMGPTPipeline.from_pretrained` loads:
```
output/
  model_index.json
  model/      config.json (LuminaMGPTConfig), generation_config.json, safetensors shards (+ index)
  processor/  tokenizer + image processor (the checkpoint's bucket target size)
  README.md   model card
```
The conversion streams: each input shard is read tensor by tensor with `safe_open` and output shards are
written as soon as they are full, so memory stays around one output shard (`max_shard_size`), never the
whole model. Everything is validated before the first byte is written, and written into a temporary folder
next to `output` that is renamed into place at the end: an error leaves no output behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from .configuration_lumina_mgpt import LuminaMGPTConfig, taming_to_vq_config_dict
from .unirep import parse_image_code_token_name

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
VQ_PREFIX = "model.vqmodel."
# Top-level modules of taming's VQModel that the VQGAN keeps; everything else in vqgan.ckpt (`loss.*`, the
# discriminator, LPIPS) is training-only.
VQ_MODULES = ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")
# Reference sampling defaults (SPEC.md section 6), stored in generation_config.json.
GENERATION_DEFAULTS = {"guidance_scale": 4.0, "image_top_k": 2000, "top_k": 10, "temperature": 1.0}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
HUB_ALLOW_PATTERNS = ["config.json", "*.safetensors", WEIGHTS_INDEX_NAME, "tokenizer.json", "tokenizer_config.json"]
TOKENIZER_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
PUBLISHED_TARGET_SIZES = (512, 768, 1024)


# ------------------------------------------------------------------------------------------ small helpers
def parse_size(size: int | str) -> int:
    """`5GB`, `500MB`, `2GiB`, `1e9` or an int -> bytes (decimal units, like transformers' `max_shard_size`)."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}.")
        return size
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size: use e.g. 5GB, 500MB or a number of bytes.")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    value = int(float(m.group(1)) * mult)
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}.")
    return value


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported: use one of {', '.join(DTYPES)} or 'auto'.")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported: use one of {', '.join(DTYPES)} or 'auto'.")
    return DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not name.startswith((".", "/", "~"))


def _resolve_checkpoint(checkpoint: str | os.PathLike, revision: str | None) -> str:
    """A local folder, else a Hub id fetched with `snapshot_download` (config, safetensors, tokenizer)."""
    path = os.path.expanduser(os.fspath(checkpoint))
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.exists(path):
        raise ValueError(f"--checkpoint {path} is a file: give the folder that holds config.json and the safetensors shards.")
    if not _looks_like_hub_id(path):
        raise ValueError(f"--checkpoint {path} does not exist (and is not a Hub id like Alpha-VLLM/Lumina-mGPT-7B-768).")
    from huggingface_hub import snapshot_download

    logger.info("%s is not a local folder: downloading it from the Hugging Face Hub", path)
    try:
        return snapshot_download(path, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS)
    except Exception as err:  # noqa: BLE001 - any Hub failure becomes a clear input error
        raise ValueError(f"--checkpoint {path} is not a local folder and could not be downloaded from the Hub: {err}") from err


def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise ValueError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from err


# ------------------------------------------------------------------------------------------ reading inputs
def read_published_config(ckpt_dir: str) -> dict[str, Any]:
    """The checkpoint's `config.json`, checked to be a Chameleon (Lumina-mGPT fork) config."""
    cfg = _read_json(os.path.join(ckpt_dir, "config.json"), "the checkpoint's config.json")
    if not isinstance(cfg, dict):
        raise ValueError(f"{ckpt_dir}/config.json is not a JSON object.")
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type not in ("chameleon", LuminaMGPTConfig.model_type):
        raise ValueError(
            f"{ckpt_dir}/config.json has model_type={model_type!r} (architectures {archs}): this converter takes "
            "Lumina-mGPT / Chameleon checkpoints (model_type 'chameleon', ChameleonXLLMXForConditionalGeneration)."
        )
    if archs and not any("Chameleon" in a or "LuminaMGPT" in a for a in archs):
        raise ValueError(f"{ckpt_dir}/config.json names architectures {archs}, not a Chameleon / Lumina-mGPT model.")
    return cfg


@dataclass
class _TensorInfo:
    file: str  # absolute path of the safetensors file
    shape: tuple[int, ...]
    dtype: torch.dtype


def index_checkpoint_tensors(ckpt_dir: str) -> dict[str, _TensorInfo]:
    """name -> (file, shape, dtype) for every tensor of the checkpoint, from the safetensors headers only."""
    from safetensors import safe_open

    index_path = os.path.join(ckpt_dir, WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        index = _read_json(index_path, "the safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map.")
        files = list(dict.fromkeys(weight_map.values()))
    elif os.path.isfile(os.path.join(ckpt_dir, WEIGHTS_NAME)):
        weight_map, files = None, [WEIGHTS_NAME]
    else:
        raise ValueError(f"{ckpt_dir} has neither {WEIGHTS_INDEX_NAME} nor {WEIGHTS_NAME}: not a safetensors checkpoint.")
    missing = [f for f in files if not os.path.isfile(os.path.join(ckpt_dir, f))]
    if missing:
        raise ValueError(f"checkpoint shard(s) listed in {WEIGHTS_INDEX_NAME} are missing from {ckpt_dir}: {', '.join(missing)}")
    out: dict[str, _TensorInfo] = {}
    for fname in files:
        path = os.path.join(ckpt_dir, fname)
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    st_dtype = sl.get_dtype()
                    if st_dtype not in _ST_DTYPES:
                        raise ValueError(f"tensor {key} in {fname} has unsupported dtype {st_dtype}.")
                    if key in out:
                        raise ValueError(f"tensor {key} is stored twice ({os.path.basename(out[key].file)} and {fname}).")
                    out[key] = _TensorInfo(path, tuple(sl.get_shape()), _ST_DTYPES[st_dtype])
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if weight_map is not None:
        for key, fname in weight_map.items():
            if key not in out:
                raise ValueError(f"{WEIGHTS_INDEX_NAME} lists tensor {key} in {fname}, but that file does not hold it.")
            if os.path.basename(out[key].file) != fname:
                raise ValueError(f"{WEIGHTS_INDEX_NAME} puts tensor {key} in {fname}, but it is in {os.path.basename(out[key].file)}.")
    return out


def read_vqgan_yaml(path: str) -> dict[str, Any]:
    """Meta's taming-style `vqgan.yaml` -> `LuminaMGPTVQConfig` keyword arguments."""
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"vqgan.yaml not found: {path} (--vqgan must be Meta's Chameleon `tokenizer/` folder).")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a taming VQGAN config (expected `model: {{params: ...}}`).")
    node = data.get("model", data)
    params = node.get("params", node) if isinstance(node, dict) else None
    if not isinstance(params, dict):
        raise ValueError(f"{path} has no `model.params` section.")
    dd = params.get("ddconfig", {})
    flat = {k: params[k] for k in ("embed_dim", "n_embed", "beta") if k in params}
    flat.update(dd if isinstance(dd, dict) else {})
    required = ["embed_dim", "n_embed", "z_channels", "ch", "ch_mult", "num_res_blocks", "in_channels", "out_ch"]
    missing = [k for k in required if k not in flat]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)} (model.params / model.params.ddconfig): not a taming VQGAN config.")
    if flat.get("double_z"):
        raise ValueError(f"{path} has double_z: true; the Chameleon VQGAN quantizes a single latent (double_z false).")
    return taming_to_vq_config_dict(flat)


def load_vqgan_state_dict(path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Meta's `vqgan.ckpt` -> (VQ tensors under their taming names, ignored non-VQ keys).

    Loaded with `torch.load(weights_only=True)`: a pickle that holds anything but tensors and plain
    containers is refused."""
    if not os.path.isfile(path):
        raise ValueError(f"vqgan.ckpt not found: {path} (--vqgan must be Meta's Chameleon `tokenizer/` folder).")
    try:
        try:
            # memory-mapped: the tensors are read from the file when the output shard is written
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as err:  # noqa: BLE001 - UnpicklingError for objects, RuntimeError/EOFError for corrupt files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path} could not be loaded with torch.load(weights_only=True): {first}. The converter only reads "
            "checkpoints made of tensors and plain containers (Meta's vqgan.ckpt is); a pickle with other "
            "objects could run arbitrary code and is refused."
        ) from err
    if isinstance(obj, dict) and "state_dict" in obj:
        state = obj["state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        raise ValueError(f"{path} holds no `state_dict` (got {type(obj).__name__}{' with keys ' + str(list(obj)[:5]) if isinstance(obj, dict) else ''}).")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: `state_dict` is a {type(state).__name__}, not a dict of tensors.")
    bad = [(k, type(v).__name__) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{path}: state_dict entries must all be tensors; {bad[0][0]!r} is a {bad[0][1]}"
            f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}."
        )
    vq = {k: v for k, v in state.items() if k.split(".", 1)[0] in VQ_MODULES}
    ignored = sorted(k for k in state if k not in vq)
    if not vq:
        raise ValueError(f"{path} has no VQGAN tensors ({', '.join(VQ_MODULES)}.*): not a taming VQModel checkpoint.")
    return vq, ignored


def _tokenizer_json_candidates(ckpt_dir: str, vqgan_dir: str) -> list[str]:
    return [
        os.path.join(ckpt_dir, "tokenizer.json"),
        os.path.join(vqgan_dir, "text_tokenizer.json"),
        os.path.join(vqgan_dir, "tokenizer.json"),
    ]


def load_tokenizer(path: str):
    """A `PreTrainedTokenizerFast` from an HF `tokenizer.json` or Meta's `text_tokenizer.json` (both `tokenizers`
    JSON files). Meta's file calls the image placeholder `<reserved08707>`: it is renamed `<image>` (same id)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in ("tokenizer.json", "text_tokenizer.json") if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise ValueError(f"--tokenizer folder {path} has no tokenizer.json or text_tokenizer.json.")
        path = found[0]
    data = _read_json(path, "tokenizer file")
    try:
        backend = Tokenizer.from_str(json.dumps(data))
    except Exception as err:  # noqa: BLE001 - tokenizers raises a generic Exception
        raise ValueError(f"{path} is not a `tokenizers` JSON file: {err}") from err
    vocab = backend.get_vocab(with_added_tokens=True)
    if "<image>" not in vocab and "<reserved08707>" in vocab:
        model_vocab = data.get("model", {}).get("vocab")
        if isinstance(model_vocab, dict) and "<reserved08707>" in model_vocab:
            model_vocab["<image>"] = model_vocab.pop("<reserved08707>")
        for tok in data.get("added_tokens", []):
            if tok.get("content") == "<reserved08707>":
                tok["content"] = "<image>"
        backend = Tokenizer.from_str(json.dumps(data))
        logger.info("%s: renamed <reserved08707> to <image> (id %d), the image placeholder", path, vocab["<reserved08707>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **TOKENIZER_SPECIALS)
    missing = [t for t in TOKENIZER_SPECIALS.values() if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)}: it is not a Chameleon vocabulary.")
    return tokenizer


def image_vocabulary_map(tokenizer) -> dict[str, int]:
    """name -> id of the image-code tokens (`IMGIMG<letters>Z`) and `<image>` in `tokenizer`."""
    vocab = tokenizer.get_vocab()
    out = {name: int(tid) for name, tid in vocab.items() if parse_image_code_token_name(name) is not None}
    if "<image>" in vocab:
        out["<image>"] = int(vocab["<image>"])
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def infer_target_size(checkpoint: str, published: dict[str, Any]) -> int | None:
    """512/768/1024 from the checkpoint's name (`Lumina-mGPT-7B-768`, `...-34B-512`), else None."""
    names = [os.path.basename(os.fspath(checkpoint).rstrip("/")), os.fspath(checkpoint), str(published.get("_name_or_path", ""))]
    for name in names:
        found = {int(m) for m in re.findall(r"(?:^|[-_/])(512|768|1024)(?=$|[-_/])", name)}
        if len(found) == 1:
            return found.pop()
    return None


# ------------------------------------------------------------------------------------------ config
def _qk_norm_layout(published: dict[str, Any], tensors: dict[str, _TensorInfo]) -> tuple[str, int]:
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
    tensors: dict[str, _TensorInfo],
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
        d["dtype"] = _dtype_name(dtype)
    else:
        lm_dtypes = {t.dtype for k, t in tensors.items() if t.dtype.is_floating_point}
        if len(lm_dtypes) == 1:
            d["dtype"] = _dtype_name(lm_dtypes.pop())
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
    from .modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration

    with torch.device("meta"):
        model = LuminaMGPTForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ planning
@dataclass
class _Entry:
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


def _check_and_plan(
    expected: dict[str, tuple[int, ...]],
    tensors: dict[str, _TensorInfo],
    vq_state: dict[str, torch.Tensor],
    dtype: torch.dtype | None,
) -> list[_Entry]:
    """Match checkpoint tensors to the model's state dict (names and shapes) and order them for writing:
    input file by input file (so one input file is open at a time), VQGAN (float32) last."""
    lm_expected = {k: s for k, s in expected.items() if not k.startswith(VQ_PREFIX)}
    vq_expected = {k[len(VQ_PREFIX):]: s for k, s in expected.items() if k.startswith(VQ_PREFIX)}
    ignored = sorted(k for k in tensors if k.startswith(VQ_PREFIX) or k.endswith("rotary_emb.inv_freq"))
    if ignored:
        logger.info("ignoring %d checkpoint tensors (the VQGAN comes from --vqgan; rotary buffers are recomputed): %s",
                    len(ignored), ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
    unexpected = sorted(k for k in tensors if k not in lm_expected and k not in ignored)
    if unexpected:
        raise ValueError(
            f"the checkpoint holds tensors this architecture does not have: {', '.join(unexpected[:5])}"
            f"{' ...' if len(unexpected) > 5 else ''} (config.json and the weights disagree)."
        )
    missing = [k for k in lm_expected if k not in tensors]
    if missing:
        raise ValueError(f"the checkpoint lacks tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}.")
    for key, shape in lm_expected.items():
        if tensors[key].shape != shape:
            raise ValueError(
                f"tensor {key} has shape {list(tensors[key].shape)} in {os.path.basename(tensors[key].file)}, "
                f"but config.json implies {list(shape)}."
            )
    vq_missing = [k for k in vq_expected if k not in vq_state]
    if vq_missing:
        raise ValueError(f"vqgan.ckpt lacks VQGAN tensor(s) {', '.join(vq_missing[:5])}{' ...' if len(vq_missing) > 5 else ''} (or vqgan.yaml does not describe it).")
    vq_unexpected = sorted(k for k in vq_state if k not in vq_expected)
    if vq_unexpected:
        raise ValueError(f"vqgan.ckpt holds tensors vqgan.yaml does not describe: {', '.join(vq_unexpected[:5])}.")
    for key, shape in vq_expected.items():
        if tuple(vq_state[key].shape) != shape:
            raise ValueError(f"vqgan.ckpt tensor {key} has shape {list(vq_state[key].shape)}, but vqgan.yaml implies {list(shape)}.")

    order = {k: i for i, k in enumerate(expected)}
    files = list(dict.fromkeys(tensors[k].file for k in lm_expected))
    plan: list[_Entry] = []
    for fname in files:
        keys = sorted((k for k in lm_expected if tensors[k].file == fname), key=order.__getitem__)
        for k in keys:
            info = tensors[k]
            out_dtype = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
            plan.append(_Entry(k, fname, k, info.shape, out_dtype))
    for k in vq_expected:
        plan.append(_Entry(VQ_PREFIX + k, None, k, vq_expected[k], torch.float32))
    return plan


def _split_shards(plan: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in plan:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


# ------------------------------------------------------------------------------------------ writing
def _write_shard(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write one output shard (a seam for tests that simulate a failure)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})


def _write_weights(
    model_dir: str, shards: list[list[_Entry]], vq_state: dict[str, torch.Tensor], progress: bool
) -> None:
    """Write the planned output shards one by one (+ the index when there are several).

    `safe_open` maps an input file and `get_tensor` returns views of that mapping, so every page a written
    tensor touched stays resident while the file is open: the input files are opened per output shard and
    closed once it is written, which bounds memory by about one output shard, not one input file."""
    from contextlib import ExitStack

    from safetensors import safe_open
    from tqdm.auto import tqdm

    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    total = 0
    with tqdm(total=sum(len(s) for s in shards), desc="Converting tensors", unit="tensor", disable=not progress) as bar:
        for shard, name in zip(shards, names):
            out: dict[str, torch.Tensor] = {}
            with ExitStack() as stack:
                handles: dict[str, Any] = {}
                for e in shard:
                    if e.source is None:
                        t = vq_state[e.src_key].to(torch.float32)
                    else:
                        if e.source not in handles:
                            handles[e.source] = stack.enter_context(safe_open(e.source, framework="pt"))
                        t = handles[e.source].get_tensor(e.src_key).to(e.dtype)
                    out[e.out_key] = t.contiguous()
                    weight_map[e.out_key] = name
                    total += e.nbytes
                    bar.update(1)
                _write_shard(os.path.join(model_dir, name), out)
                del out, t
            logger.info("wrote %s (%d tensors)", name, len(shard))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(model_dir, WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")


def _generation_config(config: LuminaMGPTConfig):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.separator_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=True,
        **GENERATION_DEFAULTS,
    )


def _model_index() -> dict[str, Any]:
    """What `LuminaMGPTPipeline(model, processor).save_pretrained` writes as model_index.json."""
    import diffusers

    from .modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration
    from .pipeline_lumina_mgpt import LuminaMGPTPipeline
    from .processing_lumina_mgpt import LuminaMGPTProcessor

    return {
        "_class_name": LuminaMGPTPipeline.__name__,
        "_diffusers_version": diffusers.__version__,
        "model": [LuminaMGPTForConditionalGeneration.__module__, LuminaMGPTForConditionalGeneration.__name__],
        "processor": [LuminaMGPTProcessor.__module__, LuminaMGPTProcessor.__name__],
    }


def _model_card(source: str, base_model: str | None, config: LuminaMGPTConfig, target_size: int, output: str) -> str:
    front = ["---", "library_name: lumina_hf", "pipeline_tag: text-to-image",
             "tags:", "- lumina-mgpt", "- chameleon", "- text-to-image", "- any-to-any"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front.append("---")
    params = "34B" if config.hidden_size >= 8192 else ("7B" if config.hidden_size >= 4096 else "custom-size")
    name = os.path.basename(output.rstrip("/"))
    d = GENERATION_DEFAULTS
    body = f"""
# {name}

Lumina-mGPT ({params}, {target_size}px buckets) in the `lumina_hf` format: the language model, the full
Chameleon VQGAN (encoder and decoder, float32), the tokenizer and the image processor in one folder, loadable
with `LuminaMGPTPipeline.from_pretrained` or the transformers Auto classes after `import lumina_hf`.

Converted with `lumina-hf convert` from `{source}` and Meta's Chameleon VQGAN (`vqgan.yaml`, `vqgan.ckpt`).

## Usage

```py
import torch
from lumina_hf import LuminaMGPTPipeline

pipe = LuminaMGPTPipeline.from_pretrained("{name}", torch_dtype=torch.bfloat16).to("cuda")
image = pipe("a photo of a red fox in the snow", height={target_size}, width={target_size}).images[0]
```

Sampling defaults (`generation_config.json`): guidance scale {d['guidance_scale']}, image top-k {d['image_top_k']},
text top-k {d['top_k']}, temperature {d['temperature']}, generation stops at `<reserved08706>`
(id {config.separator_token_id}).

## License

The weights keep the licenses of their sources: the Lumina-mGPT checkpoint (Alpha-VLLM) and Meta's Chameleon
release (the VQGAN and tokenizer, Chameleon research license).
"""
    return "\n".join(front) + "\n" + body


LOCK_FILE = ".lumina-convert.pid"  # in a conversion's temporary folder: the PID of the process writing it


def _temp_prefix(output: str) -> str:
    return f".{os.path.basename(output)}.converting-"


def is_lumina_output(folder: str) -> bool:
    """Whether `folder` is a pipeline folder that lumina_hf wrote (what `--overwrite` may replace)."""
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as fh:
            return json.load(fh).get("_class_name") == "LuminaMGPTPipeline"
    except (OSError, ValueError, AttributeError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temp_folders(output: str) -> list[str]:
    """Remove the temporary folders that killed conversions to `output` left behind (their process is gone);
    returns what was removed. A folder whose process still runs is left alone."""
    parent, prefix = os.path.dirname(output), _temp_prefix(output)
    removed = []
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        folder = os.path.join(parent, name)
        if not (name.startswith(prefix) and os.path.isdir(folder)):
            continue
        try:
            with open(os.path.join(folder, LOCK_FILE), encoding="utf-8") as fh:
                pid = int(fh.read().strip())
        except (OSError, ValueError):
            pid = None  # killed before it wrote its PID (or not ours to judge): stale once it is an hour old
            if time.time() - os.path.getmtime(folder) < 3600:
                continue
        if pid is not None and _pid_alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        logger.warning("removed %s, left behind by an interrupted conversion", folder)
    return removed


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _interrupt_on_termination():
    """While converting, SIGTERM (and SIGHUP) interrupt like Ctrl-C, so the temporary folder is removed on the way
    out. Returns a function that restores the previous handlers (a no-op outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    wanted = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {sig: signal.signal(sig, interrupt) for sig in wanted}

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _install(tmp: str, output: str, overwrite: bool) -> None:
    """Move the finished `tmp` folder to `output` (replacing it with `overwrite`)."""
    old = None
    if os.path.lexists(output):
        if not overwrite:
            raise ValueError(f"output {output} appeared during the conversion; pass overwrite=True to replace it.")
        old = f"{output}.old-{uuid.uuid4().hex[:8]}"
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def _is_within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# ------------------------------------------------------------------------------------------ public API
def convert_checkpoint(
    checkpoint: str | os.PathLike,
    vqgan: str | os.PathLike,
    output: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    target_size: int | None = None,
    dtype: str | torch.dtype | None = "bfloat16",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    revision: str | None = None,
    progress: bool = True,
) -> str:
    """Convert a published Lumina-mGPT checkpoint and Meta's Chameleon VQGAN into one lumina_hf folder.

    Args:
        checkpoint: the Alpha-VLLM checkpoint folder (`config.json` + safetensors), or a Hub id such as
            `Alpha-VLLM/Lumina-mGPT-7B-768` (downloaded with `huggingface_hub.snapshot_download`).
        vqgan: Meta's Chameleon `tokenizer/` folder with `vqgan.yaml` and `vqgan.ckpt`.
        output: the folder to create (a diffusers pipeline folder: `model/`, `processor/`, `model_index.json`).
        tokenizer: a `tokenizer.json` / `text_tokenizer.json` (or a folder holding one). Default: the
            checkpoint's `tokenizer.json`, else `text_tokenizer.json` in `vqgan`.
        target_size: the image-bucket target size of the checkpoint (512, 768, 1024; any multiple of 32).
            Default: read from the checkpoint's name (`...-768...`).
        dtype: dtype of the language-model weights ("bfloat16", "float16", "float32", or "auto"/None to keep
            the checkpoint's). The VQGAN is always float32.
        max_shard_size: largest output shard (`"5GB"` or bytes); it also bounds the conversion's memory.
        overwrite: replace an existing `output`.
        revision: Hub revision when `checkpoint` is a Hub id.
        progress: show a progress bar over tensors.

    Returns: the absolute path of `output`.

    Raises `ValueError` for bad input (missing files, another architecture, shape mismatches, a vqgan.ckpt
    with non-tensor content, an existing output): always before anything is written.
    """
    output = os.path.abspath(os.path.expanduser(os.fspath(output)))
    if os.path.lexists(output) and not overwrite:
        raise ValueError(f"output {output} already exists: pass --overwrite (overwrite=True) to replace it.")
    if os.path.lexists(output) and not is_lumina_output(output):
        raise ValueError(
            f"refusing to overwrite {output}: it is not a lumina_hf pipeline folder (no model_index.json naming "
            "LuminaMGPTPipeline). Remove it yourself or choose another --output."
        )
    out_dtype = _resolve_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    vqgan_dir = os.path.abspath(os.path.expanduser(os.fspath(vqgan)))
    if not os.path.isdir(vqgan_dir):
        raise ValueError(f"--vqgan {vqgan_dir} is not a folder (give Meta's Chameleon `tokenizer/` folder with vqgan.yaml and vqgan.ckpt).")
    ckpt_dir = _resolve_checkpoint(checkpoint, revision)
    for name, folder in (("--checkpoint", ckpt_dir), ("--vqgan", vqgan_dir)):
        if _is_within(folder, output) or _is_within(output, folder):
            raise ValueError(f"output {output} overlaps the {name} folder {folder}: write the conversion elsewhere.")

    # ---- read and validate everything (nothing is written before this block ends)
    published = read_published_config(ckpt_dir)
    tensors = index_checkpoint_tensors(ckpt_dir)
    vq_config = read_vqgan_yaml(os.path.join(vqgan_dir, "vqgan.yaml"))
    vq_state, vq_ignored = load_vqgan_state_dict(os.path.join(vqgan_dir, "vqgan.ckpt"))
    if vq_ignored:
        logger.info("vqgan.ckpt: ignoring %d non-VQ tensors (training losses): %s", len(vq_ignored), ", ".join(vq_ignored))
    if tokenizer is None:
        candidates = _tokenizer_json_candidates(ckpt_dir, vqgan_dir)
        found = [c for c in candidates if os.path.isfile(c)]
        if not found:
            raise ValueError(f"no tokenizer found (looked for {', '.join(candidates)}): pass --tokenizer tokenizer.json.")
        tokenizer = found[0]
    tokenizer_path = os.path.abspath(os.path.expanduser(os.fspath(tokenizer)))
    if not os.path.exists(tokenizer_path):
        raise ValueError(f"tokenizer file not found: {tokenizer_path}")
    tok = load_tokenizer(tokenizer_path)
    config = build_config(published, tensors, vq_config, tok, out_dtype)
    plan = _check_and_plan(expected_state_shapes(config), tensors, vq_state, out_dtype)

    if target_size is None:
        target_size = infer_target_size(checkpoint, published)
        if target_size is None:
            raise ValueError(
                f"cannot tell the image target size of {checkpoint} from its name: pass --target-size "
                f"({', '.join(map(str, PUBLISHED_TARGET_SIZES))}, the number in the checkpoint's name)."
            )
        logger.info("target size %d (from the checkpoint's name)", target_size)
    from .image_processing_lumina_mgpt import LuminaMGPTImageProcessor
    from .processing_lumina_mgpt import LuminaMGPTProcessor

    processor = LuminaMGPTProcessor(image_processor=LuminaMGPTImageProcessor(target_size=int(target_size)), tokenizer=tok)
    for field, pid in (
        ("image_start_token_id", processor.image_start_token_id),
        ("image_end_token_id", processor.image_end_token_id),
        ("image_row_end_token_id", processor.row_end_token_id),
        ("separator_token_id", processor.separator_token_id),
        ("image_placeholder_token_id", processor.image_placeholder_token_id),
    ):
        if getattr(config, field) != pid:
            raise ValueError(f"the config's {field}={getattr(config, field)} differs from the tokenizer's id {pid}.")
    shards = _split_shards(plan, max_bytes)
    source = os.fspath(checkpoint)
    base_model = source if (not os.path.isdir(os.path.expanduser(source)) and _looks_like_hub_id(source)) else None
    if base_model is None and _looks_like_hub_id(str(published.get("_name_or_path", ""))):
        base_model = str(published["_name_or_path"])

    # ---- write into a temporary folder next to the output, then move it into place
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temp_folders(output)
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(output), dir=parent)
    with open(os.path.join(tmp, LOCK_FILE), "w", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()}\n")
    restore_signals = _interrupt_on_termination()
    try:
        model_dir = os.path.join(tmp, "model")
        os.makedirs(model_dir)
        logger.info(
            "converting %d tensors into %d shard(s) (%s language model, float32 VQGAN)",
            len(plan), len(shards), _dtype_name(out_dtype) if out_dtype else "source-dtype",
        )
        _write_weights(model_dir, shards, vq_state, progress)
        config.save_pretrained(model_dir)
        _generation_config(config).save_pretrained(model_dir)
        processor.save_pretrained(os.path.join(tmp, "processor"))
        with open(os.path.join(tmp, "model_index.json"), "w", encoding="utf-8") as f:
            json.dump(_model_index(), f, indent=2, sort_keys=True)
            f.write("\n")
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(_model_card(source, base_model, config, int(target_size), output))
        os.remove(os.path.join(tmp, LOCK_FILE))
        os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes it private; the output gets normal permissions
        _install(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        restore_signals()
    logger.info("converted %s -> %s", source, output)
    return output


__all__ = ["convert_checkpoint", "parse_size", "load_tokenizer", "read_vqgan_yaml", "load_vqgan_state_dict"]

