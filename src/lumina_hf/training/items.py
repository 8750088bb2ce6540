"""One source row -> one training item (`input_ids`, `labels`), in the steps that offline tokenization spreads out:
`prepare` (structure and the item's seeded choices), `decode` (the image files to uint8 pixels at their bucket, run in
worker processes), `layout` (the processor's ids and labels, image codes still placeholders) and `finish` (the VQ codes
written over the placeholders); `ChunkTokenizer` runs them over one chunk of rows, encoding a batch of same-size
images as soon as it is full.

Text-to-image rows become `[user: text_to_image_prompt(caption, W, H), assistant: <|image|>]` with the image's bucket
`W x H`; a seeded share (`no_size_ratio`) uses the size-free prompt, and a seeded share (`uncond_ratio`) of the items
whose only image is the assistant's output becomes the image alone (UniRep span + separator, no BOS, no text, every
token trained: the unconditional context of classifier-free guidance). The choices of an item come from
`random.Random(key)` with `key = f"{seed}-{index}"` (`f"{seed}-{shard}-{index}"` in a stream), so they do not depend on
chunking, process count or resumes. Bad rows are skipped with a reason, never truncated.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import PIL.Image
import torch

from ..image_processing_lumina_mgpt import check_target_size, uint8_to_pixel_values
from ..conversation import IMAGE_MARKER, text_to_image_prompt
from .sources import CAPTION, Row
from .vq import fill_placeholders

if TYPE_CHECKING:
    from .chunks import ChunkStore

# Reasons an item is skipped (the keys of the report's `skipped`).
SKIP_IMAGE_ERROR = "image_error"  # unreadable / corrupt / too small / too large image, missing file
SKIP_MISSING_CAPTION = "missing_caption"  # caption absent, not a string, or blank
SKIP_INVALID_ITEM = "invalid_item"  # malformed conversation (roles, structure)
SKIP_IMAGE_COUNT = "image_count_mismatch"  # number of <|image|> markers != number of images
SKIP_NO_TRAINABLE = "no_trainable_token"  # no assistant turn: every label would be -100
SKIP_TOO_LONG = "too_long"  # longer than max_length (images are never cut)
SKIP_REASONS = (SKIP_IMAGE_ERROR, SKIP_MISSING_CAPTION, SKIP_INVALID_ITEM, SKIP_IMAGE_COUNT, SKIP_NO_TRAINABLE, SKIP_TOO_LONG)

_IMAGE_ERRORS = (ValueError, OSError, SyntaxError, PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError)


class Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(reason, message)
        self.reason, self.message = reason, message

    def record(self, index: int) -> dict:
        return {"index": index, "reason": self.reason, "message": self.message}


@dataclasses.dataclass
class Item:
    index: int
    shard: int = 0
    key: str = ""
    turns: list[tuple[str, str]] | None = None  # None: unconditional (the image alone)
    raw_images: list = dataclasses.field(default_factory=list)
    caption: str | None = None
    uncond: bool = False
    no_size: bool = False
    pixels: list = dataclasses.field(default_factory=list)  # (H, W, 3) uint8 tensors
    ids: list[int] | None = None
    labels: list[int] | None = None


# ------------------------------------------------------------------------------------------------ processor helpers
def with_target_size(processor, target_size: int | None):
    """A shallow copy of `processor` whose image processor uses `target_size` buckets (the same object if unchanged)."""
    ip = processor.image_processor
    if target_size is None or target_size == ip.target_size:
        out = processor
    else:
        check_target_size(target_size, ip.patch_size, ip.max_aspect_ratio)
        new_ip = copy.deepcopy(ip)
        new_ip.target_size = int(target_size)
        out = copy.copy(processor)
        out.image_processor = new_ip
        out._span_text = {}
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
    processor = with_target_size(processor, target_size)
    best = 0
    for w, h in processor.image_processor.bucket_sizes:
        n = processor.unirep.span_length(h, w) + 3
        if text_to_image:
            n += max(len(_text_ids(processor, text_to_image_prompt("", w, h))), len(_text_ids(processor, text_to_image_prompt(""))))
        best = max(best, n)
    return best


# ------------------------------------------------------------------------------------------------ rows -> items
def _resolve_image(img: Any, base_dir: str | None) -> Any:
    if isinstance(img, dict) and ("bytes" in img or "path" in img):  # a `datasets` Image feature with decode=False
        img = img.get("bytes") or img.get("path")
    if isinstance(img, (str, os.PathLike)):
        p = os.fspath(img)
        if base_dir and not os.path.isabs(p) and "://" not in p:
            p = os.path.join(base_dir, p)
        return p
    return img


def _split_conversation(item: Any) -> tuple[Any, Any]:
    """A raw conversation item -> (what `normalize_conversation` takes, images beside it)."""
    if isinstance(item, dict) and item.get("conversations") is not None:
        return {"conversations": item["conversations"]}, item.get("image", item.get("images"))
    if isinstance(item, dict) and item.get("messages") is not None:
        return item["messages"], item.get("images", item.get("image"))
    if isinstance(item, (list, tuple)) and item and all(isinstance(t, dict) for t in item) and "from" in item[0]:
        return {"conversations": list(item)}, None
    return item, None


def _as_list(images: Any) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


class ItemBuilder:
    """The per-item steps of one tokenization run (see the module docstring)."""

    def __init__(self, processor, *, mode: str, max_length: int | None, seed: int, no_size_ratio: float,
                 uncond_ratio: float, random_crop: bool, streamed: bool = False):
        self.processor, self.mode, self.max_length, self.seed = processor, mode, max_length, seed
        self.no_size_ratio, self.uncond_ratio, self.random_crop = no_size_ratio, uncond_ratio, random_crop
        self.streamed = streamed
        self.sep = processor.separator_token_id

    def prepare(self, row: Row) -> Item:
        """Structure and seeded choices (no image is read); raises `Skip`."""
        key = f"{self.seed}-{row.shard}-{row.index}" if self.streamed else f"{self.seed}-{row.index}"
        rng = random.Random(key)
        u_uncond, u_no_size = rng.random(), rng.random()
        item = Item(row.index, row.shard, key)
        if self.mode == CAPTION:
            cap = row.caption
            if not isinstance(cap, str) or not cap.strip():
                raise Skip(SKIP_MISSING_CAPTION, f"caption is {cap!r}")
            if row.image is None:
                raise Skip(SKIP_IMAGE_ERROR, "no image")
            item.caption = cap
            item.raw_images = [_resolve_image(row.image, row.base_dir)]
            item.uncond = u_uncond < self.uncond_ratio
            item.no_size = not item.uncond and u_no_size < self.no_size_ratio
            return item
        try:
            conv, beside = _split_conversation(row.conversation)
            turns, images = self.processor.normalize_conversation(conv, _as_list(beside) + _as_list(row.images))
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            raise Skip(SKIP_INVALID_ITEM, f"{type(err).__name__}: {err}") from None
        try:
            turns = self.processor._place_images(turns, len(images), f"item {row.index}")
        except ValueError as err:
            raise Skip(SKIP_IMAGE_COUNT, str(err)) from None
        item.turns = turns
        item.raw_images = [_resolve_image(im, row.base_dir) for im in images]
        # Unconditional share: items whose only image is the assistant's output (a text-to-image conversation).
        markers = [(role, text.count(IMAGE_MARKER)) for role, text in turns]
        only_output = len(images) == 1 and any(r == "assistant" and n == 1 for r, n in markers)
        item.uncond = only_output and u_uncond < self.uncond_ratio
        if item.uncond:
            item.turns = None
        return item

    def decode(self, item: Item) -> tuple[list[torch.Tensor] | tuple[str, str], float]:
        """The item's images as `(H, W, 3)` uint8 tensors at their buckets (run in worker processes), or
        `(reason, message)` when one cannot be used; and the seconds it took."""
        t0 = time.perf_counter()
        ip = self.processor.image_processor
        rng = random.Random(f"{item.key}-crop") if self.random_crop else None
        out = []
        for k, img in enumerate(item.raw_images):
            try:
                out.append(torch.from_numpy(ip.prepare_image(img, random_crop=self.random_crop, rng=rng, index=k)))
            except _IMAGE_ERRORS as err:
                return (SKIP_IMAGE_ERROR, f"{type(err).__name__}: {err}"), time.perf_counter() - t0
        return out, time.perf_counter() - t0

    def layout(self, item: Item) -> None:
        """The ids and labels with placeholder image spans; raises `Skip` for items that cannot be trained on."""
        spans = [self.processor.placeholder_ids(p.shape[0], p.shape[1]) for p in item.pixels]
        if item.uncond:  # the image alone, every token trained
            item.ids = list(spans[0]) + [self.sep]
            item.labels = list(item.ids)
        else:
            if self.mode == CAPTION:
                h, w = item.pixels[0].shape[:2]
                prompt = text_to_image_prompt(item.caption) if item.no_size else text_to_image_prompt(item.caption, w, h)
                if IMAGE_MARKER in prompt:
                    raise Skip(SKIP_IMAGE_COUNT, f"the caption contains {IMAGE_MARKER}")
                item.turns = [("user", prompt), ("assistant", IMAGE_MARKER)]
            item.ids, item.labels = self.processor.tokenize_conversation(item.turns, spans, f"item {item.index}")
        if all(lab == -100 for lab in item.labels):
            raise Skip(SKIP_NO_TRAINABLE, "no trainable token (the item needs an assistant turn)")
        if self.max_length is not None and len(item.ids) > self.max_length:
            raise Skip(SKIP_TOO_LONG, f"{len(item.ids)} tokens > max_length={self.max_length}")

    def finish(self, item: Item, grids: list[torch.Tensor]) -> tuple[list[int], list[int]]:
        """The final ids and labels: the images' code token ids over the placeholders."""
        ids, labels = fill_placeholders(item.ids, item.labels, grids, self.processor.image_placeholder_token_id)
        return ids.tolist(), labels.tolist()


class DecodeJobs(torch.utils.data.Dataset):
    """The items of one chunk for a `DataLoader`: its workers decode the images (`ItemBuilder.decode`)."""

    def __init__(self, builder: ItemBuilder, items: list[Item]):
        self.builder, self.items = builder, items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.builder.decode(self.items[i])


def keep_as_is(x):
    return x


def stack_pinned(pixels: list[torch.Tensor], pin: bool) -> torch.Tensor:
    """Stack same-size uint8 images into one batch, in page-locked memory when it goes to a GPU (a non-blocking copy)."""
    out = torch.empty((len(pixels), *pixels[0].shape), dtype=torch.uint8, pin_memory=pin)
    torch.stack(pixels, out=out)
    return out


class ChunkTokenizer:
    """One process's chunks: rows -> decoded images (worker processes) -> layout -> batched VQ encoding -> columns,
    then the chunk written; counts the time spent decoding, waiting and encoding."""

    def __init__(self, builder: ItemBuilder, vq_model, store: ChunkStore, features, *, device, batch_size, num_workers,
                 fail_after: int | None, bar):
        self.builder, self.vq_model, self.store, self.features = builder, vq_model, store, features
        self.device, self.batch_size, self.num_workers = device, batch_size, num_workers
        self.pin = device.type == "cuda"
        self.fail_after, self.bar = fail_after, bar
        self.written = 0
        self.timing = Counter()

    def _encode(self, items, keys, grids) -> None:
        t0 = time.perf_counter()
        batch = stack_pinned([items[i].pixels[k] for i, k in keys], self.pin)
        pixels = uint8_to_pixel_values(batch.to(self.device, non_blocking=self.pin))
        with torch.inference_mode():
            ids = self.vq_model.encode_images(pixels).cpu()
        for j, key in enumerate(keys):
            grids[key] = ids[j]
        self.timing["encode_seconds"] += time.perf_counter() - t0
        self.timing["encoder_calls"] += 1
        self.timing["images_encoded"] += len(keys)

    def _decoded(self, items):
        if self.num_workers == 0 or len(items) < 2:
            return (self.builder.decode(it) for it in items)
        loader = torch.utils.data.DataLoader(
            DecodeJobs(self.builder, items), batch_size=None, shuffle=False, num_workers=min(self.num_workers, len(items)),
            collate_fn=keep_as_is,
        )
        return iter(loader)

    def chunk(self, rows) -> tuple[dict, dict]:
        """Tokenize one chunk's rows: `(columns, report)`."""
        t_chunk = time.perf_counter()
        skipped, items = [], []
        for row in rows:
            try:
                items.append(self.builder.prepare(row))
            except Skip as s:
                skipped.append(s.record(row.index))
        pending: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        grids: dict[tuple[int, int], torch.Tensor] = {}
        ok = []
        decoded = self._decoded(items)
        for i, item in enumerate(items):
            t0 = time.perf_counter()
            result, seconds = next(decoded)
            self.timing["wait_seconds"] += time.perf_counter() - t0
            self.timing["decode_seconds"] += seconds
            if isinstance(result, tuple):
                skipped.append({"index": item.index, "reason": result[0], "message": result[1]})
                continue
            item.pixels = result
            try:
                self.builder.layout(item)
            except Skip as s:
                skipped.append(s.record(item.index))
                item.pixels = []
                continue
            ok.append(i)
            for k, px in enumerate(item.pixels):  # a batch is encoded as soon as it is full
                group = pending.setdefault(tuple(px.shape), [])
                group.append((i, k))
                if len(group) == self.batch_size:
                    self._encode(items, pending.pop(tuple(px.shape)), grids)
        for shape in list(pending):
            self._encode(items, pending.pop(shape), grids)
        columns: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "source_index": []}
        stats: Counter = Counter()
        for i in ok:
            item = items[i]
            ids, labels = self.builder.finish(item, [grids.pop((i, k)) for k in range(len(item.pixels))])
            item.pixels = []
            columns["input_ids"].append(ids)
            columns["labels"].append(labels)
            columns["length"].append(len(ids))
            columns["source_index"].append(item.index)
            stats["unconditional"] += item.uncond
            stats["no_size"] += item.no_size
            stats["tokens"] += len(ids)
        skipped.sort(key=lambda d: d["index"])
        self.timing["items"] += len(rows)
        self.timing["chunk_seconds"] += time.perf_counter() - t_chunk
        return columns, {"skipped": skipped, "stats": dict(stats), "rows_read": len(rows)}

    def save(self, name: str, columns: dict, report: dict) -> None:
        self.store.write(name, columns, report, self.features)
        self.written += 1
        if self.bar is not None:
            self.bar.update(report["rows_read"])
        if self.fail_after is not None and self.written >= self.fail_after:
            raise RuntimeError(f"fault injection: injected failure after {self.written} chunk(s).")


__all__ = [
    "SKIP_REASONS",
    "ChunkTokenizer",
    "DecodeJobs",
    "Item",
    "ItemBuilder",
    "Skip",
    "minimum_max_length",
    "stack_pinned",
    "with_target_size",
]
