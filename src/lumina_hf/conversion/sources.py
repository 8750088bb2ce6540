"""Reading a published Lumina-mGPT checkpoint, Meta's VQGAN and a tokenizer, checked, without loading the weights."""


from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..configuration_lumina_mgpt import LuminaMGPTConfig, taming_to_vq_config_dict
from ..unirep import parse_image_code_token_name

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
VQ_PREFIX = "model.vqmodel."
# Top-level modules of taming's VQModel that the VQGAN keeps; everything else in vqgan.ckpt (`loss.*`, the
# discriminator, LPIPS) is training-only.
VQ_MODULES = ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")
# The reference sampling defaults (guidance 4, image top-k 2000, text top-k 10, temperature 1), stored in
# generation_config.json.
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


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported: use one of {', '.join(DTYPES)} or 'auto'.")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported: use one of {', '.join(DTYPES)} or 'auto'.")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not name.startswith((".", "/", "~"))


def resolve_checkpoint(checkpoint: str | os.PathLike, revision: str | None) -> str:
    """A local folder, else a Hub id fetched with `snapshot_download` (config, safetensors, tokenizer)."""
    path = os.path.expanduser(os.fspath(checkpoint))
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.exists(path):
        raise ValueError(f"--checkpoint {path} is a file: give the folder that holds config.json and the safetensors shards.")
    if not looks_like_hub_id(path):
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
class TensorInfo:
    file: str  # absolute path of the safetensors file
    shape: tuple[int, ...]
    dtype: torch.dtype


def index_checkpoint_tensors(ckpt_dir: str) -> dict[str, TensorInfo]:
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
    out: dict[str, TensorInfo] = {}
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
                    out[key] = TensorInfo(path, tuple(sl.get_shape()), _ST_DTYPES[st_dtype])
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


def tokenizer_json_candidates(ckpt_dir: str, vqgan_dir: str) -> list[str]:
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

