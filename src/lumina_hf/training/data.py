"""Raw training data -> a tokenized `datasets.Dataset` of `input_ids` / `labels` / `length` (images VQ-encoded once).

Sources (SPEC.md sections 5 and 7):
- an image folder with captions (the `datasets` imagefolder convention: images plus `metadata.jsonl`,
  `metadata.csv` or `metadata.parquet` with a `file_name` column, relative to the metadata file, and a caption
  column): text-to-image items;
- the original training JSON (a list of `{"conversations": [{"from": "human"|"gpt", "value"}], "image": [paths]}`,
  or chat `{"messages": [...], "images": [...]}`; `.jsonl` with one item per line too): multi-turn, multi-image,
  Omni items; relative image paths are relative to the JSON file's folder;
- any `datasets.Dataset` (or a folder written by `save_to_disk`): caption mode with `image_column` +
  `caption_column`, or conversation mode with `conversation_column` (+ `image_column` for its images).

Text-to-image items are `[user: text_to_image_prompt(caption, W, H), assistant: <|image|>]` with the image's bucket
`W x H`; a seeded share (`no_size_ratio`) uses the size-free prompt, and a seeded share (`uncond_ratio`) becomes the
image alone (`UniRep span + <reserved08706>`, no BOS, no text, every token trained: the unconditional context of
classifier-free guidance). Per-item choices come from `random.Random(f"{seed}-{index}")`, so re-runs and resumed runs
give identical output.

The output holds only token columns (`input_ids`, `labels`, `length`, optionally `source_index`): a column named
`image`/`images` would switch TRL to its vision path. The work is done in chunks written to `output/_chunks/NNNNN`
(temp folder + rename), so an interrupted run resumes where it stopped. Bad items are skipped and counted by reason
in `output/tokenize_report.json`, never truncated.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import csv
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch

from ..image_processing_lumina_mgpt import check_target_size
from ..processing_lumina_mgpt import IMAGE_MARKER, text_to_image_prompt

logger = logging.getLogger(__name__)

CHUNKS_DIR = "_chunks"
REPORT_FILE = "tokenize_report.json"
CONFIG_FILE = "config.json"
CHUNK_REPORT_FILE = "chunk_report.json"
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
OUTPUT_COLUMNS = ("input_ids", "labels", "length", "source_index")

# Reasons an item is skipped (the keys of the report's `skipped`).
SKIP_IMAGE_ERROR = "image_error"  # unreadable / corrupt / too small image, missing file
SKIP_MISSING_CAPTION = "missing_caption"  # caption absent, not a string, or blank
SKIP_INVALID_ITEM = "invalid_item"  # malformed conversation (roles, structure)
SKIP_IMAGE_COUNT = "image_count_mismatch"  # number of <|image|> markers != number of images
SKIP_NO_TRAINABLE = "no_trainable_token"  # no assistant turn: every label would be -100
SKIP_TOO_LONG = "too_long"  # longer than max_length (images are never cut)
SKIP_REASONS = (
    SKIP_IMAGE_ERROR,
    SKIP_MISSING_CAPTION,
    SKIP_INVALID_ITEM,
    SKIP_IMAGE_COUNT,
    SKIP_NO_TRAINABLE,
    SKIP_TOO_LONG,
)

_IMAGE_ERRORS = (ValueError, OSError, SyntaxError, PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError)


def output_features(keep_source_index: bool = True):
    """The schema of the tokenized dataset: int32 token lists, int32 length, int64 source index."""
    from datasets import Features, List, Value

    feats = {"input_ids": List(Value("int32")), "labels": List(Value("int32")), "length": Value("int32")}
    if keep_source_index:
        feats["source_index"] = Value("int64")
    return Features(feats)


@dataclasses.dataclass
class TokenizeResult:
    """`dataset`: the tokenized `datasets.Dataset` (memory-mapped from `output_dir`); `report`: the dict written to
    `output_dir/tokenize_report.json` (counts, skipped items by reason, settings)."""

    dataset: Any
    report: dict

    def __iter__(self):  # `dataset, report = tokenize_dataset(...)`
        return iter((self.dataset, self.report))


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


# ---------------------------------------------------------------------------------------------------------------
# VQ model
# ---------------------------------------------------------------------------------------------------------------
class VQImageEncoder(torch.nn.Module):
    """Only the image tokenizer of a Lumina-mGPT checkpoint: the VQGAN plus the code -> token-id table of its config.
    `encode_images(pixel_values (B, 3, H, W) in [-1, 1]) -> (B, H/16, W/16)` token ids, like
    `LuminaMGPTForConditionalGeneration.encode_images`."""

    def __init__(self, vqmodel: torch.nn.Module, code_to_token_id: Sequence[int]):
        super().__init__()
        self.vqmodel = vqmodel
        self.register_buffer("code_to_token_id", torch.tensor(list(code_to_token_id), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        weight = self.vqmodel.quant_conv.weight
        codes = self.vqmodel.encode_to_codes(pixel_values.to(weight.device))
        return self.code_to_token_id.to(codes.device)[codes]


def _safetensors_files(folder: str) -> list[str] | None:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, "model.safetensors")
    return [single] if os.path.isfile(single) else None


def load_vq_model(path: str | os.PathLike, device: str | torch.device | None = None) -> torch.nn.Module:
    """Load the image tokenizer of a lumina_hf model folder.

    Reads only the VQGAN tensors (`*vqmodel.*`) from the folder's safetensors into a `VQImageEncoder` (a 7B
    checkpoint's language model is never loaded); folders without safetensors fall back to
    `LuminaMGPTForConditionalGeneration.from_pretrained`. Raises a ValueError when the folder has no VQGAN weights."""
    from safetensors import safe_open

    from ..configuration_lumina_mgpt import LuminaMGPTConfig
    from ..modeling_vqgan import LuminaMGPTVQGAN

    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise ValueError(f"model folder {folder!r} does not exist (give a lumina_hf model folder or pass the model object).")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder!r} is not a model folder (no config.json): give a lumina_hf model folder.")
    try:
        config = LuminaMGPTConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not read a Lumina-mGPT config from {folder!r}: {err}") from err
    files = _safetensors_files(folder)
    if files is None:
        from ..modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration

        logger.info("%s has no safetensors: loading the whole model to use its VQGAN.", folder)
        try:
            model = LuminaMGPTForConditionalGeneration.from_pretrained(folder)
        except OSError as err:
            raise ValueError(f"could not load a Lumina-mGPT model from {folder!r}: {err}") from err
        model.vqmodel._require("encoder")
        return model.eval() if device is None else model.to(device).eval()
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if "vqmodel." in key:
                    state[key.split("vqmodel.", 1)[1]] = f.get_tensor(key)
    vqmodel = LuminaMGPTVQGAN._from_config(config.vq_config)
    expected = set(vqmodel.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(
            f"{folder} has no complete VQGAN ({len(missing)} of {len(expected)} tensors missing, e.g. {missing[0]}): "
            "the published Lumina-mGPT checkpoints do not contain it. Convert with `lumina-hf convert --checkpoint ... "
            "--vqgan <Meta Chameleon tokenizer dir>` so the folder holds the full image tokenizer."
        )
    vqmodel.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)
    vqmodel.to(torch.float32)
    encoder = VQImageEncoder(vqmodel, config.image_code_to_token_id()).eval()
    return encoder if device is None else encoder.to(device)


# ---------------------------------------------------------------------------------------------------------------
# Processor helpers
# ---------------------------------------------------------------------------------------------------------------
def _with_target_size(processor, target_size: int | None):
    """A shallow copy of `processor` whose image processor uses `target_size` buckets (the same object if unchanged)."""
    ip = processor.image_processor
    if target_size is None or target_size == ip.target_size:
        out = processor
    else:
        check_target_size(target_size, ip.patch_size)
        new_ip = copy.deepcopy(ip)
        new_ip.target_size = int(target_size)
        out = copy.copy(processor)
        out.image_processor = new_ip
    ts = out.image_processor.target_size
    for w, h in out.image_processor.bucket_sizes:
        for side in (w, h):
            try:
                out.size_token_id(side)
            except ValueError as err:
                raise ValueError(
                    f"target_size={ts} is not supported: its bucket {w}x{h} has a side the size tokens cannot express "
                    f"({err}). The published models use 512, 768 or 1024."
                ) from err
    return out


def _text_ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def minimum_max_length(processor, target_size: int | None = None, text_to_image: bool = True) -> int:
    """The smallest `max_length` that fits one image of every bucket of `target_size` (default: the processor's):
    the longest UniRep span (the tallest bucket: every row adds a row-end token) plus the prompt overhead (BOS, two
    separators and, for `text_to_image`, the prompt template with an empty caption)."""
    processor = _with_target_size(processor, target_size)
    best = 0
    for w, h in processor.image_processor.bucket_sizes:
        n = len(processor.placeholder_ids(h, w)) + 3
        if text_to_image:
            n += max(len(_text_ids(processor, text_to_image_prompt("", w, h))), len(_text_ids(processor, text_to_image_prompt(""))))
        best = max(best, n)
    return best


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Row:
    index: int
    caption: Any = None  # caption mode
    image: Any = None  # caption mode
    conversation: Any = None  # conversation mode: the raw item
    images: Any = None  # conversation mode: extra images given beside the item (dataset column)
    base_dir: str | None = None  # relative image paths are relative to this folder


class _Source:
    mode: str  # "caption" or "conversation"

    def __len__(self) -> int:
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> list[_Row]:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


def _read_metadata(path: str) -> list[dict]:
    if path.endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path} line {n} is not valid JSON ({err}).") from err
        return rows
    if path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


class _ImageFolderSource(_Source):
    mode = "caption"

    def __init__(self, folder: str, caption_column: str):
        self.folder = os.path.abspath(folder)
        meta_files = []
        for root, dirs, files in os.walk(self.folder):
            dirs[:] = sorted(d for d in dirs if d != CHUNKS_DIR and not d.startswith("."))
            meta_files.extend(os.path.join(root, f) for f in sorted(files) if f in METADATA_FILES)
        if not meta_files:
            raise ValueError(
                f"{folder} has no metadata file: an image folder needs one of {', '.join(METADATA_FILES)} with a "
                f"'file_name' column (the image path relative to the metadata file) and a caption column."
            )
        self.records: list[tuple[str, Any]] = []
        columns: set[str] = set()
        for meta in meta_files:
            rows = _read_metadata(meta)
            base = os.path.dirname(meta)
            for n, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise ValueError(f"{meta} row {n} is not an object with columns.")
                columns.update(row)
                if "file_name" not in row or not isinstance(row["file_name"], str):
                    raise ValueError(
                        f"{meta} row {n} has no 'file_name' (the image path relative to the metadata file); "
                        f"its columns: {sorted(row)}."
                    )
                self.records.append((os.path.join(base, row["file_name"]), row.get(caption_column)))
        if caption_column not in columns:
            raise ValueError(
                f"caption column {caption_column!r} is not in the metadata of {folder}; available columns: "
                f"{sorted(columns)}. Pass caption_column=... (CLI: --caption-column)."
            )
        self.meta_files = meta_files
        self.caption_column = caption_column

    def __len__(self):
        return len(self.records)

    def rows(self, start, stop):
        return [_Row(i, caption=c, image=p) for i, (p, c) in enumerate(self.records[start:stop], start)]

    def describe(self):
        digest = hashlib.sha256(json.dumps(self.records, sort_keys=True, default=str).encode()).hexdigest()
        return {"type": "imagefolder", "path": self.folder, "caption_column": self.caption_column, "sha256": digest}


class _JsonSource(_Source):
    mode = "conversation"

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        with open(self.path, "rb") as f:
            raw = f.read()
        self.digest = hashlib.sha256(raw).hexdigest()
        text = raw.decode("utf-8")
        if self.path.endswith(".jsonl"):
            items = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path} line {n} is not valid JSON ({err}).") from err
        else:
            try:
                items = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON ({err}).") from err
        if not isinstance(items, list):
            raise ValueError(
                f"{path} must hold a JSON list of items like "
                '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}], "image": [paths]}; '
                f"got a {type(items).__name__}."
            )
        self.items = items
        self.base_dir = os.path.dirname(self.path)

    def __len__(self):
        return len(self.items)

    def rows(self, start, stop):
        return [_Row(i, conversation=it, base_dir=self.base_dir) for i, it in enumerate(self.items[start:stop], start)]

    def describe(self):
        return {"type": "json", "path": self.path, "sha256": self.digest}


class _DatasetSource(_Source):
    def __init__(self, ds, image_column: str, caption_column: str, conversation_column: str | None, path: str | None):
        cols = list(ds.column_names)

        def need(col: str, what: str, flag: str):
            if col not in cols:
                raise ValueError(
                    f"the dataset has no {what} column {col!r}; available columns: {cols}. Pass {flag}=... "
                    f"(CLI: --{flag.replace('_', '-')})."
                )

        if conversation_column is None and caption_column not in cols and caption_column == "text":
            conversation_column = next((c for c in ("conversations", "messages") if c in cols), None)
        if image_column not in cols and image_column == "image" and "images" in cols:
            image_column = "images"
        if conversation_column is not None:
            self.mode = "conversation"
            need(conversation_column, "conversation", "conversation_column")
            use = [conversation_column] + ([image_column] if image_column in cols else [])
        else:
            self.mode = "caption"
            need(image_column, "image", "image_column")
            need(caption_column, "caption", "caption_column")
            use = [image_column, caption_column]
        self.fingerprint = getattr(ds, "_fingerprint", None)
        self.ds = ds.select_columns(use)
        self.image_column, self.caption_column, self.conversation_column = image_column, caption_column, conversation_column
        self.path = path

    def __len__(self):
        return len(self.ds)

    def rows(self, start, stop):
        batch = self.ds[start:stop]
        n = stop - start
        out = []
        for k in range(n):
            i = start + k
            if self.mode == "caption":
                out.append(_Row(i, caption=batch[self.caption_column][k], image=batch[self.image_column][k]))
            else:
                images = batch[self.image_column][k] if self.image_column in batch else None
                base = os.path.dirname(os.path.abspath(self.path)) if self.path else None
                out.append(_Row(i, conversation=batch[self.conversation_column][k], images=images, base_dir=base))
        return out

    def describe(self):
        d = {
            "type": "dataset",
            "mode": self.mode,
            "image_column": self.image_column,
            "caption_column": self.caption_column if self.mode == "caption" else None,
            "conversation_column": self.conversation_column,
            # `datasets` fingerprints are content hashes for saved / loaded / from_dict datasets (a dataset built
            # with an unhashable transform gets a random one: resuming it then asks for overwrite=True)
            "fingerprint": self.fingerprint,
            "path": os.path.abspath(self.path) if self.path is not None else None,
        }
        return d


def _open_source(source, image_column, caption_column, conversation_column, split) -> _Source:
    import datasets

    def pick_split(obj, where):
        if isinstance(obj, datasets.DatasetDict):
            if split not in obj:
                raise ValueError(f"{where} has no split {split!r}; available splits: {sorted(obj)}. Pass split=...")
            return obj[split]
        return obj

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return _DatasetSource(pick_split(source, "the DatasetDict"), image_column, caption_column, conversation_column, None)
    if isinstance(source, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise ValueError("streaming (Iterable) datasets are not supported: chunks need random access to resume.")
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"source must be a path (image folder, JSON file, saved dataset) or a datasets.Dataset, got {type(source).__name__}."
        )
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ValueError(f"source {path!r} does not exist.")
    if os.path.isfile(path):
        if path.endswith((".json", ".jsonl")):
            return _JsonSource(path)
        raise ValueError(f"source file {path!r} is not a .json or .jsonl training file.")
    if any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
        ds = pick_split(datasets.load_from_disk(path), path)
        return _DatasetSource(ds, image_column, caption_column, conversation_column, path)
    return _ImageFolderSource(path, caption_column)


# ---------------------------------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Item:
    index: int
    turns: list[tuple[str, str]] | None = None  # None: unconditional (the image alone)
    raw_images: list = dataclasses.field(default_factory=list)
    pixels: list = dataclasses.field(default_factory=list)
    caption: str | None = None
    uncond: bool = False
    no_size: bool = False
    length: int = 0


def _resolve_image(img: Any, base_dir: str | None) -> Any:
    if isinstance(img, dict) and ("bytes" in img or "path" in img):  # a `datasets` Image feature with decode=False
        img = img.get("bytes") or img.get("path")
    if isinstance(img, (str, os.PathLike)):
        p = os.fspath(img)
        if base_dir and not os.path.isabs(p) and "://" not in p:
            p = os.path.join(base_dir, p)
        return p
    return img


def _split_conversation(item: Any) -> tuple[Any, list]:
    """A raw conversation item -> (what `normalize_conversation` takes, images beside it)."""
    if isinstance(item, dict) and "conversations" in item:
        images = item.get("image", item.get("images"))
        return {"conversations": item["conversations"]}, images
    if isinstance(item, dict) and "messages" in item:
        return item["messages"], item.get("images", item.get("image"))
    if isinstance(item, (list, tuple)) and item and all(isinstance(t, dict) for t in item) and "from" in item[0]:
        return {"conversations": list(item)}, None
    return item, None


def _as_list(images: Any) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


class _Tokenizer:
    """Turns rows into (input_ids, labels); shared by every chunk of one run."""

    def __init__(self, processor, vq_model, *, mode, max_length, seed, no_size_ratio, uncond_ratio, random_crop,
                 batch_size, num_workers):
        self.processor, self.vq_model, self.mode = processor, vq_model, mode
        self.max_length, self.seed = max_length, seed
        self.no_size_ratio, self.uncond_ratio, self.random_crop = no_size_ratio, uncond_ratio, random_crop
        self.batch_size, self.num_workers = batch_size, num_workers
        self.sep = processor.separator_token_id

    # ---- stage 1: structure (background thread) ------------------------------------------------------------
    def _prepare(self, row: _Row) -> _Item:
        rng = random.Random(f"{self.seed}-{row.index}")
        u_uncond, u_no_size = rng.random(), rng.random()
        item = _Item(row.index)
        if self.mode == "caption":
            cap = row.caption
            if not isinstance(cap, str) or not cap.strip():
                raise _Skip(SKIP_MISSING_CAPTION, f"caption is {cap!r}")
            if row.image is None:
                raise _Skip(SKIP_IMAGE_ERROR, "no image")
            item.caption = cap
            item.raw_images = [_resolve_image(row.image, row.base_dir)]
            item.uncond = u_uncond < self.uncond_ratio
            item.no_size = not item.uncond and u_no_size < self.no_size_ratio
            return item
        try:
            conv, beside = _split_conversation(row.conversation)
            turns, images = self.processor.normalize_conversation(conv, _as_list(beside) + _as_list(row.images))
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            raise _Skip(SKIP_INVALID_ITEM, f"{type(err).__name__}: {err}") from None
        try:
            turns = self.processor._place_images(turns, len(images), f"item {row.index}")
        except ValueError as err:
            raise _Skip(SKIP_IMAGE_COUNT, str(err)) from None
        item.turns = turns
        item.raw_images = [_resolve_image(im, row.base_dir) for im in images]
        # Unconditional share: items whose only image is the assistant's output (a text-to-image conversation).
        markers = [(role, text.count(IMAGE_MARKER)) for role, text in turns]
        only_output = len(images) == 1 and any(r == "assistant" and n == 1 for r, n in markers)
        item.uncond = only_output and u_uncond < self.uncond_ratio
        if item.uncond:
            item.turns = None
        return item

    # ---- stage 2: pixels (worker threads) -------------------------------------------------------------------
    def _load_pixels(self, item: _Item) -> list[torch.Tensor]:
        ip = self.processor.image_processor
        rng = random.Random(f"{self.seed}-{item.index}-crop") if self.random_crop else None
        out = []
        for k, img in enumerate(item.raw_images):
            try:
                out.append(ip.preprocess_image(img, random_crop=self.random_crop, rng=rng, index=k))
            except _IMAGE_ERRORS as err:
                raise _Skip(SKIP_IMAGE_ERROR, f"{type(err).__name__}: {err}") from None
        return out

    # ---- stage 3: text + checks (main thread) ---------------------------------------------------------------
    def _layout(self, item: _Item, spans: list[list[int]]) -> tuple[list[int], list[int]]:
        if item.turns is None:  # the image alone: UniRep span + separator, every token trained
            ids = list(spans[0]) + [self.sep]
            return ids, list(ids)
        return self.processor.tokenize_conversation(item.turns, spans, f"item {item.index}")

    def _check(self, item: _Item) -> None:
        if self.mode == "caption" and not item.uncond:
            w, h = item.pixels[0].shape[-1], item.pixels[0].shape[-2]
            prompt = text_to_image_prompt(item.caption) if item.no_size else text_to_image_prompt(item.caption, w, h)
            item.turns = [("user", prompt), ("assistant", IMAGE_MARKER)]
            if prompt.count(IMAGE_MARKER):
                raise _Skip(SKIP_IMAGE_COUNT, f"the caption contains {IMAGE_MARKER}")
        spans = [self.processor.placeholder_ids(p.shape[-2], p.shape[-1]) for p in item.pixels]
        ids, labels = self._layout(item, spans)
        if all(lab == -100 for lab in labels):
            raise _Skip(SKIP_NO_TRAINABLE, "no trainable token (the item needs an assistant turn)")
        if self.max_length is not None and len(ids) > self.max_length:
            raise _Skip(SKIP_TOO_LONG, f"{len(ids)} tokens > max_length={self.max_length}")
        item.length = len(ids)

    # ---- stage 4: VQ encode (batched by bucket) -------------------------------------------------------------
    def _encode(self, items: list[_Item]) -> dict[tuple[int, int], list[int]]:
        groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for n, item in enumerate(items):
            for k, p in enumerate(item.pixels):
                groups.setdefault(tuple(p.shape), []).append((n, k))
        spans: dict[tuple[int, int], list[int]] = {}
        with torch.inference_mode():
            for keys in groups.values():
                for s in range(0, len(keys), self.batch_size):
                    part = keys[s : s + self.batch_size]
                    pixels = torch.stack([items[n].pixels[k] for n, k in part])
                    ids = self.vq_model.encode_images(pixels).cpu()
                    del pixels
                    for j, key in enumerate(part):
                        spans[key] = self.processor.unirep_ids(ids[j])
        return spans

    def load(self, rows: list[_Row], pool) -> tuple[list, list[dict]]:
        """Stages 1-2 (no tokenizer: safe to run in a background thread while the previous chunk is encoded):
        `([(item, pixels or _Skip)], skipped)`."""
        skipped: list[dict] = []
        items = []
        for row in rows:
            try:
                items.append(self._prepare(row))
            except _Skip as s:
                skipped.append({"index": row.index, "reason": s.reason, "message": s.message})

        def load_one(item):
            try:
                return self._load_pixels(item)
            except _Skip as s:
                return s

        pixels = list(pool.map(load_one, items)) if pool is not None else [load_one(it) for it in items]
        return list(zip(items, pixels)), skipped

    def finish(self, loaded: tuple[list, list[dict]]) -> tuple[dict[str, list], list[dict], Counter]:
        """Stages 3-5 (main thread): text and checks, VQ encoding, final ids. Returns `(columns, skipped, stats)`."""
        pairs, skipped = loaded
        skipped = list(skipped)
        stats: Counter = Counter()
        ok: list[_Item] = []
        for item, pixels in pairs:
            if isinstance(pixels, _Skip):
                skipped.append({"index": item.index, "reason": pixels.reason, "message": pixels.message})
                continue
            item.pixels = pixels
            try:
                self._check(item)
            except _Skip as s:
                skipped.append({"index": item.index, "reason": s.reason, "message": s.message})
                continue
            ok.append(item)

        spans = self._encode(ok)
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "source_index": []}
        for n, item in enumerate(ok):
            ids, labels = self._layout(item, [spans[(n, k)] for k in range(len(item.pixels))])
            if len(ids) != item.length:  # the placeholder layout and the real one must agree
                raise RuntimeError(f"item {item.index}: {len(ids)} tokens after encoding, {item.length} planned.")
            item.pixels = []
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
            out["source_index"].append(item.index)
            stats["unconditional"] += item.uncond
            stats["no_size"] += item.no_size
            stats["tokens"] += len(ids)
        skipped.sort(key=lambda d: d["index"])
        return out, skipped, stats


# ---------------------------------------------------------------------------------------------------------------
# Disk
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_datasets():
    """Silence `datasets`' own progress bars while writing chunks (ours covers the run)."""
    from datasets import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _chunk_name(k: int) -> str:
    return f"{k:05d}"


def _save_chunk(chunks_dir: str, k: int, columns: dict[str, list], skipped: list[dict], stats: Counter, features) -> None:
    """Write one finished chunk as a dataset to a temp folder, then rename it to `_chunks/NNNNN`."""
    from datasets import Dataset

    keep = list(features)
    ds = Dataset.from_dict({c: columns[c] for c in keep}, features=features)
    final = os.path.join(chunks_dir, _chunk_name(k))
    tmp = os.path.join(chunks_dir, f".tmp-{_chunk_name(k)}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    if len(ds):
        with _quiet_datasets():
            ds.save_to_disk(tmp)
    else:  # `datasets` cannot read back a dataset saved with no rows: keep only the chunk's report
        os.makedirs(tmp)
    _write_json(os.path.join(tmp, CHUNK_REPORT_FILE), {"rows": len(ds), "skipped": skipped, "stats": dict(stats)})
    os.replace(tmp, final)


def _is_dataset_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json"))


_DATASET_FILES = ("state.json", "dataset_info.json", REPORT_FILE)


def _remove_dataset_files(folder: str) -> None:
    for name in os.listdir(folder):
        if name in _DATASET_FILES or (name.startswith("data-") and name.endswith(".arrow")):
            os.remove(os.path.join(folder, name))


def _finalize(
    output: str, chunks_dir: str, chunks_with_rows: list[int], report: dict, features, save_kwargs: dict, progress: bool
):
    """Concatenate the chunks, save the dataset into `output` through a temp folder, remove the chunks."""
    from datasets import Dataset, concatenate_datasets, load_from_disk

    parts = [load_from_disk(os.path.join(chunks_dir, _chunk_name(k))) for k in chunks_with_rows]
    ds = concatenate_datasets(parts) if parts else Dataset.from_dict({c: [] for c in features}, features=features)
    tmp = os.path.join(output, f".final-tmp-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    with contextlib.nullcontext() if progress else _quiet_datasets():
        ds.save_to_disk(tmp, **save_kwargs)
    _write_json(os.path.join(tmp, REPORT_FILE), report)
    _remove_dataset_files(output)
    names = os.listdir(tmp)
    # data files first, the files that make the folder a dataset last
    order = sorted(names, key=lambda n: (n in ("dataset_info.json", "state.json"), n == "state.json", n))
    for name in order:
        os.replace(os.path.join(tmp, name), os.path.join(output, name))
    os.rmdir(tmp)
    shutil.rmtree(chunks_dir)
    del parts, ds
    return load_from_disk(output)


def _clean_stale(folder: str) -> None:
    for name in os.listdir(folder):
        if name.startswith((".tmp-", ".final-tmp-")):
            p = os.path.join(folder, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------
def _check_ratio(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
    return float(value)


def _check_positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def tokenize_dataset(
    source,
    output_dir: str | os.PathLike,
    *,
    vq_model: Any,
    processor=None,
    target_size: int | None = None,
    max_length: int = 4096,
    image_column: str = "image",
    caption_column: str = "text",
    conversation_column: str | None = None,
    split: str = "train",
    no_size_ratio: float = 0.0,
    uncond_ratio: float = 0.0,
    seed: int = 0,
    random_crop: bool = False,
    chunk_size: int = 256,
    batch_size: int = 8,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    keep_source_index: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    push_to_hub: str | dict | None = None,
    max_shard_size: str | int | None = None,
) -> TokenizeResult:
    """Tokenize a raw data source into a training dataset of `input_ids`, `labels`, `length` (+ `source_index`)
    saved to `output_dir` with `save_to_disk`; images are VQ-encoded once, in batches per bucket.

    Args:
        source: an image folder with `metadata.jsonl|csv|parquet` (`file_name` + `caption_column`), a training
            `.json`/`.jsonl` file (conversations), a `datasets.Dataset`/`DatasetDict`, or a `save_to_disk` folder.
        output_dir: where the dataset, `tokenize_report.json` and (while running) `_chunks/` go.
        vq_model: a `LuminaMGPTForConditionalGeneration` (only its VQGAN is used), anything with
            `encode_images(pixel_values) -> (B, H/16, W/16) token ids`, or a model folder (`load_vq_model`).
        processor: a `LuminaMGPTProcessor` or a folder; default: the `vq_model` folder.
        target_size: the bucket family (default: the processor's image processor `target_size`).
        max_length: longer items are skipped (`too_long`); it must fit one image of the largest bucket.
        image_column / caption_column / conversation_column / split: column names for dataset sources (a dataset
            with no `text` column but a `conversations`/`messages` column is read as conversations).
        no_size_ratio: share of text-to-image items with the size-free prompt.
        uncond_ratio: share of single-output-image items written as the image alone (no BOS, no text; 0.1 in
            Lumina-mGPT 2.0).
        seed: per-item choices (and random crops) come from `random.Random(f"{seed}-{index}")`.
        random_crop: crop at a seeded random offset (training augmentation) instead of the centre.
        chunk_size: items per resumable chunk; batch_size: images per VQ forward; num_workers: image-decoding
            threads (default: up to 8); device: where the VQGAN runs (default cuda when available).
        keep_source_index: keep the `source_index` column (the item's position in the source).
        overwrite: replace a finished dataset in `output_dir` (or chunks written with other settings).
        push_to_hub: a repo id (or a dict of `Dataset.push_to_hub` keyword arguments) to upload the result to.

    Returns:
        `TokenizeResult(dataset, report)`; the report is also written to `output_dir/tokenize_report.json`.
    """
    t0 = time.perf_counter()
    # ---------------- validation: everything that can fail fails here, before any work ----------------
    no_size_ratio = _check_ratio("no_size_ratio", no_size_ratio)
    uncond_ratio = _check_ratio("uncond_ratio", uncond_ratio)
    chunk_size = _check_positive("chunk_size", chunk_size)
    batch_size = _check_positive("batch_size", batch_size)
    if max_length is not None:
        _check_positive("max_length", max_length)
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}.")
    if vq_model is None:
        raise ValueError("vq_model is required: a LuminaMGPTForConditionalGeneration or a model folder.")
    vq_path = os.fspath(vq_model) if isinstance(vq_model, (str, os.PathLike)) else None
    if vq_path is not None and not os.path.isdir(vq_path):
        raise ValueError(f"vq_model folder {vq_path!r} does not exist.")
    if vq_path is None and not callable(getattr(vq_model, "encode_images", None)):
        raise ValueError(f"vq_model must have an encode_images(pixel_values) method, got {type(vq_model).__name__}.")
    if processor is None:
        if vq_path is None:
            raise ValueError("give a processor (a LuminaMGPTProcessor or its folder) when vq_model is an object.")
        processor = vq_path
    if isinstance(processor, (str, os.PathLike)):
        from ..processing_lumina_mgpt import LuminaMGPTProcessor

        if not os.path.isdir(processor):
            raise ValueError(f"processor folder {os.fspath(processor)!r} does not exist.")
        try:
            processor = LuminaMGPTProcessor.from_pretrained(os.fspath(processor))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"could not load a LuminaMGPTProcessor from {os.fspath(processor)!r}: {err}") from err
    processor = _with_target_size(processor, target_size)
    target_size = processor.image_processor.target_size

    src = _open_source(source, image_column, caption_column, conversation_column, split)
    if len(src) == 0:
        raise ValueError("the source has no items.")
    if max_length is not None:
        need = minimum_max_length(processor, text_to_image=src.mode == "caption")
        if max_length < need:
            raise ValueError(
                f"max_length={max_length} is too short for target_size={target_size}: one image of its largest "
                f"bucket plus the prompt needs {need} tokens. Use max_length >= {need} (or a smaller target size)."
            )

    output = os.path.abspath(os.fspath(output_dir))
    chunks_dir = os.path.join(output, CHUNKS_DIR)
    config = {
        "format_version": 1,
        "source": src.describe(),
        "num_source_items": len(src),
        "target_size": target_size,
        "max_length": max_length,
        "seed": seed,
        "no_size_ratio": no_size_ratio,
        "uncond_ratio": uncond_ratio,
        "random_crop": bool(random_crop),
        "chunk_size": chunk_size,
        "keep_source_index": bool(keep_source_index),
    }
    config = json.loads(json.dumps(config))  # the JSON round trip makes it comparable with the stored one
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"output {output!r} exists and is not a folder.")
    if os.path.isdir(output) and os.listdir(output):
        has_chunks = os.path.isdir(chunks_dir)
        finished = _is_dataset_dir(output) and not has_chunks
        if not has_chunks and not _is_dataset_dir(output):
            raise ValueError(f"output {output!r} is a non-empty folder that is not a tokenized dataset: pick an empty or new folder.")
        if finished:
            previous = None
            if os.path.isfile(os.path.join(output, REPORT_FILE)):
                with open(os.path.join(output, REPORT_FILE), encoding="utf-8") as f:
                    previous = json.load(f).get("config")
            if previous == config and not overwrite:
                from datasets import load_from_disk

                logger.info("%s already holds this tokenization: nothing to do.", output)
                with open(os.path.join(output, REPORT_FILE), encoding="utf-8") as f:
                    return TokenizeResult(load_from_disk(output), json.load(f))
            if not overwrite:
                raise ValueError(
                    f"output {output!r} already holds a tokenized dataset made with other settings or data; "
                    "pass overwrite=True (CLI: --overwrite) to replace it."
                )
        if has_chunks:
            stored = None
            if os.path.isfile(os.path.join(chunks_dir, CONFIG_FILE)):
                with open(os.path.join(chunks_dir, CONFIG_FILE), encoding="utf-8") as f:
                    stored = json.load(f)
            if stored != config:
                if not overwrite:
                    diff = sorted(k for k in set(config) | set(stored or {}) if (stored or {}).get(k) != config.get(k))
                    raise ValueError(
                        f"{chunks_dir} holds chunks of an interrupted run with other settings or data (differs in: "
                        f"{', '.join(diff)}); rerun with the same settings to resume, or pass overwrite=True to start over."
                    )
                shutil.rmtree(chunks_dir)
        if overwrite and finished:
            _remove_dataset_files(output)

    # ---------------- work ----------------
    if vq_path is not None:
        vq_model = load_vq_model(vq_path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    vq_module = getattr(vq_model, "vqmodel", None)
    restore_device = None
    if isinstance(vq_module, torch.nn.Module):
        current = next(vq_module.parameters()).device
        if current != torch.device(device):
            restore_device = current if vq_path is None else None
            vq_module.to(device)
    if vq_path is not None and isinstance(vq_model, torch.nn.Module):
        vq_model.to(device)

    os.makedirs(chunks_dir, exist_ok=True)
    _clean_stale(output)
    _clean_stale(chunks_dir)
    if not os.path.isfile(os.path.join(chunks_dir, CONFIG_FILE)):
        _write_json(os.path.join(chunks_dir, CONFIG_FILE), config)
    features = output_features(keep_source_index)
    n = len(src)
    n_chunks = (n + chunk_size - 1) // chunk_size
    done = [k for k in range(n_chunks) if os.path.isdir(os.path.join(chunks_dir, _chunk_name(k)))]
    done_items = sum(min(chunk_size, n - k * chunk_size) for k in done)
    if done:
        logger.info("resuming: %d of %d chunks already written (%d items).", len(done), n_chunks, done_items)
    tok = _Tokenizer(
        processor,
        vq_model,
        mode=src.mode,
        max_length=max_length,
        seed=seed,
        no_size_ratio=no_size_ratio,
        uncond_ratio=uncond_ratio,
        random_crop=bool(random_crop),
        batch_size=batch_size,
        num_workers=num_workers,
    )
    from tqdm.auto import tqdm

    bar = tqdm(total=n, initial=done_items, unit="item", desc="tokenize", disable=not progress)
    pool = concurrent.futures.ThreadPoolExecutor(num_workers) if num_workers > 1 else None
    # one chunk is read and preprocessed in the background while the previous one is VQ-encoded
    prefetch = concurrent.futures.ThreadPoolExecutor(1)
    pending = [k for k in range(n_chunks) if k not in done]

    def load_chunk(k):
        return tok.load(src.rows(k * chunk_size, min(n, (k + 1) * chunk_size)), pool)

    t_work = time.perf_counter()
    try:
        future = prefetch.submit(load_chunk, pending[0]) if pending else None
        for i, k in enumerate(pending):
            loaded = future.result()
            if i + 1 < len(pending):
                future = prefetch.submit(load_chunk, pending[i + 1])
            columns, skipped, stats = tok.finish(loaded)
            _save_chunk(chunks_dir, k, columns, skipped, stats, features)
            bar.update(min(n, (k + 1) * chunk_size) - k * chunk_size)
    finally:
        bar.close()
        prefetch.shutdown(wait=True, cancel_futures=True)
        if pool is not None:
            pool.shutdown()
        if restore_device is not None:
            vq_module.to(restore_device)
    work_s = time.perf_counter() - t_work

    # ---------------- report + final dataset ----------------
    skipped_all: list[dict] = []
    stats_all: Counter = Counter()
    chunks_with_rows = []
    for k in range(n_chunks):
        with open(os.path.join(chunks_dir, _chunk_name(k), CHUNK_REPORT_FILE), encoding="utf-8") as f:
            rep = json.load(f)
        if rep["rows"]:
            chunks_with_rows.append(k)
        skipped_all.extend(rep["skipped"])
        stats_all.update(rep["stats"])
    by_reason = Counter(s["reason"] for s in skipped_all)
    new_items = n - done_items
    report = {
        "config": config,
        "num_source_items": n,
        "num_written": n - len(skipped_all),
        "num_skipped": len(skipped_all),
        "skipped": {r: by_reason[r] for r in SKIP_REASONS if by_reason[r]},
        "skipped_items": skipped_all,
        "num_unconditional": int(stats_all["unconditional"]),
        "num_no_size": int(stats_all["no_size"]),
        "num_tokens": int(stats_all["tokens"]),
        "device": str(device),
        "items_this_run": new_items,
        "seconds_this_run": round(work_s, 3),
        "items_per_second": round(new_items / work_s, 3) if work_s > 0 and new_items else None,
    }
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    dataset = _finalize(output, chunks_dir, chunks_with_rows, report, features, save_kwargs, progress)
    if skipped_all:
        logger.warning(
            "skipped %d of %d items (%s); see %s for each item.",
            len(skipped_all),
            n,
            ", ".join(f"{r}: {c}" for r, c in report["skipped"].items()),
            os.path.join(output, REPORT_FILE),
        )
    logger.info(
        "tokenized %d items into %s (%d written, %d tokens) in %.1f s (%s items/s).",
        n,
        output,
        report["num_written"],
        report["num_tokens"],
        time.perf_counter() - t0,
        report["items_per_second"],
    )
    if push_to_hub:
        kwargs = dict(push_to_hub) if isinstance(push_to_hub, dict) else {"repo_id": push_to_hub}
        dataset.push_to_hub(**kwargs)
    return TokenizeResult(dataset, report)


__all__ = [
    "OUTPUT_COLUMNS",
    "SKIP_REASONS",
    "TokenizeResult",
    "VQImageEncoder",
    "load_vq_model",
    "minimum_max_length",
    "output_features",
    "tokenize_dataset",
]
