"""What a training run left in its output folder (trainer state, results, recipe copy), for the card's training section."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .options import looks_like_hub_id
from .scrub import local_basename, local_roots, scrub

logger = logging.getLogger(__name__)

# The files a training run writes that the card reads (and that a push uploads with the weights). The recipe copy
# is `training_recipe.yaml` for `lumina-hf train`; `recipe.yaml` / `.yml` are the names users give a copy.
RESULT_FILES = ("all_results.json", "train_results.json")
RECIPE_FILES = ("training_recipe.yaml", "recipe.yaml", "recipe.yml")
STATE_FILE = "trainer_state.json"
# the names the card reader looks for first (then any *.yaml / *.yml in the folder)
_RECIPE_NAMES = ("recipe.yaml", "recipe.yml", "training_args.yaml", "training_args.yml", "config.yaml", "config.yml")


def _inside(folder: Path, path: Path) -> bool:
    """Whether `path` resolves inside `folder` (a symbolic link out of the folder is never read)."""
    root, real = os.path.realpath(folder), os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


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


def latest_checkpoint_file(folder: Path, name: str) -> Path | None:
    if (folder / name).is_file() and _inside(folder, folder / name):
        return folder / name
    ckpts = []
    for d in folder.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and (d / name).is_file() and _inside(folder, d / name):
            ckpts.append((int(m.group(1)), d / name))
    return max(ckpts)[1] if ckpts else None


def _find_recipe(folder: Path) -> Path | None:
    for name in _RECIPE_NAMES:
        if (folder / name).is_file() and _inside(folder, folder / name):
            return folder / name
    others = sorted(p for p in folder.glob("*.y*ml") if p.is_file() and _inside(folder, p))
    return others[0] if others else None


def read_training_details(folder: str | os.PathLike) -> TrainingDetails | None:
    """Training facts from `trainer_state.json` (the folder's, else the latest `checkpoint-*/`),
    `all_results.json` / `train_results.json` and a recipe YAML copy (`recipe.yaml`, ...). None if the folder
    has none of them."""
    path = Path(folder)
    state_path = latest_checkpoint_file(path, "trainer_state.json")
    results_path = next((path / n for n in RESULT_FILES if (path / n).is_file() and _inside(path, path / n)), None)
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
            logger.warning("Could not read the recipe %s: %s", recipe_path.name, _reason(err))
        if recipe:
            t.recipe_file = recipe_path.name
            scrubbed, _ = scrub(recipe, roots=local_roots(path), key_values={})
            t.recipe_yaml = yaml.safe_dump(scrubbed, sort_keys=False, allow_unicode=True).strip()
    if state_path is not None:
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            logger.warning("Could not read trainer_state.json: %s", _reason(err))
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
            if looks_like_hub_id(d):
                t.datasets.append(d)
            else:
                t.local_datasets.append(local_basename(d))
        base = _find_key(recipe, ("model_name_or_path", "base_model", "pretrained_model_name_or_path"))
        if looks_like_hub_id(base):
            t.base_model = base
    return t


def _reason(err: Exception) -> str:
    """An error's reason without the file name an `OSError` carries (a local path is never logged)."""
    return str(err.strerror) if isinstance(err, OSError) else str(err)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True



__all__ = ["RECIPE_FILES", "RESULT_FILES", "STATE_FILE", "TrainingDetails", "read_training_details"]
