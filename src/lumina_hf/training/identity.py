"""What a tokenized dataset was made from, and the checks that use it.

A tokenization is identified by the VQGAN's encoding weights (a SHA-256 over the encoder, quant_conv and codebook
tensors), the tokenizer (a SHA-256 over its
full definition), the image processor's settings, the arguments, and every source file (size and modification time):
- `lumina-hf tokenize` refuses to resume or reuse output made from anything else, and says what differs;
- the tokenizer and VQGAN digests are stored in the dataset's metadata (`DatasetInfo.description`, which
  `save_to_disk` / `load_from_disk` keep), and training refuses a dataset whose digests are not its model's (image codes
  and text ids would mean something else) unless told `allow_mismatch`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

METADATA_KEY = "lumina_hf_tokenization"
ENCODER_PREFIXES = ("encoder.", "quant_conv.", "quantize.")  # the VQGAN's pixels -> codes path


# ------------------------------------------------------------------------------------------------ digests
def state_dict_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes and values of a state dict (floating tensors as float32, so a bf16 copy of
    fp32 weights upcast back gives the same digest)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        if t.is_floating_point():
            t = t.to(torch.float32)
        t = t.cpu().contiguous()
        h.update(f"{name}:{str(t.dtype)}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def vq_identity(vq_model: Any) -> dict:
    """`{"sha256": ..., "tensors": n}` of the encoding weights of the VQGAN of `vq_model` (a Lumina-mGPT model, a
    `VQImageEncoder`, or any encoder exposing its VQGAN as `vqmodel` or its weights as `state_dict()`)."""
    from .vq import vq_module

    module = vq_module(vq_model)
    state = module.state_dict() if module is not None else None
    if state is None and callable(getattr(vq_model, "state_dict", None)):
        state = vq_model.state_dict()
    if not state:
        raise ValueError(
            f"cannot identify the VQGAN of {type(vq_model).__name__}: give a model with its VQGAN as `vqmodel` (or a "
            "`state_dict()`), so that a resumed or reused tokenization can be checked against it."
        )
    # only what turns pixels into codes: the decoder does not change a tokenization (and a shipped model may store
    # it in bf16 while the tokenizing copy was fp32)
    encoding = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
    state = encoding or state
    return {"sha256": state_dict_digest(state), "tensors": len(state)}


def folder_vq_sha256(path: str) -> str | None:
    """`vq_identity(...)["sha256"]` of the model in a local folder (a model folder, or a pipeline folder's `model/`),
    read from its safetensors without loading the model; None when there is no such folder or VQGAN."""
    from safetensors import safe_open

    from .vq import _safetensors_files

    folder = os.fspath(path)
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        folder = os.path.join(folder, "model")
    files = _safetensors_files(folder) if os.path.isdir(folder) else None
    if not files:
        return None
    state = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                name = key.split("vqmodel.", 1)[1] if "vqmodel." in key else None
                if name is not None and name.startswith(ENCODER_PREFIXES):
                    state[name] = f.get_tensor(key)
    return state_dict_digest(state) if state else None


def model_vq_sha256(model_name_or_path: str, seed: int = 0) -> str | None:
    """The VQGAN digest of the model a recipe trains, before its weights load: a local folder's safetensors, or the
    random tiny model (`tiny-random`) of `seed`; None for a Hub id (not read before the model loads)."""
    if model_name_or_path == "tiny-random":
        from ..testing_utils import build_tiny_model

        return vq_identity(build_tiny_model(seed=seed))["sha256"]
    return folder_vq_sha256(model_name_or_path) if os.path.isdir(model_name_or_path) else None


def tokenizer_digest(tokenizer) -> str:
    """SHA-256 of a tokenizer's definition: the `tokenizers` JSON of a fast tokenizer (its call-time padding and
    truncation settings left out), else the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        data = json.loads(backend.to_str())
        data.pop("padding", None)
        data.pop("truncation", None)
        text = json.dumps(data, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def processor_identity(processor) -> dict:
    """The processor's part of a tokenization: tokenizer digest, image processor settings, layout token names."""
    ip = processor.image_processor.to_dict()
    ip.pop("processor_class", None)
    return {
        "tokenizer_sha256": tokenizer_digest(processor.tokenizer),
        "image_processor": ip,
        "token_ids": dict(sorted(processor._ids.items())),
        "chat_template_sha256": hashlib.sha256(processor._template().encode()).hexdigest(),
    }


# ------------------------------------------------------------------------------------------------ source files
def file_stats(paths: Iterable[str]) -> dict[str, list[int] | None]:
    """path -> `[size, mtime_ns]` (None for a file that does not exist)."""
    out: dict[str, list[int] | None] = {}
    for p in paths:
        if p in out:
            continue
        try:
            st = os.stat(p)
            out[p] = [st.st_size, st.st_mtime_ns]
        except OSError:
            out[p] = None
    return out


def stats_digest(stats: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(sorted(stats.items())).encode()).hexdigest()


def source_files(source) -> list[str]:
    """The local files a source is read from: its data files (metadata, JSON, arrow, parquet) and every image it
    refers to by path."""
    files: list[str] = []
    if source.kind == "imagefolder":
        from .sources import metadata_files

        files += metadata_files(source.path)
    elif source.kind == "json":
        files.append(os.path.abspath(source.path))
    elif source.kind == "stream" and source.path and os.path.isdir(source.path):
        for root, dirs, names in os.walk(source.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    if not source.streamed:
        files += [f["filename"] for f in getattr(source.ds, "cache_files", []) if source.kind == "dataset"]
        for ref, base in source.image_refs():
            if isinstance(ref, dict):
                ref = None if ref.get("bytes") else ref.get("path")
            if isinstance(ref, (str, os.PathLike)) and "://" not in os.fspath(ref):
                p = os.fspath(ref)
                files.append(os.path.normpath(os.path.join(base, p) if base and not os.path.isabs(p) else p))
    return files


def diff_stats(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 5) -> str:
    """A short description of how two file tables differ ('' when they are equal)."""
    changed = [p for p in new if p in old and old[p] != new[p]]
    added = [p for p in new if p not in old]
    removed = [p for p in old if p not in new]
    parts = []
    for what, names in (("changed", changed), ("new", added), ("gone", removed)):
        if names:
            shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
            parts.append(f"{len(names)} {what} ({shown})")
    return "; ".join(parts)


def write_stats(path: str, stats: Mapping[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(stats, f)
    os.replace(tmp, path)


def read_stats(path: str) -> dict | None:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def config_differences(stored: Mapping[str, Any] | None, current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The keys (dotted) whose values differ between two configs."""
    stored = stored or {}
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def explain_differences(keys: list[str]) -> str:
    """Readable names for the differing config keys."""
    names = {
        "vq_model.sha256": "the VQGAN weights (another --model)",
        "processor.tokenizer_sha256": "the tokenizer",
        "source.files_sha256": "the source files",
    }
    return ", ".join(names.get(k, k) for k in keys)


# ------------------------------------------------------------------------------------------------ dataset metadata
def dataset_identity(config: Mapping[str, Any]) -> dict:
    """What the tokenized dataset's metadata records of its tokenization."""
    return {
        "tokenizer_sha256": config["processor"]["tokenizer_sha256"],
        "vqgan_sha256": config["vq_model"]["sha256"],
        "target_size": config["target_size"],
        "format_version": config["format_version"],
    }


def describe_dataset(identity: Mapping[str, Any]) -> str:
    """`DatasetInfo.description` of a tokenized dataset: a JSON object holding its tokenization identity."""
    return json.dumps({METADATA_KEY: dict(identity)}, sort_keys=True)


def read_dataset_identity(ds) -> dict | None:
    """The tokenization identity stored in a dataset's metadata, or None."""
    text = getattr(getattr(ds, "info", None), "description", None) or ""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data.get(METADATA_KEY) if isinstance(data, dict) else None


def check_dataset_identity(ds, vqgan_sha256: str | None, processor, where: str, allow_mismatch: bool = False) -> None:
    """Refuse (ValueError) a tokenized dataset whose tokenizer or VQGAN digest is not the training model's
    (`vqgan_sha256`: `vq_identity(model)["sha256"]`, None when unknown: only the tokenizer is compared), unless
    `allow_mismatch`; a dataset without a recorded identity is accepted with a log line."""
    stored = read_dataset_identity(ds)
    if stored is None:
        logger.info("%s: no tokenization identity in its metadata (not written by `lumina-hf tokenize`): not checked.", where)
        return
    current = {"tokenizer_sha256": tokenizer_digest(processor.tokenizer)}
    if vqgan_sha256 is not None:
        current["vqgan_sha256"] = vqgan_sha256
    else:
        logger.info("%s: the model's VQGAN is not read before it loads (a Hub id): only the tokenizer is checked.", where)
    differs = [k for k in current if stored.get(k) != current[k]]
    if not differs:
        return
    what = " and ".join("tokenizer" if k.startswith("tokenizer") else "VQGAN weights" for k in differs)
    message = (
        f"{where} was tokenized with another {what} than this model's ({', '.join(f'{k} {stored.get(k)!s:.12} vs {current[k]:.12}' for k in differs)}): "
        "its text ids and image codes mean something else to this model. Re-tokenize it with `lumina-hf tokenize "
        "--model <this model>`, or set `allow_mismatch: true` in the recipe (--allow_mismatch) if you know they agree."
    )
    if not allow_mismatch:
        raise ValueError(message)
    logger.warning("%s (allowed by allow_mismatch)", message)


__all__ = [
    "METADATA_KEY",
    "check_dataset_identity",
    "config_differences",
    "dataset_identity",
    "describe_dataset",
    "diff_stats",
    "file_stats",
    "folder_vq_sha256",
    "model_vq_sha256",
    "processor_identity",
    "read_dataset_identity",
    "source_files",
    "state_dict_digest",
    "stats_digest",
    "tokenizer_digest",
    "vq_identity",
]
