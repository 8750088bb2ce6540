"""Publishing lumina_hf folders to the Hugging Face Hub: model cards and `lumina-hf push`.

Three kinds of folder are published (`detect_folder_kind`):

- ``"pipeline"``: what `LuminaMGPTPipeline.save_pretrained` (and `lumina-hf convert`) writes:
  `model_index.json`, `model/` (config + safetensors), `processor/` (tokenizer + image processor);
- ``"model"``: `model.save_pretrained(d)` + `processor.save_pretrained(d)` in one folder (`config.json` with
  `model_type: "lumina_mgpt"`);
- ``"adapter"``: a PEFT LoRA adapter of a lumina_hf model (`adapter_config.json` + `adapter_model.safetensors`).

The card is rendered from the templates in `lumina_hf/model_cards/` (Markdown + Jinja, shipped as package
data) with huggingface_hub's `ModelCard.from_template` / `ModelCardData`. Three card types: ``"base"`` (a
converted published checkpoint), ``"finetune"`` (a pipeline or model folder with training records: a full
fine-tune or a merged LoRA) and ``"adapter"``.

Publishing (`push_to_hub_folder`) checks everything before the first request: the repo id, the folder (kind,
weights complete, processor present), the adapter's base model, the token, the card metadata, and that no
file to upload holds the token or a local path (configs are scrubbed: `_name_or_path`,
`base_model_name_or_path`, output folders...). Training leftovers are never uploaded (`checkpoint-*/`,
optimizer states, pickles, logs). Then it creates the repo (`exist_ok=True`) and makes two commits: the files
(plus the optional `samples/grid.png`), then `README.md` last, so a failed upload never leaves a card that
describes weights that are not there. A failure raises `PushError`, which says which commits went through
and which files were not committed. With `create_pr=True` both commits go to one pull request.

The trainer's `push_to_hub=True` calls `push_to_hub_folder(output_dir, repo_id, ...)` (same checks, same card;
`trainer_state.json`, `all_results.json` / `train_results.json` and a recipe YAML copy in the folder fill the
card's training section).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import json
import logging
import math
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .unirep import UniRepLayout

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- constants
# `lumina-hf`, not `diffusers` or `transformers`: neither library loads these folders without `import
# lumina_hf` (the pipeline class and the model classes live here), so the Hub's generated "use this model"
# snippet for those libraries would be wrong; the card's own snippet is the reference. Same name for the
# three kinds (the adapter's relation to its base is given by `base_model` + `adapter_config.json`).
LIBRARY_NAME = "lumina-hf"
KINDS = ("pipeline", "model", "adapter")
CARD_TYPES = ("base", "finetune", "adapter")
CHAMELEON_LICENSE = {
    "license": "other",
    "license_name": "chameleon-research-license",
    "license_link": "https://ai.meta.com/resources/models-and-libraries/chameleon-license/",
}
# Recommended sampling (SPEC.md section 6); kept equal to the pipeline's defaults (a test checks it).
TEXT_TO_IMAGE_SAMPLING = {"guidance_scale": 4.0, "top_k": 2000, "temperature": 1.0}
OMNI_SAMPLING = {"guidance_scale": 1.0, "top_k": 200, "temperature": 1.0}
BASE_TAGS = ["lumina-mgpt", "lumina-hf", "chameleon", "autoregressive", "text-to-image"]
GRID_PATH = "samples/grid.png"
TEMPLATE_FILES = {"base": "base.md", "finetune": "finetune.md", "adapter": "adapter.md"}
EXAMPLE_PROMPT = "a photo of a red fox sitting in the snow, golden hour"

# Never uploaded: training leftovers, pickles, caches, logs, hidden files. The folder's own README.md is
# replaced by the rendered card.
_SKIP_DIRS = {".git", ".cache", ".huggingface", "__pycache__", "runs", "wandb", "logs", ".ipynb_checkpoints"}
_SKIP_DIR_PATTERNS = ("checkpoint-*", "global_step*", ".*")
_SKIP_FILE_PATTERNS = (
    ".*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.lock", "*.log", "*tfevents*", "*.tmp",
)
_TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".txt", ".md", ".jinja", ".py", ".cfg", ".toml", ".csv", ".tsv"}
# Vocabulary files: their strings are tokens, never scrubbed (only checked).
_VOCAB_FILES = {"tokenizer.json", "vocab.json", "merges.txt", "text_tokenizer.json"}
_SECRET_KEYS = {"hub_token", "push_to_hub_token", "token", "hf_token", "api_key", "wandb_api_key", "use_auth_token"}
_HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt", ".tsv", ".tar", ".zip")
_RECIPE_NAMES = ("recipe.yaml", "recipe.yml", "training_args.yaml", "training_args.yml", "config.yaml", "config.yml")
_RESULT_FILES = ("all_results.json", "train_results.json")


# ------------------------------------------------------------------------------------------ errors
class PublishInputError(ValueError):
    """Bad input found before anything was uploaded (repo id, folder, weights, token, card)."""


class PushError(RuntimeError):
    """An upload failed part-way. `committed` lists the commits that went through (each a `CommitRecord`),
    `not_committed` the paths in the repo that were not committed."""

    def __init__(self, message: str, committed: list[CommitRecord], not_committed: list[str]):
        super().__init__(message)
        self.committed = committed
        self.not_committed = not_committed


# ------------------------------------------------------------------------------------------ data
@dataclass
class TrainingDetails:
    """What a training run left in its output folder, for the card's training section."""

    global_step: int | None = None
    max_steps: int | None = None
    epochs: float | None = None
    learning_rate: float | None = None  # peak of the logged learning rates (or the recipe's)
    lr_scheduler: str | None = None
    final_loss: float | None = None
    train_loss: float | None = None
    batch_size: int | None = None
    num_examples: int | None = None
    method: str | None = None  # "LoRA" or "full fine-tuning"
    recipe_file: str | None = None
    recipe_yaml: str | None = None  # the recipe, scrubbed of local paths and secrets
    datasets: list[str] = field(default_factory=list)  # Hub dataset ids
    local_datasets: list[str] = field(default_factory=list)  # file names of local data
    base_model: str | None = None  # the recipe's model, when it is a Hub id

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) rows for the card's table, only for what is known."""
        out = []
        if self.method:
            out.append(("Method", self.method))
        if self.global_step is not None:
            steps = f"{self.global_step:,}"
            if self.max_steps and self.max_steps != self.global_step:
                steps += f" of {self.max_steps:,} planned"
            out.append(("Optimizer steps", steps))
        if self.epochs is not None:
            out.append(("Epochs", f"{self.epochs:g}"))
        if self.num_examples is not None:
            out.append(("Training examples", f"{self.num_examples:,}"))
        if self.batch_size is not None:
            out.append(("Batch size (per device)", str(self.batch_size)))
        if self.learning_rate is not None:
            lr = f"{self.learning_rate:.3g}"
            out.append(("Peak learning rate", lr + (f" ({self.lr_scheduler})" if self.lr_scheduler else "")))
        if self.train_loss is not None:
            out.append(("Mean training loss", f"{self.train_loss:.4f}"))
        if self.final_loss is not None:
            out.append(("Last logged loss", f"{self.final_loss:.4f}"))
        data = [f"[{d}](https://huggingface.co/datasets/{d})" for d in self.datasets] + [f"`{d}` (local)" for d in self.local_datasets]
        if data:
            out.append(("Data", ", ".join(data)))
        if self.recipe_file:
            out.append(("Recipe", f"`{self.recipe_file}`"))
        return out


@dataclass
class FolderInfo:
    """What `inspect_folder` found. Paths are local and never published."""

    folder: Path
    kind: str
    files: list[str]  # relative POSIX paths to upload (the folder's README.md excluded)
    skipped: list[str]  # relative paths left out (training leftovers, pickles, logs)
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


@dataclass
class SampleGrid:
    """Sample images generated at publish time."""

    png: bytes
    prompts: list[str]
    seed: int
    width: int
    height: int
    guidance_scale: float
    path_in_repo: str = GRID_PATH


@dataclass
class CommitRecord:
    message: str
    oid: str | None
    url: str | None
    files: list[str]


@dataclass
class PushPlan:
    """Everything `push_to_hub_folder` uploads, prepared (and checked) without any network access."""

    repo_id: str
    info: FolderInfo
    card_type: str
    card: ModelCard
    uploads: list[tuple[str, bytes | str]]  # (path in repo, bytes or local file path), README.md excluded
    samples: SampleGrid | None = None

    @property
    def files(self) -> list[str]:
        return [p for p, _ in self.uploads] + ["README.md"]


@dataclass
class PushResult:
    repo_id: str
    kind: str
    card_type: str
    commits: list[CommitRecord]
    pr_url: str | None
    files: list[str]


# ------------------------------------------------------------------------------------------ helpers
def validate_hub_repo_id(repo_id: str, what: str = "repo id") -> str:
    """`namespace/name`, checked with huggingface_hub's validator. Raises `PublishInputError`."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise PublishInputError(f"{what} {repo_id!r} must be 'namespace/name' (a user or organization, then the repo name).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PublishInputError(f"{what} {repo_id!r} is not a valid Hub repo id: {err}") from None
    return repo_id


def _looks_like_hub_id(value: Any) -> bool:
    if not isinstance(value, str) or value.count("/") != 1 or _looks_local(value):
        return False
    if value.lower().endswith(_DATA_SUFFIXES) or os.path.exists(os.path.expanduser(value)):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _looks_local(value: str, roots: tuple[str, ...] = ()) -> bool:
    """A string that names a file on this machine: an absolute POSIX path with at least two parts, a Windows
    drive path, `~/...`, or anything under one of `roots`."""
    if not value or "://" in value or any(c.isspace() for c in value):
        return False
    if any(value == r or value.startswith(r.rstrip("/\\") + sep) for r in roots for sep in ("/", "\\")):
        return True
    if value.startswith("~/") or re.match(r"^[A-Za-z]:[\\/]", value):
        return True
    return value.startswith("/") and value.count("/") >= 2 and len(value) > 3


def _local_basename(value: str) -> str:
    name = re.split(r"[\\/]", value.rstrip("/\\"))[-1]
    return name or "."


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise PublishInputError(f"{what} is not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise PublishInputError(f"{what} does not hold a JSON object.")
    return data


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype/shape/offsets, plus `__metadata__`),
    checking that the file is complete. Raises `PublishInputError` for a truncated or foreign file."""
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
    except (OSError, ValueError) as err:
        raise PublishInputError(f"weights file {path.name} is not a complete safetensors file ({err}).") from None
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


def _summarize_weights(folder: Path, files: list[str], label: str) -> tuple[int, list[str], list[str]]:
    """(parameter count, dtypes, tensor names) over safetensors files."""
    count, dtypes, names = 0, set(), []
    for name in files:
        header = read_safetensors_header(folder / name)
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            names.append(key)
            dtypes.add(str(meta.get("dtype")))
            count += math.prod(int(s) for s in meta.get("shape", []))
    return count, sorted(dtypes), names


def _model_weight_files(folder: Path, label: str) -> list[str]:
    """Safetensors weights of a transformers model folder (single file or index + shards), all present."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, f"{label}model.safetensors.index.json").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PublishInputError(f"{label}model.safetensors.index.json has no weight_map.")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise PublishInputError(
                f"{label}model.safetensors.index.json names {len(shards)} shard(s) but {len(missing)} are missing: "
                f"{', '.join(label + m for m in missing[:5])}{' ...' if len(missing) > 5 else ''}. Copy the complete model."
            )
        return shards
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
    proc = folder / "processor_config.json"
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
    return proc.is_file() and has_tok, target


def _readme_metadata(folder: Path) -> dict[str, Any]:
    path = folder / "README.md"
    if not path.is_file():
        return {}
    try:
        return ModelCard.load(path).data.to_dict()
    except Exception:  # a README without (valid) front matter is only a hint source
        return {}


def _list_upload_files(folder: Path) -> tuple[list[str], list[str]]:
    files, skipped = [], []
    for root, dirs, names in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        keep = []
        for d in sorted(dirs):
            if d in _SKIP_DIRS or any(fnmatch.fnmatch(d, p) for p in _SKIP_DIR_PATTERNS):
                skipped.append((rel_root / d).as_posix() + "/")
            else:
                keep.append(d)
        dirs[:] = keep
        for name in sorted(names):
            rel = (rel_root / name).as_posix()
            if name == "README.md":  # ours replaces the root one; nested ones are auto-generated boilerplate
                if rel != "README.md":
                    skipped.append(rel)
                continue
            if any(fnmatch.fnmatch(name, p) for p in _SKIP_FILE_PATTERNS):
                skipped.append(rel)
            else:
                files.append(rel)
    return sorted(files), sorted(skipped)


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


def _inspect_pipeline(path: Path, info: FolderInfo) -> None:
    index = _read_json(path / "model_index.json", "model_index.json")
    cls = index.get("_class_name")
    if cls != "LuminaMGPTPipeline":
        raise PublishInputError(f"model_index.json is for {cls!r}, not LuminaMGPTPipeline: not a lumina_hf pipeline.")
    for comp in ("model", "processor"):
        if not isinstance(index.get(comp), list) or not (path / comp).is_dir():
            raise PublishInputError(f"the pipeline folder has no '{comp}' component (model_index.json + {comp}/).")
    info.model_config, weights = _check_model_dir(path / "model", "model/")
    info.num_parameters, info.weight_dtypes, names = _summarize_weights(path / "model", weights, "model/")
    info.has_vqgan = any(".vqmodel." in f".{n}" for n in names)
    info.has_processor, info.target_size = _processor_target_size(path / "processor")
    if not info.has_processor:
        raise PublishInputError("processor/ lacks processor_config.json or the tokenizer files: re-save the pipeline.")


def _inspect_model(path: Path, info: FolderInfo) -> None:
    info.model_config, weights = _check_model_dir(path, "")
    info.num_parameters, info.weight_dtypes, names = _summarize_weights(path, weights, "")
    info.has_vqgan = any(".vqmodel." in f".{n}" for n in names)
    info.has_processor, info.target_size = _processor_target_size(path)
    if not info.has_processor:
        raise PublishInputError(
            "the model folder has no processor (processor_config.json + tokenizer files): save the processor next "
            "to the model (`processor.save_pretrained(folder)`), otherwise the published model cannot be used."
        )


def _inspect_adapter(path: Path, info: FolderInfo) -> None:
    cfg = _read_json(path / "adapter_config.json", "adapter_config.json")
    info.adapter_config = cfg
    if not cfg.get("peft_type"):
        raise PublishInputError("adapter_config.json has no peft_type: not a PEFT adapter.")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = (path / "adapter_model.bin").is_file()
        raise PublishInputError(
            "the adapter folder has no adapter_model.safetensors"
            + (" (only a pickled adapter_model.bin: re-save with safe serialization)." if pickled else ": the adapter weights are missing.")
        )
    info.num_parameters, info.weight_dtypes, _ = _summarize_weights(path, ["adapter_model.safetensors"], "")
    base = cfg.get("base_model_name_or_path")
    parent = str((cfg.get("auto_mapping") or {}).get("parent_library") or "")
    if isinstance(base, str) and base and os.path.isdir(os.path.expanduser(base)):
        base_path = Path(os.path.expanduser(base)).resolve()
        info.base_model_local = base_path
        try:
            base_kind = detect_folder_kind(base_path)
            if base_kind == "pipeline":
                info.model_config = _read_json(base_path / "model" / "config.json", "the base model's config.json")
                info.base_layout = "pipeline"
                _, base_target = _processor_target_size(base_path / "processor")
            else:
                info.model_config = _read_json(base_path / "config.json", "the base model's config.json")
                info.base_layout = "model"
                _, base_target = _processor_target_size(base_path)
            info.target_size = info.target_size or base_target
        except PublishInputError as err:
            logger.warning("The adapter's local base model could not be read (%s); describing the adapter without it.", err)
    elif _looks_like_hub_id(base):
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


def inspect_folder(folder: str | os.PathLike) -> FolderInfo:
    """Detect the kind of `folder` and check that it is complete. Raises `PublishInputError`."""
    kind = detect_folder_kind(folder)
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(folder))))
    files, skipped = _list_upload_files(path)
    info = FolderInfo(folder=path, kind=kind, files=files, skipped=skipped, model_config={})
    {"pipeline": _inspect_pipeline, "model": _inspect_model, "adapter": _inspect_adapter}[kind](path, info)
    readme = _readme_metadata(path)
    hint = readme.get("base_model")
    if info.base_model_hint is None and _looks_like_hub_id(hint):
        info.base_model_hint = hint
    info.training = read_training_details(path)
    if info.training is None and kind == "adapter" and _latest_checkpoint_file(path.parent, "trainer_state.json"):
        # `lumina-hf train` writes a LoRA run's adapter to `output_dir/adapter/`, its records to `output_dir`
        info.training = read_training_details(path.parent)
    return info


# ------------------------------------------------------------------------------------------ training records
def _find_key(obj: Any, names: tuple[str, ...]) -> Any:
    """The first value stored under one of `names` at any depth of a nested dict/list."""
    if isinstance(obj, dict):
        for n in names:
            if n in obj and obj[n] is not None:
                return obj[n]
        for v in obj.values():
            found = _find_key(v, names)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = _find_key(v, names)
            if found is not None:
                return found
    return None


def _dataset_names(recipe: dict[str, Any]) -> list[str]:
    keys = ("dataset_mixer", "dataset_mixture", "datasets", "dataset_name", "dataset", "dataset_id", "dataset_path",
            "train_dataset", "train_file", "train_files", "data_path", "data_files")
    out: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            for v in value:
                collect(v)
        elif isinstance(value, dict):
            ids = [value[k] for k in ("id", "path", "name", "dataset") if isinstance(value.get(k), str)]
            if ids:
                out.append(ids[0])
            else:  # a mixer: {dataset: weight}
                for k, v in value.items():
                    if isinstance(v, (int, float)):
                        out.append(k)
                    else:
                        collect(v)

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in keys:
                    collect(v)
                else:
                    walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(recipe)
    seen = []
    for d in out:
        if d not in seen:
            seen.append(d)
    return seen


def _latest_checkpoint_file(folder: Path, name: str) -> Path | None:
    if (folder / name).is_file():
        return folder / name
    ckpts = []
    for d in folder.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and (d / name).is_file():
            ckpts.append((int(m.group(1)), d / name))
    return max(ckpts)[1] if ckpts else None


def _find_recipe(folder: Path) -> Path | None:
    for name in _RECIPE_NAMES:
        if (folder / name).is_file():
            return folder / name
    others = sorted(p for p in folder.glob("*.y*ml") if p.is_file())
    return others[0] if others else None


def read_training_details(folder: str | os.PathLike) -> TrainingDetails | None:
    """Training facts from `trainer_state.json` (the folder's, else the latest `checkpoint-*/`),
    `all_results.json` / `train_results.json` and a recipe YAML copy (`recipe.yaml`, ...). None if the folder
    has none of them."""
    path = Path(folder)
    state_path = _latest_checkpoint_file(path, "trainer_state.json")
    results_path = next((path / n for n in _RESULT_FILES if (path / n).is_file()), None)
    recipe_path = _find_recipe(path)
    if state_path is None and results_path is None and recipe_path is None:
        return None
    t = TrainingDetails()
    recipe: dict[str, Any] = {}
    if recipe_path is not None:
        try:
            loaded = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
            recipe = loaded if isinstance(loaded, dict) else {}
        except (OSError, yaml.YAMLError) as err:
            logger.warning("Could not read the recipe %s: %s", recipe_path.name, err)
        if recipe:
            t.recipe_file = recipe_path.name
            scrubbed, _ = _scrub(recipe, roots=_local_roots(path), key_values={})
            t.recipe_yaml = yaml.safe_dump(scrubbed, sort_keys=False, allow_unicode=True).strip()
    if state_path is not None:
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            logger.warning("Could not read trainer_state.json: %s", err)
            state = {}
        t.global_step = state.get("global_step")
        t.max_steps = state.get("max_steps") or None
        t.batch_size = state.get("train_batch_size")
        history = [e for e in state.get("log_history", []) if isinstance(e, dict)]
        lrs = [e["learning_rate"] for e in history if isinstance(e.get("learning_rate"), (int, float))]
        losses = [e["loss"] for e in history if isinstance(e.get("loss"), (int, float))]
        t.learning_rate = max(lrs) if lrs else None
        t.final_loss = losses[-1] if losses else None
        summary = [e for e in history if "train_loss" in e]
        if summary:
            t.train_loss = summary[-1].get("train_loss")
        epochs = [e["epoch"] for e in history if isinstance(e.get("epoch"), (int, float))]
        t.epochs = epochs[-1] if epochs else state.get("epoch")
    if results_path is not None:
        try:
            results = json.loads(results_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            results = {}
        t.num_examples = results.get("train_samples")
        t.epochs = t.epochs if t.epochs is not None else results.get("epoch")
        if t.train_loss is None:
            t.train_loss = results.get("train_loss")
    if recipe:
        if t.learning_rate is None:
            lr = _find_key(recipe, ("learning_rate", "lr"))
            t.learning_rate = float(lr) if isinstance(lr, (int, float, str)) and _is_number(lr) else None
        t.lr_scheduler = _find_key(recipe, ("lr_scheduler_type", "lr_scheduler"))
        if t.lr_scheduler is not None:
            t.lr_scheduler = str(t.lr_scheduler)
        if t.batch_size is None:
            bs = _find_key(recipe, ("per_device_train_batch_size", "train_batch_size", "batch_size"))
            t.batch_size = bs if isinstance(bs, int) else None
        if t.num_examples is None:
            n = _find_key(recipe, ("num_train_samples", "train_samples", "num_examples", "dataset_size"))
            t.num_examples = n if isinstance(n, int) else None
        if t.max_steps is None:
            ms = _find_key(recipe, ("max_steps",))
            t.max_steps = ms if isinstance(ms, int) and ms > 0 else None
        if t.epochs is None:
            ep = _find_key(recipe, ("num_train_epochs",))
            t.epochs = float(ep) if isinstance(ep, (int, float)) else None
        peft = _find_key(recipe, ("use_peft", "lora_r", "lora_rank", "peft_config", "lora"))
        if peft:
            t.method = "LoRA"
        for d in _dataset_names(recipe):
            if _looks_like_hub_id(d):
                t.datasets.append(d)
            else:
                t.local_datasets.append(_local_basename(d))
        base = _find_key(recipe, ("model_name_or_path", "base_model", "pretrained_model_name_or_path"))
        if _looks_like_hub_id(base):
            t.base_model = base
    return t


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


# ------------------------------------------------------------------------------------------ scrubbing
def _local_roots(*paths: Path | None) -> tuple[str, ...]:
    """Specific local prefixes that must not appear in anything published: the given folders (absolute and
    resolved) and their parents, the working directory and the home folder (when at least two levels deep)."""
    roots = set()
    for p in paths:
        if p is None:
            continue
        for q in (Path(os.path.abspath(p)), Path(os.path.realpath(p))):
            roots.add(str(q))
            roots.update(str(parent) for parent in q.parents if len(parent.parts) >= 3)  # "/a/b" and deeper
    for p in (os.getcwd(), os.path.expanduser("~"), tempfile.gettempdir()):
        for q in (os.path.abspath(p), os.path.realpath(p)):
            if len([s for s in re.split(r"[\\/]", q) if s]) >= 2:
                roots.add(q)
    return tuple(sorted((r for r in roots if r not in ("/", "")), key=len, reverse=True))


def _scrub(obj: Any, roots: tuple[str, ...], key_values: dict[str, Any]) -> tuple[Any, bool]:
    """Replace local paths (by their base name) and secrets in a JSON/YAML value; `key_values` forces the
    value of some keys (e.g. `_name_or_path` -> the repo id). Returns (new value, changed)."""
    if isinstance(obj, dict):
        changed, out = False, {}
        for k, v in obj.items():
            if k in key_values:
                new, c = key_values[k], v != key_values[k]
            elif isinstance(k, str) and k.lower() in _SECRET_KEYS and isinstance(v, str) and v:
                new, c = None, True
            else:
                new, c = _scrub(v, roots, key_values)
            if isinstance(k, str):  # keys can be paths too (a dataset mixer: {path: weight})
                k2, ck = _scrub(k, roots, {})
                k, c = k2, c or ck
            out[k] = new
            changed |= c
        return out, changed
    if isinstance(obj, list):
        pairs = [_scrub(v, roots, key_values) for v in obj]
        return [p[0] for p in pairs], any(p[1] for p in pairs)
    if isinstance(obj, str):
        new = obj  # a token-like string outside the secret keys is refused later (`_check_clean`), not edited
        if _looks_local(new, roots):
            new = _local_basename(new)
        else:
            for r in roots:
                new = new.replace(r, "<local>")
        return new, new != obj
    return obj, False


def _prepare_uploads(info: FolderInfo, repo_id: str, base_model: str | None, token: str | None) -> list[tuple[str, bytes | str]]:
    """(path in repo, content) for every file to upload: text files scrubbed of local paths and secrets,
    binaries by path. Raises `PublishInputError` when a secret or a local path cannot be removed."""
    roots = _local_roots(info.folder, info.base_model_local)
    key_values = {"_name_or_path": repo_id, "name_or_path": repo_id, "base_model_name_or_path": base_model}
    uploads: list[tuple[str, bytes | str]] = []
    for rel in info.files:
        src = info.folder / rel
        name = src.name
        if src.suffix.lower() not in _TEXT_SUFFIXES:
            if src.suffix == ".safetensors" and token:
                meta = json.dumps(read_safetensors_header(src).get("__metadata__") or {})
                if token in meta:
                    raise PublishInputError(f"the metadata of {rel} holds the Hub token: remove it before publishing.")
            uploads.append((rel, str(src)))
            continue
        raw = src.read_bytes()
        text = raw.decode("utf-8", errors="replace")
        new_text = text
        if name not in _VOCAB_FILES:
            data, fmt = None, None
            if src.suffix == ".json":
                try:
                    data, fmt = json.loads(text), "json"
                except ValueError:
                    pass
            elif src.suffix in (".yaml", ".yml"):
                try:
                    data, fmt = yaml.safe_load(text), "yaml"
                except yaml.YAMLError:
                    pass
            if fmt is not None:
                scrubbed, changed = _scrub(data, roots, key_values)
                if changed:
                    logger.info("Scrubbed local paths / secrets from %s", rel)
                    if fmt == "json":
                        new_text = json.dumps(scrubbed, indent=2, ensure_ascii=False) + "\n"
                    else:
                        new_text = yaml.safe_dump(scrubbed, sort_keys=False, allow_unicode=True)
            else:
                new_text = text
                for r in roots:
                    new_text = new_text.replace(r, "<local>")
        _check_clean(new_text, rel, roots if name not in _VOCAB_FILES else _folder_roots(info), token)
        uploads.append((rel, new_text.encode("utf-8") if new_text != text else raw))
    return uploads


def _folder_roots(info: FolderInfo) -> tuple[str, ...]:
    paths = [p for p in (info.folder, info.base_model_local) if p is not None]
    return tuple({os.path.abspath(p) for p in paths} | {os.path.realpath(p) for p in paths})


def _check_clean(text: str, what: str, roots: tuple[str, ...], token: str | None) -> None:
    if token and token in text:
        raise PublishInputError(f"{what} contains the Hub token: remove it before publishing.")
    if _HF_TOKEN_RE.search(text):
        raise PublishInputError(f"{what} contains what looks like a Hugging Face token (hf_...): remove it before publishing.")
    for r in roots:
        if r in text:
            raise PublishInputError(f"{what} still names a local path after scrubbing: edit it before publishing.")


# ------------------------------------------------------------------------------------------ model card
def load_template(card_type: str) -> str:
    """The Markdown + Jinja template of a card type, read from the installed package data."""
    if card_type not in TEMPLATE_FILES:
        raise PublishInputError(f"card type {card_type!r} is not one of {', '.join(CARD_TYPES)}.")
    return resources.files("lumina_hf").joinpath("model_cards", TEMPLATE_FILES[card_type]).read_text(encoding="utf-8")


def _is_omni(omni: bool | None, *names: Any, config: dict[str, Any] | None = None) -> bool:
    if omni is not None:
        return bool(omni)
    if config and isinstance(config.get("omni"), bool):
        return config["omni"]
    return any(isinstance(n, str) and "omni" in n.lower() for n in names)


def _format_params(n: int | None) -> str | None:
    if not n:
        return None
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _target_from_name(*names: Any) -> int | None:
    for n in names:
        if isinstance(n, str):
            m = re.search(r"(?<!\d)(512|768|1024)(?!\d)", n)
            if m:
                return int(m.group(1))
    return None


def _tokens_per_image(width: int, height: int) -> int:
    return UniRepLayout().span_length(height, width)


def build_model_card(
    info: FolderInfo,
    repo_id: str,
    *,
    card_type: str | None = None,
    base_model: str | None = None,
    omni: bool | None = None,
    license: str | None = None,
    license_name: str | None = None,
    license_link: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    target_size: int | None = None,
    samples: SampleGrid | None = None,
    model_name: str | None = None,
) -> ModelCard:
    """Render the card of `info` for `repo_id` from the packaged template of its card type."""
    from . import __version__
    from .image_processing_lumina_mgpt import generate_buckets

    validate_hub_repo_id(repo_id)
    card_type = card_type or resolve_card_type(info)
    if card_type == "adapter" and info.kind != "adapter":
        raise PublishInputError(f"card type 'adapter' needs an adapter folder, this is a {info.kind} folder.")
    if card_type != "adapter" and info.kind == "adapter":
        raise PublishInputError(f"an adapter folder gets the 'adapter' card, not {card_type!r}.")
    base_model = base_model or info.base_model_hint or (info.training.base_model if info.training else None)
    if base_model is not None:
        validate_hub_repo_id(base_model, "base model")
    if card_type == "adapter" and base_model is None:
        raise PublishInputError(
            "the adapter's base model is not a Hub id (it is a local folder or unknown): pass base_model= / "
            "--base-model ORG/NAME, the Hub id of the model the adapter was trained on."
        )
    target_size = target_size or info.target_size or _target_from_name(base_model, repo_id, info.folder.name)
    is_omni = _is_omni(omni, repo_id, base_model, info.folder.name, config=info.model_config)
    sampling = TEXT_TO_IMAGE_SAMPLING
    tag_list = list(BASE_TAGS)
    if is_omni:
        tag_list += ["any-to-any", "image-to-image", "omni"]
    if card_type == "adapter":
        tag_list += ["lora", "peft"]
    for t in tags or []:
        if t not in tag_list:
            tag_list.append(t)
    all_datasets = list(datasets or [])
    for d in (info.training.datasets if info.training else []):
        if d not in all_datasets:
            all_datasets.append(d)
    for d in all_datasets:
        validate_hub_repo_id(d, "dataset id")
    if license is None or (license == "other" and license_name in (None, CHAMELEON_LICENSE["license_name"])):
        lic = dict(CHAMELEON_LICENSE, **({"license_link": license_link} if license_link else {}))
    else:
        logger.warning(
            "License %s: the card carries no Chameleon Research License notice. Only correct for weights that are "
            "not derived from Chameleon (every published Lumina-mGPT checkpoint is).", license_name or license,
        )
        lic = {"license": license, "license_name": license_name, "license_link": license_link}
    chameleon = lic.get("license_name") == CHAMELEON_LICENSE["license_name"]
    card_kwargs: dict[str, Any] = {
        "library_name": LIBRARY_NAME,
        "pipeline_tag": "any-to-any" if is_omni else "text-to-image",
        "tags": tag_list,
        "license": lic["license"],
    }
    if lic.get("license_name"):
        card_kwargs["license_name"] = lic["license_name"]
    if lic.get("license_link"):
        card_kwargs["license_link"] = lic["license_link"]
    if base_model:
        card_kwargs["base_model"] = base_model
        if card_type in ("adapter", "finetune"):
            card_kwargs["base_model_relation"] = "adapter" if card_type == "adapter" else "finetune"
    if all_datasets:
        card_kwargs["datasets"] = all_datasets
    card_data = ModelCardData(**card_kwargs)

    buckets = generate_buckets(target_size) if target_size else []
    size = target_size or 512
    cfg = info.model_config or {}
    adapter = info.adapter_config or {}
    processor_source, processor_subfolder, base_subfolder = repo_id, None, None
    if card_type == "adapter":
        base_subfolder = "model" if info.base_layout == "pipeline" else None
        if not info.has_processor:
            processor_source = base_model
            processor_subfolder = "processor" if info.base_layout == "pipeline" else None
    training = info.training
    if training is not None and not training.method:
        training = dataclasses.replace(training, method="LoRA" if card_type == "adapter" else "full fine-tuning")
    elif training is not None and training.method == "LoRA" and card_type != "adapter":
        training = dataclasses.replace(training, method="LoRA, merged into the weights")
    targets = adapter.get("target_modules")
    context = {
        "repo_id": repo_id,
        "model_name": model_name or repo_id.split("/")[-1],
        "card_type": card_type,
        "layout": info.kind,
        "base_model": base_model,
        "base_subfolder": base_subfolder,
        "processor_source": processor_source,
        "processor_subfolder": processor_subfolder,
        "omni": is_omni,
        "target_size": target_size,
        "buckets": [f"{w}x{h}" for w, h in buckets],
        "width": size,
        "height": size,
        "tokens_per_image": _tokens_per_image(size, size),
        "sampling": sampling,
        "omni_sampling": OMNI_SAMPLING,
        "example_prompt": EXAMPLE_PROMPT,
        "params": _format_params(info.num_parameters),
        "dtypes": ", ".join(info.weight_dtypes),
        "layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "heads": cfg.get("num_attention_heads"),
        "vocab_size": cfg.get("vocab_size"),
        "has_vqgan": info.has_vqgan,
        "training_rows": training.rows() if training else [],
        "method": training.method if training else None,
        "recipe_yaml": training.recipe_yaml if training else None,
        "lora": {
            "r": adapter.get("r"),
            "alpha": adapter.get("lora_alpha"),
            "dropout": adapter.get("lora_dropout"),
            "targets": ", ".join(f"`{m}`" for m in sorted(targets)) if isinstance(targets, list) else targets,
        },
        "chameleon": chameleon,
        "license_label": lic.get("license_name") or lic["license"],
        "license_link": lic.get("license_link"),
        "samples": samples,
        "lumina_hf_version": __version__,
    }
    card = ModelCard.from_template(card_data, template_str=load_template(card_type), **context)
    card.text = "\n" + re.sub(r"\n{3,}", "\n\n", card.text).strip() + "\n"
    card = ModelCard(str(card))  # the text as it will be parsed on the Hub
    _check_card(card, card_kwargs)
    return card


def _check_card(card: ModelCard, expected: dict[str, Any]) -> None:
    data = card.data.to_dict()
    for key, value in expected.items():
        if data.get(key) != value:
            raise PublishInputError(f"the rendered card's metadata has {key}={data.get(key)!r}, expected {value!r}.")


def resolve_card_type(info: FolderInfo) -> str:
    """"adapter" for adapters; "finetune" when the folder holds training records; else "base" (a converted
    published checkpoint). Pass `card_type=` to choose."""
    if info.kind == "adapter":
        return "adapter"
    return "finetune" if info.training is not None else "base"


# ------------------------------------------------------------------------------------------ samples
def load_folder_pipeline(info: FolderInfo, base_model: str | None = None, device: str | None = None, dtype=None):
    """A `LuminaMGPTPipeline` from a published-to-be folder (adapters are merged into their base)."""
    import torch

    from .modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration
    from .pipeline_lumina_mgpt import LuminaMGPTPipeline
    from .processing_lumina_mgpt import LuminaMGPTProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    folder = str(info.folder)
    if info.kind == "pipeline":
        pipe = LuminaMGPTPipeline.from_pretrained(folder, dtype=dtype)
    elif info.kind == "model":
        model = LuminaMGPTForConditionalGeneration.from_pretrained(folder, dtype=dtype)
        pipe = LuminaMGPTPipeline(model=model, processor=LuminaMGPTProcessor.from_pretrained(folder))
    else:
        from peft import PeftModel

        base = str(info.base_model_local) if info.base_model_local is not None else base_model
        if base is None:
            raise PublishInputError("sample images of an adapter need its base model: pass base_model=.")
        sub = {"subfolder": "model"} if info.base_layout == "pipeline" else {}
        model = LuminaMGPTForConditionalGeneration.from_pretrained(base, dtype=dtype, **sub)
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
        if info.has_processor:
            processor = LuminaMGPTProcessor.from_pretrained(folder)
        else:
            psub = {"subfolder": "processor"} if info.base_layout == "pipeline" else {}
            processor = LuminaMGPTProcessor.from_pretrained(base, **psub)
        pipe = LuminaMGPTPipeline(model=model.eval(), processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate_sample_grid(
    pipe,
    prompts: list[str],
    *,
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    guidance_scale: float | None = None,
    columns: int | None = None,
    batch_size: int = 4,
) -> SampleGrid:
    """One image per prompt (generator seeded `seed + i`), tiled into a grid PNG. Prompts are generated
    `batch_size` at a time (each image depends only on its prompt and its generator, not on the batch)."""
    import PIL.Image
    import torch

    if not prompts:
        raise PublishInputError("give at least one sample prompt.")
    size = pipe.processor.image_processor.target_size
    width, height = width or size, height or size
    guidance = TEXT_TO_IMAGE_SAMPLING["guidance_scale"] if guidance_scale is None else guidance_scale
    gen_device = "cuda" if str(pipe.device).startswith("cuda") else "cpu"
    generators = [torch.Generator(gen_device).manual_seed(seed + i) for i in range(len(prompts))]
    images = []
    try:
        for start in range(0, len(prompts), max(1, batch_size)):
            stop = start + max(1, batch_size)
            images += pipe(
                list(prompts[start:stop]),
                height=height,
                width=width,
                guidance_scale=guidance,
                top_k=TEXT_TO_IMAGE_SAMPLING["top_k"],
                temperature=TEXT_TO_IMAGE_SAMPLING["temperature"],
                generator=generators[start:stop],
            ).images
    except ValueError as err:
        raise PublishInputError(f"could not generate the sample images: {err}") from None
    cols = columns or min(len(images), 4)
    rows = math.ceil(len(images) / cols)
    grid = PIL.Image.new("RGB", (cols * width, rows * height), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * width, (i // cols) * height))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return SampleGrid(png=buf.getvalue(), prompts=list(prompts), seed=seed, width=width, height=height, guidance_scale=guidance)


# ------------------------------------------------------------------------------------------ push
def prepare_push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    card_type: str | None = None,
    base_model: str | None = None,
    omni: bool | None = None,
    license: str | None = None,
    license_name: str | None = None,
    license_link: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    target_size: int | None = None,
    samples: list[str] | None = None,
    seed: int = 0,
    sample_size: tuple[int, int] | None = None,
    device: str | None = None,
) -> PushPlan:
    """Check `folder`, scrub its files, render the card and the sample grid: everything but the upload.
    Raises `PublishInputError` (nothing has been sent anywhere)."""
    validate_hub_repo_id(repo_id)
    info = inspect_folder(folder)
    if card_type is not None and card_type not in CARD_TYPES:
        raise PublishInputError(f"card type {card_type!r} is not one of {', '.join(CARD_TYPES)}.")
    resolved_base = base_model or info.base_model_hint or (info.training.base_model if info.training else None)
    if base_model is not None:
        validate_hub_repo_id(base_model, "base model")
    if info.kind == "adapter" and resolved_base is None:
        raise PublishInputError(
            "the adapter's base model is a local folder or unknown: pass base_model= / --base-model ORG/NAME "
            "(the Hub id of the model it was trained on), so the card can say how to load it."
        )
    card_type = card_type or resolve_card_type(info)
    if info.skipped:
        logger.info("Leaving out %d path(s) that are never published: %s", len(info.skipped), ", ".join(info.skipped[:10]))
    uploads = _prepare_uploads(info, repo_id, resolved_base if info.kind == "adapter" else None, token)
    card_kwargs = dict(
        card_type=card_type, base_model=resolved_base, omni=omni, license=license, license_name=license_name,
        license_link=license_link, datasets=datasets, tags=tags, target_size=target_size,
    )
    card = build_model_card(info, repo_id, **card_kwargs)  # fails fast, before any slow sampling
    grid = None
    if samples:
        if info.has_vqgan is False:
            raise PublishInputError("sample images need the VQGAN weights, which this model lacks.")
        logger.info("Generating %d sample image(s) (seed %d)", len(samples), seed)
        pipe = load_folder_pipeline(info, base_model=resolved_base, device=device)
        w, h = sample_size if sample_size else (None, None)
        grid = generate_sample_grid(pipe, list(samples), seed=seed, width=w, height=h)
        del pipe
        uploads = [u for u in uploads if u[0] != grid.path_in_repo] + [(grid.path_in_repo, grid.png)]
        card = build_model_card(info, repo_id, samples=grid, **card_kwargs)
    _check_clean(str(card), "the model card", _local_roots(info.folder, info.base_model_local), token)
    if info.has_vqgan is False:
        logger.warning("The model has no VQGAN weights: it cannot encode or decode images (the card says so).")
    return PushPlan(repo_id=repo_id, info=info, card_type=card_type, card=card, uploads=uploads, samples=grid)


def validate_card_metadata(endpoint: str, card_text: str, token: str | None) -> None:
    """Ask the Hub whether a model card's YAML metadata is valid; `ValueError` with the Hub's reason if not.

    The same request `huggingface_hub.ModelCard.validate()` makes, sent to `endpoint` (that method always asks
    the default endpoint, so it cannot check a push to another Hub)."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    response = get_session().post(
        f"{endpoint}/api/validate-yaml",
        json={"content": card_text, "repoType": "model"},
        headers=build_hf_headers(token=token),
    )
    if response.status_code == 400:
        try:
            errors = [e.get("message", str(e)) for e in response.json().get("errors", [])]
        except ValueError:
            errors = []
        raise ValueError("; ".join(errors) or response.text)
    hf_raise_for_status(response)


def _short_error(err: BaseException, token: str | None) -> str:
    msg = " ".join(str(err).split()) or type(err).__name__
    if token:
        msg = msg.replace(token, "<token>")
    return msg[:600]


def _list(paths: list[str], limit: int = 40) -> str:
    return ", ".join(paths[:limit]) + (f" ... and {len(paths) - limit} more" if len(paths) > limit else "")


def push_to_hub_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    samples: list[str] | None = None,
    seed: int = 0,
    sample_size: tuple[int, int] | None = None,
    card_type: str | None = None,
    base_model: str | None = None,
    omni: bool | None = None,
    license: str | None = None,
    license_name: str | None = None,
    license_link: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    target_size: int | None = None,
    device: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Publish a lumina_hf pipeline, model or adapter folder to `repo_id` with a model card.

    Args:
        folder: the folder (kind detected: pipeline, model or PEFT adapter). It is not modified.
        repo_id: `namespace/name`. The repo is created if needed (`private` applies only then).
        token: a Hub token (default: `HF_TOKEN` or the saved login). Never logged or uploaded.
        revision: the branch to push to (created from main if missing); `create_pr`: open a pull request
            (against `revision` or main) holding both commits instead.
        commit_message: message of the files commit (the card commit says "Add model card").
        samples, seed, sample_size: prompts for a grid of sample images generated now with the recommended
            settings (generator seeded `seed + i`, default the target square) and stored as `samples/grid.png`.
        card_type: "base", "finetune" or "adapter" (default: from the folder).
        base_model: Hub id of the base (adapters: required when the adapter names a local base).
        omni: an Omni model (`pipeline_tag: any-to-any`); default: "omni" in the repo id, base model or folder name.
        license / license_name / license_link: default the Chameleon Research License (`license: other`).
        datasets, tags: extra card metadata; target_size: overrides the bucket family read from the processor.
        endpoint: Hub endpoint (default `HF_ENDPOINT`).

    Returns a `PushResult`. Raises `PublishInputError` (nothing uploaded) or `PushError` (which commits went
    through and which files were not committed).
    """
    from huggingface_hub import get_token

    validate_hub_repo_id(repo_id)
    token = token or get_token()
    if not token:
        raise PublishInputError(
            "no Hugging Face token: pass token=, set HF_TOKEN or run `hf auth login` (a token with write access)."
        )
    plan = prepare_push(
        folder, repo_id, token=token, card_type=card_type, base_model=base_model, omni=omni, license=license,
        license_name=license_name, license_link=license_link, datasets=datasets, tags=tags,
        target_size=target_size, samples=samples, seed=seed, sample_size=sample_size, device=device,
    )
    return upload_plan(plan, token=token, private=private, revision=revision, commit_message=commit_message,
                       create_pr=create_pr, endpoint=endpoint)


def upload_plan(
    plan: PushPlan,
    *,
    token: str,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
) -> PushResult:
    """Upload a prepared `PushPlan`: create the repo, commit the files, then commit the card."""
    from . import __version__

    repo_id = plan.repo_id
    api = HfApi(endpoint=endpoint, token=token, library_name=LIBRARY_NAME, library_version=__version__)
    card_text = str(plan.card)
    # the Hub's own metadata check, before anything is uploaded
    try:
        validate_card_metadata(api.endpoint, card_text, token)
    except ValueError as err:
        raise PublishInputError(f"the Hub rejected the card's metadata: {err}") from None
    except Exception as err:
        raise PushError(
            f"could not reach the Hub to validate the card ({_short_error(err, token)}). Nothing was uploaded.",
            committed=[], not_committed=plan.files,
        ) from None
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main" and not create_pr and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    except Exception as err:
        raise PushError(
            f"could not create or access the repository {repo_id}"
            f"{f' (branch {revision})' if revision else ''}: {_short_error(err, token)}. Nothing was uploaded.",
            committed=[], not_committed=plan.files,
        ) from None

    message = commit_message or f"Upload {plan.info.kind} with lumina-hf {__version__}"
    steps = [
        (message, plan.uploads),
        (f"{commit_message} (model card)" if commit_message else "Add model card", [("README.md", card_text.encode("utf-8"))]),
    ]
    committed: list[CommitRecord] = []
    target = revision
    pr_url = None
    logger.info("Publishing the %s folder to %s (%d files, then the card)", plan.info.kind, repo_id, len(plan.uploads))
    for i, (msg, files) in enumerate(steps):
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=src) for p, src in files]
        try:
            result = api.create_commit(
                repo_id,
                operations=ops,
                commit_message=msg,
                commit_description=f"Published with lumina-hf {__version__}.",
                revision=target,
                create_pr=create_pr and i == 0,
                repo_type="model",
            )
        except Exception as err:
            pending = [p for _, fs in steps[i:] for p, _ in fs]
            if committed:
                done = "; ".join(
                    f"commit {j + 1} '{c.message}' ({(c.oid or '?')[:10]}): {_list(c.files)}" for j, c in enumerate(committed)
                )
                status = f"Committed (on the Hub now): {done}."
            else:
                status = (
                    f"Nothing was committed: {repo_id} exists but holds none of these files (large files already sent "
                    "to the Hub's storage are not part of any commit)."
                )
            raise PushError(
                f"upload to {repo_id} failed at commit {i + 1} of {len(steps)} ('{msg}'): {_short_error(err, token)}. "
                f"{status} Not committed: {_list(pending)}. Run the same push again to finish it.",
                committed=committed,
                not_committed=pending,
            ) from None
        committed.append(CommitRecord(message=msg, oid=result.oid, url=result.commit_url, files=[p for p, _ in files]))
        logger.info("Committed %d file(s) to %s: %s", len(files), repo_id, result.commit_url)
        if create_pr and i == 0:
            pr_url = result.pr_url
            target = result.pr_revision
    if pr_url:
        logger.info("Opened pull request %s", pr_url)
    return PushResult(
        repo_id=repo_id, kind=plan.info.kind, card_type=plan.card_type, commits=committed, pr_url=pr_url, files=plan.files
    )


__all__ = [
    "CHAMELEON_LICENSE",
    "LIBRARY_NAME",
    "OMNI_SAMPLING",
    "TEXT_TO_IMAGE_SAMPLING",
    "CommitRecord",
    "FolderInfo",
    "PublishInputError",
    "PushError",
    "PushPlan",
    "PushResult",
    "SampleGrid",
    "TrainingDetails",
    "build_model_card",
    "detect_folder_kind",
    "generate_sample_grid",
    "inspect_folder",
    "load_folder_pipeline",
    "load_template",
    "prepare_push",
    "push_to_hub_folder",
    "read_training_details",
    "upload_plan",
]
