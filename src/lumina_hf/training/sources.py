"""Raw training data as `datasets`, cut into resumable chunks.

Sources:
- an image folder with captions (the `datasets` imagefolder convention: images plus `metadata.jsonl`, `metadata.csv`
  or `metadata.parquet` with a `file_name` column and a caption column), read with `load_dataset("imagefolder")`:
  text-to-image items, in metadata order (the root's metadata first, then subfolders in name order);
- the original training JSON (a list of `{"conversations": [{"from", "value"}], "image": [paths]}` or chat
  `{"messages": [...], "images": [...]}` items; `.jsonl` too), read with `load_dataset("json")`; relative image paths
  are relative to the JSON file's folder;
- any `datasets.Dataset` (or a `save_to_disk` folder): caption mode with `image_column` + `caption_column`, or
  conversation mode with `conversation_column`;
- a stream: a `datasets.IterableDataset` (or a Hub id / local folder of parquet shards opened with `streaming=True`),
  read shard by shard, never whole.

Images are read undecoded (`Image(decode=False)`: a path or the file's bytes) so that they are decoded where the work
is done, with the image processor's pixel limit. A map-style source is cut into chunks of `chunk_size` rows numbered
over the whole source; a stream into chunks of `chunk_size` rows numbered within each of its shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

CAPTION, CONVERSATION = "caption", "conversation"
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


@dataclasses.dataclass
class Row:
    """One source item. `index`: its position in the source (map-style) or in its shard (streams)."""

    index: int
    shard: int = 0
    caption: Any = None  # caption mode
    image: Any = None  # caption mode
    conversation: Any = None  # conversation mode: the raw item
    images: Any = None  # conversation mode: images given beside the item (a dataset column)
    base_dir: str | None = None  # relative image paths are relative to this folder


@contextlib.contextmanager
def quiet_datasets(quiet: bool = True):
    """Silence `datasets`' own progress bars (ours covers the run)."""
    from datasets import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        yield
    finally:
        if quiet and not was_disabled:
            enable_progress_bars()


def _undecoded(ds, column: str | None):
    """`ds` with its image column (an `Image` feature, or a list of them) left as paths / bytes."""
    import datasets

    if column is None or ds.features is None or column not in ds.features:
        return ds
    feature = ds.features[column]
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(column, datasets.Image(decode=False))
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.Image) and inner.decode:
        return ds.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return ds


class Source:
    """A source as a `datasets` dataset in one of two modes: `caption` (text-to-image: `image_column` +
    `caption_column`) or `conversation` (`conversation_column`, + `image_column` for images beside each item)."""

    def __init__(self, ds, *, kind: str, image_column: str, caption_column: str, conversation_column: str | None,
                 path: str | None = None, base_dir: str | None = None, columns_hint: list[str] | None = None):
        import datasets

        self.kind, self.path, self.base_dir = kind, path, base_dir
        self.streamed = isinstance(ds, datasets.IterableDataset)
        cols = list(ds.column_names or ([] if ds.features is None else ds.features))
        shown = columns_hint or cols

        def need(col: str, what: str, flag: str):
            if col not in cols:
                raise ValueError(
                    f"the {'metadata' if kind == 'imagefolder' else 'dataset'} has no {what} column {col!r}; available "
                    f"columns: {sorted(shown) if kind == 'imagefolder' else shown}. Pass {flag}=... "
                    f"(CLI: --{flag.replace('_', '-')})."
                )

        if conversation_column is None and caption_column not in cols and caption_column == "text":
            conversation_column = next((c for c in ("conversations", "messages") if c in cols), None)
        if image_column not in cols and image_column == "image" and "images" in cols:
            image_column = "images"
        if conversation_column is not None:
            self.mode = CONVERSATION
            need(conversation_column, "conversation", "conversation_column")
            # a JSON item is all the keys it has (the JSON builder gives every row every key of the file)
            use = cols if kind == "json" else [conversation_column] + ([image_column] if image_column in cols else [])
        else:
            self.mode = CAPTION
            need(image_column, "image", "image_column")
            need(caption_column, "caption", "caption_column")
            use = [image_column, caption_column]
        self.image_column = image_column if image_column in cols else None
        self.caption_column, self.conversation_column = caption_column, conversation_column
        self.ds = _undecoded(ds.select_columns(use), self.image_column)
        self.num_shards = self.ds.num_shards if self.streamed else 1

    def __len__(self) -> int:
        if self.streamed:
            raise TypeError("a streamed source has no length.")
        return len(self.ds)

    # ------------------------------------------------------------------ rows
    def _row(self, record: dict, index: int, shard: int) -> Row:
        if self.mode == CAPTION:
            return Row(index, shard, caption=record[self.caption_column], image=record[self.image_column], base_dir=self.base_dir)
        item = record[self.conversation_column]
        if self.kind == "json":  # the JSON builder gives every item all keys; the item is the keys it has
            item = {k: v for k, v in record.items() if v is not None}
            images = None
        else:
            images = record.get(self.image_column) if self.image_column else None
        return Row(index, shard, conversation=item, images=images, base_dir=self.base_dir)

    def rows(self, start: int, stop: int) -> list[Row]:
        """Rows `start..stop-1` of a map-style source."""
        batch = self.ds[start:stop]
        keys = list(batch)
        return [self._row({k: batch[k][j] for k in keys}, start + j, 0) for j in range(stop - start)]

    def shard_rows(self, shard: int, start: int = 0) -> Iterator[Row]:
        """The rows of one shard of a stream from position `start` (earlier rows are read but not decoded)."""
        part = self.ds.shard(num_shards=self.num_shards, index=shard)
        if start:
            part = part.skip(start)
        for pos, record in enumerate(part, start):
            yield self._row(record, pos, shard)

    def shard_chunks(self, shard: int, chunk_size: int, first_chunk: int = 0) -> Iterator[tuple[int, list[Row]]]:
        """`(chunk number, rows)` of a stream shard from chunk `first_chunk` on; the last chunk may be short or empty
        (a shard whose length is a multiple of `chunk_size` ends with an empty chunk)."""
        it = self.shard_rows(shard, first_chunk * chunk_size)
        for number in itertools.count(first_chunk):
            rows = list(itertools.islice(it, chunk_size))
            yield number, rows
            if len(rows) < chunk_size:
                return

    # ------------------------------------------------------------------ identity
    def describe(self) -> dict:
        """What the source is (not its files: see `lumina_hf.training.identity.source_files`)."""
        out = {
            "type": self.kind,
            "mode": self.mode,
            "streamed": self.streamed,
            "image_column": self.image_column,
            "caption_column": self.caption_column if self.mode == CAPTION else None,
            "conversation_column": self.conversation_column,
            "path": os.path.abspath(self.path) if self.path and os.path.exists(self.path) else self.path,
        }
        if self.streamed:
            out["num_shards"] = self.num_shards
            out["features"] = str(self.ds.features)
        else:
            out["num_items"] = len(self.ds)
            if self.kind == "dataset" and not self.ds.cache_files:
                # an in-memory dataset has no files; `_fingerprint` is datasets' own content hash of it (no public
                # accessor exists). A dataset built with an unhashable transform gets a random one: resuming it then
                # asks for overwrite=True.
                out["fingerprint"] = getattr(self.ds, "_fingerprint", None)
        return out

    def image_refs(self) -> Iterator[tuple[str, Any]]:
        """Every image reference of a map-style source with its folder, for the file fingerprint."""
        if self.streamed or self.image_column is None and self.mode == CAPTION:
            return
        n = len(self.ds)
        for start in range(0, n, 4096):
            for row in self.rows(start, min(n, start + 4096)):
                if self.mode == CAPTION:
                    yield row.image, row.base_dir
                else:
                    yield from ((im, row.base_dir) for im in _conversation_images(row.conversation, row.images))


def _conversation_images(item: Any, beside: Any) -> list:
    out = []
    for value in (beside, item.get("image") if isinstance(item, dict) else None, item.get("images") if isinstance(item, dict) else None):
        if isinstance(value, (list, tuple)):
            out.extend(value)
        elif value is not None:
            out.append(value)
    messages = item.get("messages") if isinstance(item, dict) else item
    if isinstance(messages, (list, tuple)):
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, (list, tuple)):
                for part in content:
                    if isinstance(part, dict) and part.get("type") == "image":
                        out.extend(part[k] for k in ("image", "url", "path") if part.get(k) is not None)
    return out


def metadata_files(folder: str) -> list[str]:
    """The imagefolder metadata files under `folder`, the root's first, then subfolders in name order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        found.extend(os.path.join(root, f) for f in sorted(files) if f in METADATA_FILES)
    return found


def _metadata_columns(files: list[str]) -> list[str]:
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    cols: set[str] = set()
    for path in files:
        if path.endswith(".parquet"):
            cols.update(pyarrow.parquet.read_schema(path).names)
        elif path.endswith(".csv"):
            cols.update(pyarrow.csv.read_csv(path).column_names)
        else:
            cols.update(pyarrow.json.read_json(path).column_names)
    return sorted(cols)


def open_source(source, *, image_column: str = "image", caption_column: str = "text",
                conversation_column: str | None = None, split: str = "train", streaming: bool = False,
                quiet: bool = True) -> Source:
    """Any accepted source -> a `Source` (see the module docstring). ValueError names what is wrong."""
    import datasets

    cols = dict(image_column=image_column, caption_column=caption_column, conversation_column=conversation_column)

    def pick_split(obj, where):
        if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            if split not in obj:
                raise ValueError(f"{where} has no split {split!r}; available splits: {sorted(obj)}. Pass split=...")
            return obj[split]
        return obj

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict, datasets.IterableDataset, datasets.IterableDatasetDict)):
        return Source(pick_split(source, "the dataset"), kind="dataset", **cols)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"source must be a path (image folder, JSON file, saved dataset), a Hub dataset id with streaming=True, or "
            f"a datasets.Dataset / IterableDataset, got {type(source).__name__}."
        )
    path = os.fspath(source)
    with quiet_datasets(quiet):
        if streaming:
            try:
                ds = datasets.load_dataset(path, split=split, streaming=True)
            except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
                raise ValueError(f"could not stream {path!r} ({err}): give a Hub dataset id or a folder of parquet/webdataset shards.") from err
            return Source(ds, kind="stream", path=path, base_dir=path if os.path.isdir(path) else None, **cols)
        if not os.path.exists(path):
            raise ValueError(f"source {path!r} does not exist.")
        if os.path.isfile(path):
            if not path.endswith((".json", ".jsonl")):
                raise ValueError(f"source file {path!r} is not a .json or .jsonl training file.")
            return _open_json(path, cols)
        if any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
            ds = pick_split(datasets.load_from_disk(path), path)
            return Source(ds, kind="dataset", path=path, base_dir=os.path.dirname(os.path.abspath(path)), **cols)
        meta = metadata_files(path)
        if not meta:
            raise ValueError(
                f"{path} has no metadata file: an image folder needs one of {', '.join(METADATA_FILES)} with a "
                f"'file_name' column (the image path relative to the metadata file) and a caption column."
            )
        hint = _metadata_columns(meta)
        parts = []
        for file in meta:
            # One load per metadata file, concatenated in folder order: with several metadata files in one load,
            # datasets 5.2's imagefolder builder keeps them in a set and yields them in a different order each run.
            try:
                part = datasets.load_dataset("imagefolder", data_files=[file], split="train")
            except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
                raise ValueError(f"could not read the image folder metadata {file} ({err.__cause__ or err}).") from err
            if caption_column in hint and caption_column not in part.column_names:
                part = part.add_column(caption_column, [None] * len(part))
            keep = [c for c in ("image", caption_column) if c in part.column_names]
            parts.append(part.select_columns(keep))
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        return Source(ds, kind="imagefolder", path=path, columns_hint=hint, **cols)


def _open_json(path: str, cols: dict) -> Source:
    import datasets

    try:
        ds = datasets.load_dataset("json", data_files=os.path.abspath(path), split="train")
    except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
        cause = err.__cause__ or err
        raise ValueError(
            f"{path} could not be read as a list of training items ({type(cause).__name__}: {cause}). Each item must "
            'be an object like {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}], '
            '"image": [paths]} or {"messages": [...], "images": [...]}: fix or remove the items that are not.'
        ) from err
    names = ds.column_names
    conversation_column = cols["conversation_column"] or next((c for c in ("conversations", "messages") if c in names), None)
    if conversation_column is None:
        raise ValueError(
            f"{path} holds no conversations (its items have the keys {names}): each item needs 'conversations' or "
            "'messages'."
        )
    return Source(ds, kind="json", path=path, base_dir=os.path.dirname(os.path.abspath(path)),
                  image_column="image", caption_column=cols["caption_column"], conversation_column=conversation_column)


__all__ = ["CAPTION", "CONVERSATION", "METADATA_FILES", "Row", "Source", "metadata_files", "open_source", "quiet_datasets"]
