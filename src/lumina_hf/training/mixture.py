"""The recipe's training data: the tokenized datasets of `dataset_mixture` loaded, checked and weighted into one
shuffled training set (and an optional eval split).

Each entry is a tokenized folder (`lumina-hf tokenize`), a Hub dataset id, or `synthetic:tiny[:N]` (a small learnable
set built from the model's codebook ids, for smoke tests). `build_datasets` checks the columns, the tokenizer and
VQGAN the data was tokenized with, every token id against the model's vocabulary, and drops (never truncates) items
longer than `max_length`.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from .arguments import DataArguments, LuminaTrainingArguments
from .identity import check_dataset_identity

logger = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "synthetic:"
REQUIRED_COLUMNS = ("input_ids", "labels")


def check_dataset_columns(ds, where: str) -> None:
    """ValueError for datasets the trainer must not see: missing token columns, or raw image columns."""
    cols = list(ds.column_names)
    image_cols = [c for c in ("image", "images") if c in cols]
    if image_cols:
        raise ValueError(
            f"{where} has a column {image_cols[0]!r}: TRL would treat it as a vision dataset and re-process the images. "
            "Tokenize it first with `lumina-hf tokenize` (images are VQ-encoded once, offline) and train on the "
            "tokenized folder."
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        raise ValueError(
            f"{where} has no {' and no '.join(repr(c) for c in missing)} column (columns: {cols}): training needs "
            "pre-tokenized `input_ids` and `labels` (-100 = not trained). Tokenize it with `lumina-hf tokenize`."
        )


def synthetic_dataset(model_config, processor, num_items: int = 16, seed: int = 0, size: int | None = None):
    """A small, learnable text-to-image set at the token level, for smoke tests and the tiny recipe
    (`path: synthetic:tiny` or `synthetic:tiny:N`): captions such as "a red square" / "red and blue stripes" with
    UniRep images whose code grids are a colour's code (squares) or two alternating columns of codes (stripes).
    The codes come from `model_config`'s codebook ids, so no VQGAN pass is needed. Items follow the real
    conversation format and labels (`processor.tokenize_conversation`)."""
    import random

    from datasets import Dataset

    from ..processing_lumina_mgpt import IMAGE_MARKER, text_to_image_prompt

    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]
    code_ids = model_config.image_code_to_token_id()
    size = int(size or processor.image_processor.target_size)
    rows, cols = processor.unirep.grid_shape(size, size)
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    for i in range(num_items):
        a, b = colours[i % len(colours)], colours[(i * 3 + 1) % len(colours)]
        ca, cb = code_ids[(7 * i) % len(code_ids)], code_ids[(7 * i + 3) % len(code_ids)]
        if i % 2:
            grid = [[ca if c % 2 == 0 else cb for c in range(cols)] for _ in range(rows)]
            caption = f"{a} and {b} stripes"
        else:
            grid = [[ca] * cols for _ in range(rows)]
            caption = f"a {a} square"
        prompt = text_to_image_prompt(caption, size, size) if rng.random() < 0.8 else text_to_image_prompt(caption)
        turns = [("user", prompt), ("assistant", IMAGE_MARKER)]
        ids, labels = processor.tokenize_conversation(turns, [processor.unirep_ids(torch.tensor(grid))])
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
    return Dataset.from_dict(out)


def _load_one(entry: dict, model_config, processor, where: str):
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = entry["path"]
    if path.startswith(SYNTHETIC_PREFIX):
        if model_config is None or processor is None:
            raise ValueError(f"{where}: {path} needs the model config and the processor.")
        parts = path[len(SYNTHETIC_PREFIX):].split(":")
        n = int(parts[1]) if len(parts) > 1 else 16
        return synthetic_dataset(model_config, processor, num_items=n)
    if is_local_path(path):
        if not os.path.isdir(os.path.expanduser(path)):
            raise ValueError(f"{where}: dataset folder {path} not found. Tokenize the data first with `lumina-hf tokenize`.")
        try:
            ds = load_from_disk(os.path.expanduser(path))
        except IndexError:  # datasets cannot read back a saved dataset of zero rows
            raise ValueError(f"{where}: dataset folder {path} is empty (no rows were saved).") from None
    else:
        ds = load_dataset(path, split=entry.get("split", "train"))
    if isinstance(ds, DatasetDict):
        split = entry.get("split", "train")
        if split not in ds:
            raise ValueError(f"{where} ({path}) has no split {split!r} (splits: {list(ds)}).")
        ds = ds[split]
    if not isinstance(ds, Dataset):
        raise ValueError(f"{where} ({path}) is not a map-style datasets.Dataset.")
    return ds


def check_token_ids(ds, vocab_size: int, where: str) -> None:
    """Every `input_ids` value lies in `0..vocab_size-1` (data tokenized for another vocabulary would otherwise train
    silently, or index out of the embedding); one vectorised pass over the Arrow column."""
    import pyarrow.compute as pc

    column = ds.with_format("arrow")[:]["input_ids"]
    values = pc.list_flatten(column)
    if len(values) == 0:
        return
    low, high = pc.min(values).as_py(), pc.max(values).as_py()
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"{where}: token ids span {low}..{high}, outside the model's vocabulary 0..{vocab_size - 1}: the data was "
            "tokenized for another model. Tokenize it with this model's processor."
        )


def _apply_weight(ds, weight: float, seed: int):
    """`weight` copies of the dataset: whole copies for the integer part, a seeded subset for the fraction.

    Not `datasets.interleave_datasets`: its `probabilities` draw each row's source at random and stop at the first
    (or last) exhausted dataset, so a dataset's share of an epoch varies with the seed and the others' sizes; a
    recipe weight is an exact count (0.5 = half the rows, 2.0 = every row twice), and the mixture is shuffled after."""
    from datasets import concatenate_datasets

    n = len(ds)
    whole, frac = int(math.floor(weight)), weight - math.floor(weight)
    parts = [ds] * whole
    k = int(round(frac * n))
    if k:
        parts.append(ds.shuffle(seed=seed).select(range(k)))
    if not parts:
        raise ValueError(f"a mixture weight of {weight} keeps no row of a {n}-row dataset.")
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def add_length(ds):
    """`ds` with a `length` column (tokens per item), computed when missing."""
    if "length" in ds.column_names:
        return ds
    return ds.map(lambda ex: {"length": len(ex["input_ids"])}, desc="lengths")


def build_datasets(data_args: DataArguments, training_args: LuminaTrainingArguments, model_config=None, processor=None,
                   vqgan_sha256: str | None = None):
    """(train, eval or None): the weighted mixture of the recipe's tokenized datasets, checked (columns, lengths, and
    with `model_config` every token id inside its vocabulary), with a `length` column, items longer than `max_length`
    dropped (never truncated)."""
    from datasets import concatenate_datasets

    parts = []
    for i, entry in enumerate(data_args.dataset_mixture):
        where = f"dataset_mixture[{i}]" + (f" ({entry['name']})" if entry.get("name") else "")
        ds = _load_one(entry, model_config, processor, where)
        check_dataset_columns(ds, f"{where} {entry['path']}")
        if processor is not None:  # the tokenizer and VQGAN it was tokenized with must be the model's
            check_dataset_identity(ds, vqgan_sha256, processor, f"{where} {entry['path']}", data_args.allow_mismatch)
        keep = [c for c in ("input_ids", "labels", "length") if c in ds.column_names]
        ds = add_length(ds.select_columns(keep))
        if len(ds) == 0:
            raise ValueError(f"{where} {entry['path']} is empty.")
        if model_config is not None:
            check_token_ids(ds, model_config.vocab_size, f"{where} {entry['path']}")
        first = ds[0]
        if len(first["input_ids"]) != len(first["labels"]):
            raise ValueError(f"{where} {entry['path']}: input_ids and labels have different lengths (row 0).")
        ds = _apply_weight(ds, entry["weight"], data_args.mixture_seed + i)
        logger.info("%s: %s, weight %.3g -> %d rows", where, entry["path"], entry["weight"], len(ds))
        parts.append(ds)
    train = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    if training_args.max_length is not None:
        before = len(train)
        limit = int(training_args.max_length)
        train = train.filter(lambda lengths: [n <= limit for n in lengths], input_columns="length", batched=True)
        dropped = before - len(train)
        if dropped:
            logger.warning(
                "%d of %d items are longer than max_length=%d and were dropped (images are never cut).", dropped, before, limit
            )
        if len(train) == 0:
            raise ValueError(f"every item is longer than max_length={limit}: raise max_length.")
    train = train.shuffle(seed=data_args.mixture_seed)
    if data_args.max_train_samples is not None:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    eval_ds = None
    if data_args.eval_split_size:
        split = train.train_test_split(test_size=data_args.eval_split_size, seed=data_args.mixture_seed)
        train, eval_ds = split["train"], split["test"]
    return train, eval_ds


def is_local_path(path: str) -> bool:
    """A dataset path is local when it exists, is written as a path (`./`, `../`, `/`, `~`) or has more than one
    `/`; a missing `name` or `org/name` is a Hub dataset id."""
    return os.path.exists(os.path.expanduser(path)) or path.startswith((".", "/", "~")) or path.count("/") > 1


def check_dataset_paths(data_args: DataArguments) -> list[str]:
    """Local dataset paths that do not exist (Hub ids and synthetic sets are not checked)."""
    return [
        e["path"]
        for e in data_args.dataset_mixture
        if not e["path"].startswith(SYNTHETIC_PREFIX) and is_local_path(e["path"]) and not os.path.isdir(os.path.expanduser(e["path"]))
    ]


__all__ = [
    "REQUIRED_COLUMNS",
    "SYNTHETIC_PREFIX",
    "add_length",
    "build_datasets",
    "check_dataset_columns",
    "check_dataset_paths",
    "check_token_ids",
    "is_local_path",
    "synthetic_dataset",
]
