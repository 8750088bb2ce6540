"""Which files of a lumina_hf folder are published: its kind, its completeness, and the per-kind allow-list.

Three kinds of folder are published (`detect_folder_kind`):

- ``"pipeline"``: what `LuminaMGPTPipeline.save_pretrained`, `lumina-hf convert` and `lumina-hf train` write:
  `model_index.json`, `model/` (config, generation config, safetensors weights), `processor/` (tokenizer and
  image processor);
- ``"model"``: `model.save_pretrained(d)` + `processor.save_pretrained(d)` in one folder (`config.json` with
  `model_type: "lumina_mgpt"`);
- ``"adapter"``: a PEFT LoRA adapter of a lumina_hf model (`adapter_config.json` + `adapter_model.safetensors`,
  and the processor when the trainer saved it alongside).

Only the files a folder of its kind needs are uploaded: those above (the weights the index names, the known
processor and tokenizer files) plus the training records the card reads (`trainer_state.json`,
`all_results.json` / `train_results.json`, the recipe copy `training_recipe.yaml` / `recipe.yaml`). Anything
else is left out with the reason, unless an `include` pattern names it. Training leftovers (`checkpoint-*/`,
logs, pickles) and hidden files are never uploaded, included or not. A symbolic link that leads out of the
folder is never followed: one where a needed or included file should be is refused, any other is left out.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import posixpath
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from .errors import PublishInputError
from .options import looks_like_hub_id
from .records import RECIPE_FILES, RESULT_FILES, STATE_FILE, TrainingDetails, latest_checkpoint_file, read_training_details

logger = logging.getLogger(__name__)

KINDS = ("pipeline", "model", "adapter")
# What `ProcessorMixin.save_pretrained` writes for our processor (tokenizer + image processor), and the files a
# transformers tokenizer may add (special tokens, added tokens, chat templates).
PROCESSOR_FILES = (
    "processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "additional_chat_templates/*.jinja",
)
MODEL_FILES = ("config.json", "generation_config.json")
RECORD_FILES = (STATE_FILE, *RESULT_FILES, *RECIPE_FILES)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Never uploaded, even when an include pattern names them: training leftovers, pickles, caches, logs, hidden files.
NEVER_DIRS = ("checkpoint-*", "global_step*", ".*", "__pycache__", "runs", "wandb", "logs")
NEVER_FILES = (".*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.lock", "*.log", "*tfevents*", "*.tmp")


@dataclass
class FolderInfo:
    """What `inspect_folder` found. Paths are local and never published."""

    folder: Path
    kind: str
    files: list[str]  # relative POSIX paths to upload (the folder's README.md excluded: the card replaces it)
    skipped: list[str]  # relative paths left out (a folder as "name/"); the reasons are in `left_out`
    model_config: dict[str, Any]
    adapter_config: dict[str, Any] | None = None
    target_size: int | None = None
    has_processor: bool = False
    has_vqgan: bool | None = None
    num_parameters: int | None = None
    weight_dtypes: list[str] = field(default_factory=list)
    base_model_local: Path | None = None  # an adapter's base when it is a local folder
    base_layout: str | None = None  # "pipeline" or "model": layout of an adapter's base, when known
    base_model_hint: str | None = None  # a Hub id named in the folder (adapter config, README front matter)
    training: TrainingDetails | None = None
    weights: list[str] = field(default_factory=list)  # the safetensors files among `files`
    left_out: dict[str, str] = field(default_factory=dict)  # path -> why it is not uploaded
    included: list[str] = field(default_factory=list)  # files uploaded because an include pattern named them
    generation_config: dict[str, Any] | None = None  # the model's (or an adapter's local base's) sampling defaults
    codebook_shape: list[int] | None = None  # the VQGAN codebook's shape in the weights


# ------------------------------------------------------------------------------------------ reading
def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as err:
        raise PublishInputError(f"{what} cannot be read ({err.strerror}).") from None
    except ValueError as err:
        raise PublishInputError(f"{what} is not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise PublishInputError(f"{what} does not hold a JSON object.")
    return data


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype/shape/offsets, plus `__metadata__`),
    checking that the file is complete. Raises `PublishInputError` for a truncated or foreign file.

    Read by hand rather than with `safetensors.safe_open`: the secret scan needs the header exactly as stored
    (every entry and the metadata), and a truncated file must be named with the sizes involved."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or 8 + n > size or n > 100_000_000:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except OSError as err:
        raise PublishInputError(f"weights file {path.name} cannot be read ({err.strerror}).") from None
    except ValueError as err:
        raise PublishInputError(f"weights file {path.name} is not a complete safetensors file ({err}).") from None
    if not isinstance(header, dict):
        raise PublishInputError(f"weights file {path.name} is not a safetensors file (its header is not a JSON object).")
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(meta["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise PublishInputError(f"weights file {path.name} has a malformed header entry {name!r}.") from None
    if 8 + n + end > size:
        raise PublishInputError(
            f"weights file {path.name} is truncated ({size} bytes, its header describes {8 + n + end}): "
            "the save or copy did not finish."
        )
    return header


def _summarize_weights(folder: Path, files: list[str]) -> tuple[int, list[str], dict[str, list[int]]]:
    """(parameter count, dtypes, tensor name -> shape) over safetensors files."""
    count, dtypes, shapes = 0, set(), {}
    for name in files:
        for key, meta in read_safetensors_header(folder / name).items():
            if key == "__metadata__":
                continue
            shape = [int(s) for s in meta.get("shape", [])]
            shapes[key] = shape
            dtypes.add(str(meta.get("dtype")))
            count += math.prod(shape)
    return count, sorted(dtypes), shapes


def _model_weight_files(folder: Path, label: str) -> list[str]:
    """Safetensors weights of a transformers model folder (single file or index + shards), all present."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, f"{label}model.safetensors.index.json").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PublishInputError(f"{label}model.safetensors.index.json has no weight_map.")
        shards = sorted({str(s) for s in weight_map.values()})
        odd = [s for s in shards if s != posixpath.basename(s) or s in (".", "..") or "\\" in s or not s.endswith(".safetensors")]
        if odd:
            raise PublishInputError(
                f"{label}model.safetensors.index.json names shards that are not safetensors files next to it "
                f"({', '.join(repr(s) for s in odd[:3])}): re-save the model with `save_pretrained`."
            )
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise PublishInputError(
                f"{label}model.safetensors.index.json names {len(shards)} shard(s) but {len(missing)} are missing: "
                f"{', '.join(label + m for m in missing[:5])}{' ...' if len(missing) > 5 else ''}. Copy the complete model."
            )
        return ["model.safetensors.index.json", *shards]
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickled:
        raise PublishInputError(
            f"{label or 'the folder'} has only pickled weights ({', '.join(pickled)}): lumina_hf publishes safetensors; "
            "re-save with `save_pretrained` (safe serialization)."
        )
    raise PublishInputError(
        f"no model weights in {label or 'the folder'}: expected model.safetensors or model.safetensors.index.json "
        "with its shards."
    )


def _check_model_dir(folder: Path, label: str) -> tuple[dict[str, Any], list[str]]:
    """(config, weight files including the index) of a model folder; `PublishInputError` if it is not ours."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise PublishInputError(f"{label or 'the folder'} has no config.json.")
    config = _read_json(cfg_path, f"{label}config.json")
    model_type = config.get("model_type")
    if model_type != "lumina_mgpt":
        hint = (
            " It looks like an unconverted Alpha-VLLM checkpoint: convert it first with `lumina-hf convert`."
            if model_type == "chameleon"
            else ""
        )
        raise PublishInputError(
            f"{label}config.json has model_type {model_type!r}, not 'lumina_mgpt': not a lumina_hf model.{hint}"
        )
    return config, _model_weight_files(folder, label)


def _processor_target_size(folder: Path) -> tuple[bool, int | None]:
    """(processor files present, image-processor target size)."""
    has_tok = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    target = None
    for name in ("processor_config.json", "preprocessor_config.json"):
        p = folder / name
        if p.is_file():
            data = _read_json(p, name)
            ip = data.get("image_processor", data)
            if isinstance(ip, dict) and isinstance(ip.get("target_size"), int):
                target = ip["target_size"]
                break
    return (folder / "processor_config.json").is_file() and has_tok, target


def _generation_config(folder: Path) -> dict[str, Any] | None:
    """The sampling defaults the model loads from `folder/generation_config.json`, as transformers reads them
    (`GenerationConfig.from_pretrained`: a config marked as derived from the model config drops extra keys)."""
    if not (folder / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(folder)).to_dict()
    except (OSError, ValueError) as err:
        raise PublishInputError(f"generation_config.json cannot be loaded: {type(err).__name__}") from None


def _readme_metadata(folder: Path) -> dict[str, Any]:
    path = folder / "README.md"
    if not path.is_file() or not _inside(folder, path):
        return {}
    try:
        return ModelCard.load(path).data.to_dict()
    except Exception:  # a README without (valid) front matter is only a hint source
        return {}


# ------------------------------------------------------------------------------------------ listing
def _inside(root: Path, path: Path) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def _match_exact_dir(rel: str, pattern: str) -> bool:
    """`pattern` names files of one folder: the folder must be the same, the name matches with fnmatch."""
    return posixpath.dirname(rel) == posixpath.dirname(pattern) and fnmatch.fnmatchcase(
        posixpath.basename(rel), posixpath.basename(pattern)
    )


def include_matches(rel: str, pattern: str) -> bool:
    """An include pattern names `rel`: a glob on the whole relative path (`*` crosses folders), or a folder
    (`notes` or `notes/`) holding it."""
    p = pattern.strip()
    p = p[2:] if p.startswith("./") else p
    if fnmatch.fnmatchcase(rel, p):
        return True
    prefix = p.rstrip("/")
    return bool(prefix) and rel.startswith(prefix + "/")


def _static_allow_list(kind: str) -> list[str]:
    """Patterns of every file a folder of `kind` may need (before its weights index is read)."""
    records = list(RECORD_FILES)
    if kind == "pipeline":
        return ["model_index.json", *(f"model/{f}" for f in MODEL_FILES), "model/*.safetensors",
                "model/model.safetensors.index.json", *(f"processor/{f}" for f in PROCESSOR_FILES), *records]
    if kind == "model":
        return [*MODEL_FILES, "*.safetensors", "model.safetensors.index.json", *PROCESSOR_FILES, *records]
    return [*ADAPTER_FILES, *PROCESSOR_FILES, *records]


@dataclass
class _Listing:
    files: list[str]
    outside: list[str]  # symbolic links (to files or folders) that resolve outside the folder
    never: dict[str, str]  # never-published paths (folders as "name/") -> why


def _list_folder(root: Path, descend_all: bool, relevant_dirs: set[str], unneeded: str) -> _Listing:
    """Every file under `root`, without following links out of it (nor into a folder twice). Folders that can
    hold nothing to upload are reported whole instead of being walked, unless `descend_all`."""
    files, outside, never = [], [], {}
    seen = {os.path.realpath(root)}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            entries = sorted(os.scandir(root / rel_dir), key=lambda e: e.name)
        except OSError as err:
            raise PublishInputError(f"cannot list {rel_dir or 'the folder'} ({err.strerror}).") from None
        for entry in entries:
            rel = posixpath.join(rel_dir, entry.name) if rel_dir else entry.name
            if entry.is_symlink() and not _inside(root, Path(entry.path)):
                outside.append(rel)
                continue
            if entry.is_dir():
                if any(fnmatch.fnmatchcase(entry.name, p) for p in NEVER_DIRS):
                    never[rel + "/"] = "training leftovers, logs or hidden files: never published"
                    continue
                real = os.path.realpath(entry.path)
                if real in seen:
                    continue
                if not descend_all and rel not in relevant_dirs:
                    never[rel + "/"] = unneeded
                    continue
                seen.add(real)
                stack.append(rel)
            elif entry.is_file():
                files.append(rel)
            else:
                never[rel] = "not a regular file"
    return _Listing(sorted(files), sorted(outside), never)


def _refuse_outside_links(listing: _Listing, patterns: list[str], include: list[str]) -> None:
    for rel in listing.outside:
        needed = any(_match_exact_dir(rel, p) or p.startswith(rel + "/") for p in patterns)
        if needed or any(include_matches(rel, p) for p in include):
            raise PublishInputError(
                f"{rel} is a symbolic link that leads outside the folder: links out of a published folder are "
                "never followed. Copy the file into the folder (or remove the link) and push again."
            )


# ------------------------------------------------------------------------------------------ kinds
def detect_folder_kind(folder: str | os.PathLike) -> str:
    """"pipeline", "model" or "adapter" from the folder's marker files (no deeper checks: see `inspect_folder`)."""
    path = Path(folder)
    if not path.is_dir():
        raise PublishInputError(f"{os.fspath(folder)} is not a folder.")
    if (path / "model_index.json").is_file():
        return "pipeline"
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "model"
    raise PublishInputError(
        f"{os.fspath(folder)} is not a lumina_hf folder: expected model_index.json (pipeline), config.json with "
        "model_type 'lumina_mgpt' (model) or adapter_config.json (PEFT adapter)."
    )


def _describe_weights(info: FolderInfo, folder: Path, weights: list[str], prefix: str) -> None:
    info.weights += [prefix + w for w in weights if w.endswith(".safetensors")]
    shards = [w for w in weights if w.endswith(".safetensors")]
    info.num_parameters, info.weight_dtypes, shapes = _summarize_weights(folder, shards)
    info.has_vqgan = any(".vqmodel." in f".{n}" for n in shapes)
    codebook = [s for n, s in shapes.items() if n.endswith("vqmodel.quantize.embedding.weight")]
    info.codebook_shape = codebook[0] if codebook else None


def _inspect_pipeline(path: Path, info: FolderInfo) -> list[str]:
    index = _read_json(path / "model_index.json", "model_index.json")
    cls = index.get("_class_name")
    if cls != "LuminaMGPTPipeline":
        raise PublishInputError(f"model_index.json is for {cls!r}, not LuminaMGPTPipeline: not a lumina_hf pipeline.")
    for comp in ("model", "processor"):
        if not isinstance(index.get(comp), list) or not (path / comp).is_dir():
            raise PublishInputError(f"the pipeline folder has no '{comp}' component (model_index.json + {comp}/).")
    info.model_config, weights = _check_model_dir(path / "model", "model/")
    _describe_weights(info, path / "model", weights, "model/")
    info.generation_config = _generation_config(path / "model")
    info.has_processor, info.target_size = _processor_target_size(path / "processor")
    if not info.has_processor:
        raise PublishInputError("processor/ lacks processor_config.json or the tokenizer files: re-save the pipeline.")
    return ["model_index.json", *(f"model/{f}" for f in (*MODEL_FILES, *weights)), *(f"processor/{f}" for f in PROCESSOR_FILES)]


def _inspect_model(path: Path, info: FolderInfo) -> list[str]:
    info.model_config, weights = _check_model_dir(path, "")
    _describe_weights(info, path, weights, "")
    info.generation_config = _generation_config(path)
    info.has_processor, info.target_size = _processor_target_size(path)
    if not info.has_processor:
        raise PublishInputError(
            "the model folder has no processor (processor_config.json + tokenizer files): save the processor next "
            "to the model (`processor.save_pretrained(folder)`), otherwise the published model cannot be used."
        )
    return [*MODEL_FILES, *weights, *PROCESSOR_FILES]


def _inspect_adapter(path: Path, info: FolderInfo) -> list[str]:
    cfg = _read_json(path / "adapter_config.json", "adapter_config.json")
    info.adapter_config = cfg
    if not cfg.get("peft_type"):
        raise PublishInputError("adapter_config.json has no peft_type: not a PEFT adapter.")
    if not (path / "adapter_model.safetensors").is_file():
        pickled = (path / "adapter_model.bin").is_file()
        raise PublishInputError(
            "the adapter folder has no adapter_model.safetensors"
            + (" (only a pickled adapter_model.bin: re-save with safe serialization)." if pickled else ": the adapter weights are missing.")
        )
    info.weights = ["adapter_model.safetensors"]
    info.num_parameters, info.weight_dtypes, _ = _summarize_weights(path, ["adapter_model.safetensors"])
    base = cfg.get("base_model_name_or_path")
    parent = str((cfg.get("auto_mapping") or {}).get("parent_library") or "")
    if isinstance(base, str) and base and os.path.isdir(os.path.expanduser(base)):
        base_path = Path(os.path.expanduser(base)).resolve()
        info.base_model_local = base_path
        try:
            base_kind = detect_folder_kind(base_path)
            model_dir, proc_dir = (base_path / "model", base_path / "processor") if base_kind == "pipeline" else (base_path, base_path)
            info.model_config = _read_json(model_dir / "config.json", "the base model's config.json")
            info.base_layout = "pipeline" if base_kind == "pipeline" else "model"
            info.generation_config = _generation_config(model_dir)
            _, base_target = _processor_target_size(proc_dir)
            info.target_size = info.target_size or base_target
        except PublishInputError as err:
            reason = str(err).replace(str(base_path), base_path.name)  # no local path in the log
            logger.warning("The adapter's local base model could not be read (%s); describing the adapter without it.", reason)
    elif looks_like_hub_id(base):
        info.base_model_hint = base
    is_lumina = parent.startswith("lumina_hf") or info.model_config.get("model_type") == "lumina_mgpt"
    if not is_lumina:
        raise PublishInputError(
            "adapter_config.json does not belong to a lumina_hf model (auto_mapping.parent_library is "
            f"{parent or 'absent'!r} and its base model is not a local lumina_hf folder)."
        )
    own_proc, own_target = _processor_target_size(path)
    info.has_processor = own_proc
    info.target_size = own_target or info.target_size
    return [*ADAPTER_FILES, *PROCESSOR_FILES]


def inspect_folder(folder: str | os.PathLike, include: list[str] | None = None) -> FolderInfo:
    """Detect the kind of `folder`, check that it is complete, and decide which files go up: those its kind
    needs, plus the files `include` patterns name. Raises `PublishInputError` (nothing is read through a link
    that leads out of the folder)."""
    include = list(include or [])
    kind = detect_folder_kind(folder)
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(folder))))
    patterns = _static_allow_list(kind)
    relevant = {posixpath.dirname(p) for p in patterns if "/" in p}
    relevant |= {posixpath.dirname(d) for d in relevant if "/" in d}
    unneeded = f"not a file a {kind} folder needs; --include PATTERN uploads it"
    listing = _list_folder(path, descend_all=bool(include), relevant_dirs=relevant, unneeded=unneeded)
    _refuse_outside_links(listing, patterns, include)

    info = FolderInfo(folder=path, kind=kind, files=[], skipped=[], model_config={})
    needed = {"pipeline": _inspect_pipeline, "model": _inspect_model, "adapter": _inspect_adapter}[kind](path, info)
    needed += list(RECORD_FILES)
    left_out = dict(listing.never)
    for rel in listing.outside:
        left_out[rel] = "a symbolic link leading outside the folder: never followed"
    uploads = []
    for rel in listing.files:
        name = posixpath.basename(rel)
        if rel == "README.md":
            continue  # replaced by the rendered card
        if any(fnmatch.fnmatchcase(name, p) for p in NEVER_FILES):
            left_out[rel] = "pickles, logs, locks and hidden files are never published"
        elif any(_match_exact_dir(rel, p) for p in needed):
            uploads.append(rel)
        elif any(include_matches(rel, p) for p in include):
            uploads.append(rel)
            info.included.append(rel)
        elif name == "README.md":
            left_out[rel] = "a nested README (the card replaces the folder's own)"
        else:
            left_out[rel] = unneeded
    unmatched = [p for p in include if not any(include_matches(rel, p) for rel in uploads)]
    if unmatched:
        raise PublishInputError(
            f"include pattern(s) {', '.join(repr(p) for p in unmatched)} name no file that can be published "
            "(patterns match paths inside the folder, e.g. 'notes/*.txt'; hidden files, pickles, logs and "
            "checkpoint-*/ folders are never published)."
        )
    info.files = sorted(uploads)
    info.left_out = dict(sorted(left_out.items()))
    info.skipped = list(info.left_out)
    readme = _readme_metadata(path)
    hint = readme.get("base_model")
    if info.base_model_hint is None and looks_like_hub_id(hint):
        info.base_model_hint = hint
    info.training = read_training_details(path)
    if info.training is None and kind == "adapter" and latest_checkpoint_file(path.parent, STATE_FILE):
        # `lumina-hf train` writes a LoRA run's adapter to `output_dir/adapter/`, its records to `output_dir`
        info.training = read_training_details(path.parent)
    return info


__all__ = ["KINDS", "PROCESSOR_FILES", "FolderInfo", "detect_folder_kind", "include_matches", "inspect_folder", "read_safetensors_header"]
