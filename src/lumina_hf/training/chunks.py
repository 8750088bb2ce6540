"""The on-disk side of offline tokenization: finished chunks under `output/_chunks/`, and the final dataset.

Every chunk is a small `save_to_disk` dataset plus its `chunk_report.json` (rows, skipped items, counts, timing),
written to a temp folder and renamed into place, so a chunk either exists whole or not at all. Chunks are named by
position in the source, never by process: `NNNNN` (chunk N of a map-style source) or `sSSSSS-NNNNN` (chunk N of
shard S of a stream), so any number of processes writes the same chunks. The final dataset concatenates them in name
order (the source order), is saved through a temp folder, and only then are the chunks removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from typing import Any

from .sources import quiet_datasets

logger = logging.getLogger(__name__)

CHUNKS_DIR = "_chunks"
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
SOURCE_FILES = "source_files.json.gz"
CHUNK_REPORT_FILE = "chunk_report.json"
REPORT_FILE = "tokenize_report.json"
FINAL_SOURCE_FILES = "tokenize_source_files.json.gz"
OUTPUT_COLUMNS = ("input_ids", "labels", "length", "source_index")
_DATASET_FILES = ("state.json", "dataset_info.json", REPORT_FILE, FINAL_SOURCE_FILES)


def output_features(keep_source_index: bool = True):
    """The schema of the tokenized dataset: int32 token lists, int32 length, int64 source index."""
    from datasets import Features, List, Value

    feats = {"input_ids": List(Value("int32")), "labels": List(Value("int32")), "length": Value("int32")}
    if keep_source_index:
        feats["source_index"] = Value("int64")
    return Features(feats)


def chunk_name(number: int, shard: int | None = None) -> str:
    return f"{number:05d}" if shard is None else f"s{shard:05d}-{number:05d}"


def write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_dataset_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json"))


def remove_dataset_files(folder: str) -> None:
    for name in os.listdir(folder):
        if name in _DATASET_FILES or (name.startswith("data-") and name.endswith(".arrow")):
            os.remove(os.path.join(folder, name))


def clean_stale(folder: str) -> None:
    """Remove temp folders and files that a killed run left behind."""
    for name in os.listdir(folder):
        if name.startswith((".tmp-", ".final-tmp-")) or ".tmp-" in name:
            p = os.path.join(folder, name)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)


class ChunkStore:
    """The chunks of one output folder."""

    def __init__(self, output: str):
        self.output = output
        self.dir = os.path.join(output, CHUNKS_DIR)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def done(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.dir, name, CHUNK_REPORT_FILE))

    def report(self, name: str) -> dict:
        return read_json(os.path.join(self.dir, name, CHUNK_REPORT_FILE))

    def write(self, name: str, columns: dict[str, list], report: dict, features) -> None:
        """One finished chunk: its rows as a dataset and its report, in a temp folder renamed to `name`."""
        from datasets import Dataset

        tmp = os.path.join(self.dir, f".tmp-{name}-{os.getpid()}")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        n = len(columns["input_ids"])
        if n:
            ds = Dataset.from_dict({c: columns[c] for c in features}, features=features)
            with quiet_datasets():
                ds.save_to_disk(tmp)
        else:  # `datasets` cannot read back a dataset saved with no rows: keep only the chunk's report
            os.makedirs(tmp)
        write_json(os.path.join(tmp, CHUNK_REPORT_FILE), {**report, "rows": n})
        os.replace(tmp, os.path.join(self.dir, name))

    def finalize(self, names: list[str], offsets: dict[str, int], report: dict, features, description: str,
                 save_kwargs: dict, progress: bool):
        """Concatenate the chunks `names` (in order) into the dataset in `output`, `source_index` shifted by
        `offsets[name]` (streams: the rows of the shards before), with `description` as its metadata and `report`
        beside it; then remove the chunks. Returns the dataset (memory-mapped from `output`)."""
        from datasets import Dataset, concatenate_datasets, load_from_disk

        parts = []
        for name in names:
            if not self.report(name)["rows"]:
                continue
            part = load_from_disk(self.path(name))
            shift = offsets.get(name, 0)
            if shift and "source_index" in part.column_names:
                with quiet_datasets():
                        part = part.map(lambda b: {"source_index": [i + shift for i in b["source_index"]]}, batched=True,
                                    keep_in_memory=True, features=features)
            parts.append(part)
        with quiet_datasets():
            ds = concatenate_datasets(parts) if parts else Dataset.from_dict({c: [] for c in features}, features=features)
        ds.info.description = description
        tmp = os.path.join(self.output, f".final-tmp-{os.getpid()}")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        with quiet_datasets(not progress):
            ds.save_to_disk(tmp, **save_kwargs)
        write_json(os.path.join(tmp, REPORT_FILE), report)
        if os.path.isfile(os.path.join(self.dir, SOURCE_FILES)):
            shutil.copyfile(os.path.join(self.dir, SOURCE_FILES), os.path.join(tmp, FINAL_SOURCE_FILES))
        remove_dataset_files(self.output)
        # data files first, the files that make the folder a dataset last
        order = sorted(os.listdir(tmp), key=lambda n: (n in ("dataset_info.json", "state.json"), n == "state.json", n))
        for name in order:
            os.replace(os.path.join(tmp, name), os.path.join(self.output, name))
        os.rmdir(tmp)
        del parts, ds
        shutil.rmtree(self.dir)
        return load_from_disk(self.output)


def merge_reports(reports: list[dict]) -> tuple[list[dict], Counter]:
    """The skipped items and counts of chunk reports, in order."""
    skipped: list[dict] = []
    stats: Counter = Counter()
    for rep in reports:
        skipped.extend(rep["skipped"])
        stats.update(rep["stats"])
    return skipped, stats


__all__ = [
    "CHUNKS_DIR",
    "ChunkStore",
    "OUTPUT_COLUMNS",
    "REPORT_FILE",
    "chunk_name",
    "output_features",
]
