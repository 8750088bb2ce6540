"""CPU tests for `lumina_hf.training.data` (offline tokenization into a training dataset) and `lumina-hf tokenize`.

Expected ids come from the processor itself (`processor(conversations=..., images=..., return_labels=True)` with its
placeholders filled by `tokenize_with_image_codes`), whose layout `tests/test_processing.py` checks against an
independent reference implementation. Small images at target size 64 keep the tiny VQGAN fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

import lumina_hf  # noqa: F401
from lumina_hf.processing_lumina_mgpt import text_to_image_prompt
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor
from lumina_hf.training.chunks import ChunkStore
from lumina_hf.training.vq import encode_image_spans, tokenize_with_image_codes
from lumina_hf.training import load_vq_model, minimum_max_length, tokenize_dataset

BOS, SEP, IMAGE_START = 0, 8710, 8197
TS = 64  # target size: buckets 128x32 ... 64x64 ... 32x128


@pytest.fixture(scope="module")
def model():
    return build_tiny_model()


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(TS)


class CachedVQ:
    """`encode_images` with a per-image cache (the tests encode the same synthetic images many times; the tiny VQGAN
    is the slow part of this file on a shared CPU)."""

    def __init__(self, model):
        self.model, self.cache = model, {}
        self.vqmodel = model.vqmodel  # the weights that identify the tokenization

    def encode_images(self, pixel_values):
        keys = [(tuple(p.shape), hashlib.sha1(p.numpy().tobytes()).hexdigest()) for p in pixel_values]
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            out = self.model.encode_images(pixel_values[missing])
            for j, i in enumerate(missing):
                self.cache[keys[i]] = out[j]
        return torch.stack([self.cache[k] for k in keys])


@pytest.fixture(scope="module")
def vq(model):
    return CachedVQ(model)


class CountingVQ:
    """Wraps a model's `encode_images`, counting calls and images (and optionally failing)."""

    def __init__(self, model, fail: bool = False):
        self.model, self.fail, self.calls, self.images = model, fail, 0, 0
        self.vqmodel = model.vqmodel

    def encode_images(self, pixel_values):
        if self.fail:
            raise AssertionError("encode_images must not be called")
        self.calls += 1
        self.images += pixel_values.shape[0]
        return self.model.encode_images(pixel_values)


def make_image(path, w, h, seed, mode="RGB"):
    rs = np.random.RandomState(seed)
    arr = rs.randint(0, 256, (h, w, 3), dtype=np.uint8)
    img = PIL.Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)
    return path


SIZES = [(64, 64), (96, 48), (40, 120), (128, 40), (50, 50), (33, 70)]


def make_folder(root, n=6, caption_key="text", fmt="jsonl"):
    """n images (some in a subfolder with its own metadata file) + metadata; returns [(path, caption)] in order."""
    items = []
    rows_root, rows_sub = [], []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        sub = i % 3 == 2
        rel = f"img_{i}.png"
        make_image(os.path.join(root, "sub" if sub else "", rel), w, h, seed=i)
        cap = f"a picture number {i}"
        (rows_sub if sub else rows_root).append({"file_name": rel, caption_key: cap, "extra": i})
    for folder, rows in ((root, rows_root), (os.path.join(root, "sub"), rows_sub)):
        if not rows:
            continue
        if fmt == "jsonl":
            with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        else:
            with open(os.path.join(folder, "metadata.csv"), "w") as f:
                f.write(f"file_name,{caption_key},extra\n")
                for r in rows:
                    f.write(f"{r['file_name']},{r[caption_key]},{r['extra']}\n")
    # the reader walks the root's metadata first, then subfolders in name order
    for folder, rows in ((root, rows_root), (os.path.join(root, "sub"), rows_sub)):
        items += [(os.path.join(folder, r["file_name"]), r[caption_key]) for r in rows]
    return items


def t2i_expected(processor, vq, path, caption, no_size=False):
    with PIL.Image.open(path) as im:
        w, h = processor.image_processor.select_bucket(*im.size)
    prompt = text_to_image_prompt(caption) if no_size else text_to_image_prompt(caption, w, h)
    conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "<|image|>"}]
    out = tokenize_with_image_codes(processor, vq, conversations=[conv], images=[[path]], return_labels=True, return_tensors=None)
    return out["input_ids"][0], out["labels"][0]


def check_schema(ds, keep_source_index=True):
    cols = ["input_ids", "labels", "length"] + (["source_index"] if keep_source_index else [])
    assert ds.column_names == cols
    assert not {"image", "images"} & set(ds.column_names)
    assert ds.features["input_ids"].feature.dtype == "int32"
    assert ds.features["labels"].feature.dtype == "int32"
    assert ds.features["length"].dtype == "int32"
    for row in ds:
        assert row["length"] == len(row["input_ids"]) == len(row["labels"])


# ---------------------------------------------------------------------------------------------------------------
# Sources give exactly the processor's ids
# ---------------------------------------------------------------------------------------------------------------
def test_imagefolder_matches_processor(tmp_path, vq, processor):
    items = make_folder(tmp_path / "data")
    ds, report = tokenize_dataset(tmp_path / "data", tmp_path / "out", vq_model=vq, processor=processor, progress=False)
    check_schema(ds)
    assert len(ds) == len(items) and report["num_written"] == len(items) and report["skipped"] == {}
    assert ds["source_index"] == list(range(len(items)))
    for row, (path, cap) in zip(ds, items):
        ids, labels = t2i_expected(processor, vq, path, cap)
        assert row["input_ids"] == ids
        assert row["labels"] == labels
    # on disk: a plain save_to_disk folder, the report and the source files' table, no chunks left
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["data-00000-of-00001.arrow", "dataset_info.json", "state.json", "tokenize_report.json",
         "tokenize_source_files.json.gz"]
    )
    assert datasets.load_from_disk(str(tmp_path / "out"))[:] == ds[:]
    with open(tmp_path / "out" / "tokenize_report.json") as f:
        assert json.load(f) == report


def test_imagefolder_csv_custom_caption_column(tmp_path, vq, processor):
    items = make_folder(tmp_path / "data", n=3, caption_key="prompt", fmt="csv")
    ds, _ = tokenize_dataset(
        tmp_path / "data", tmp_path / "out", vq_model=vq, processor=processor, caption_column="prompt",
        keep_source_index=False, progress=False,
    )
    check_schema(ds, keep_source_index=False)
    for row, (path, cap) in zip(ds, items):
        assert row["input_ids"] == t2i_expected(processor, vq, path, cap)[0]


def write_json_set(root):
    img = lambda name, w, h, s: make_image(os.path.join(root, "imgs", name), w, h, s)  # noqa: E731
    img("a.png", 64, 64, 1), img("b.png", 96, 40, 2), img("c.png", 40, 90, 3), img("d.png", 64, 64, 4)
    items = [
        {  # Omni multi-turn, two images: input image in the user turn, output image, then a text answer
            "conversations": [
                {"from": "human", "value": "<|image|> Depth estimation."},
                {"from": "gpt", "value": "<|image|>"},
                {"from": "human", "value": "Describe the image in detail."},
                {"from": "gpt", "value": "A noisy square."},
            ],
            "image": ["imgs/a.png", "imgs/b.png"],
        },
        {  # no marker: the image goes at the start of the first human turn
            "conversations": [{"from": "human", "value": "Describe the image in detail."}, {"from": "gpt", "value": "Noise."}],
            "image": ["imgs/c.png"],
        },
        {  # chat messages with an inline image part and one image beside
            "messages": [
                {"role": "user", "content": [{"type": "image", "path": "imgs/c.png"}, {"type": "text", "text": " Make it red."}]},
                {"role": "assistant", "content": "<|image|>"},
            ],
            "images": ["imgs/d.png"],
        },
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},  # text only
        {  # text-to-image conversation
            "conversations": [
                {"from": "human", "value": text_to_image_prompt("a cat", 64, 64)},
                {"from": "gpt", "value": "<|image|>"},
            ],
            "image": ["imgs/d.png"],
        },
    ]
    path = os.path.join(root, "train.json")
    with open(path, "w") as f:
        json.dump(items, f)
    return path, items


def absolutize(item, root):
    item = json.loads(json.dumps(item))
    fix = lambda p: os.path.join(root, p)  # noqa: E731
    for key in ("image", "images"):
        if key in item:
            item[key] = [fix(p) for p in item[key]]
    for m in item.get("messages", []):
        if isinstance(m["content"], list):
            for part in m["content"]:
                if "path" in part:
                    part["path"] = fix(part["path"])
    return item


def processor_ids(processor, vq, item):
    out = tokenize_with_image_codes(processor, vq, conversations=[item], return_labels=True, return_tensors=None)
    return out["input_ids"][0], out["labels"][0]


def test_json_multiturn_multiimage_matches_processor(tmp_path, vq, processor):
    root = str(tmp_path / "json")
    path, items = write_json_set(root)
    counter = CountingVQ(vq)
    ds, report = tokenize_dataset(path, tmp_path / "out", vq_model=counter, processor=processor, progress=False)
    check_schema(ds)
    assert report["num_written"] == len(items) == len(ds)
    for row, item in zip(ds, items):
        ids, labels = processor_ids(processor, vq, absolutize(item, root))
        assert row["input_ids"] == ids
        assert row["labels"] == labels
    # the multi-turn item: user image untrained, output image and text answer trained
    first = ds[0]
    assert first["labels"][: first["input_ids"].index(SEP) + 1] == [-100] * (first["input_ids"].index(SEP) + 1)
    assert IMAGE_START in first["labels"]
    # 6 images over the set, VQ-encoded in one batch per bucket
    assert counter.images == 6
    buckets = set()
    for name in "abcd":
        with PIL.Image.open(os.path.join(root, "imgs", f"{name}.png")) as im:
            buckets.add(processor.image_processor.select_bucket(*im.size))
    assert counter.calls == len(buckets) == 3


def test_dataset_source_custom_columns_and_saved_path(tmp_path, vq, processor):
    items = make_folder(tmp_path / "data", n=4)
    ds_in = datasets.Dataset.from_dict(
        {
            "picture": [PIL.Image.open(p) for p, _ in items],
            "prompt": [c for _, c in items],
            "image": ["not used"] * len(items),  # an unrelated column named like the default
        }
    ).cast_column("picture", datasets.Image())
    out, _ = tokenize_dataset(
        ds_in, tmp_path / "out", vq_model=vq, processor=processor, image_column="picture", caption_column="prompt",
        progress=False,
    )
    check_schema(out)
    for row, (path, cap) in zip(out, items):
        assert (row["input_ids"], row["labels"]) == t2i_expected(processor, vq, path, cap)
    # the same from a saved-to-disk path (and from a DatasetDict split)
    datasets.DatasetDict({"train": ds_in}).save_to_disk(str(tmp_path / "saved"))
    out2, _ = tokenize_dataset(
        tmp_path / "saved", tmp_path / "out2", vq_model=vq, processor=processor, image_column="picture",
        caption_column="prompt", progress=False,
    )
    assert out2[:] == out[:]


def test_dataset_conversation_column(tmp_path, vq, processor):
    root = str(tmp_path / "json")
    _, items = write_json_set(root)
    rows = [absolutize(it, root) for it in items if "conversations" in it]
    ds_in = datasets.Dataset.from_dict(
        {"conversations": [r["conversations"] for r in rows], "image": [r.get("image", []) for r in rows]}
    )
    out, _ = tokenize_dataset(ds_in, tmp_path / "out", vq_model=vq, processor=processor, progress=False)
    for row, item in zip(out, rows):
        assert (row["input_ids"], row["labels"]) == processor_ids(processor, vq, item)


# ---------------------------------------------------------------------------------------------------------------
# Unconditional / size-free shares, determinism
# ---------------------------------------------------------------------------------------------------------------
def test_uncond_and_no_size_shares_are_seeded(tmp_path, vq, processor):
    n = 12
    root = tmp_path / "data"
    items = []
    rows = []
    for i in range(n):
        items.append((make_image(str(root / f"{i}.png"), 64, 64, seed=i), f"caption {i}"))
        rows.append({"file_name": f"{i}.png", "text": f"caption {i}"})
    with open(root / "metadata.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    kw = dict(vq_model=vq, processor=processor, uncond_ratio=0.4, no_size_ratio=0.5, seed=3, chunk_size=5, progress=False)
    ds, report = tokenize_dataset(root, tmp_path / "out", **kw)
    n_uncond = n_no_size = 0
    for i, row in enumerate(ds):
        rng = random.Random(f"3-{i}")  # the documented per-item draw: uncond first, then no-size
        uncond, no_size = rng.random() < 0.4, rng.random() < 0.5
        path, cap = items[i]
        if uncond:
            n_uncond += 1
            span = encode_image_spans(processor, [path], vq)[0]
            assert row["input_ids"] == span + [SEP]
            assert row["input_ids"][0] == IMAGE_START and BOS not in row["input_ids"][:1]
            assert row["labels"] == row["input_ids"]
        else:
            n_no_size += no_size
            ids, labels = t2i_expected(processor, vq, path, cap, no_size=no_size)
            assert (row["input_ids"], row["labels"]) == (ids, labels)
            text = processor.tokenizer.decode(row["input_ids"][1 : row["input_ids"].index(SEP)])
            assert text.startswith("Generate an image according" if no_size else "Generate an image of 64x64 according")
    assert 0 < n_uncond < n and 0 < n_no_size  # both shares occur with this seed
    assert report["num_unconditional"] == n_uncond and report["num_no_size"] == n_no_size
    # same seed, other chunking -> identical; other seed -> other choices
    again, _ = tokenize_dataset(root, tmp_path / "again", **{**kw, "chunk_size": 256})
    assert again[:] == ds[:]
    other, _ = tokenize_dataset(root, tmp_path / "other", **{**kw, "seed": 4})
    assert other["input_ids"] != ds["input_ids"]


def test_random_crop_is_seeded_per_item(tmp_path, vq, processor):
    root = tmp_path / "data"
    rows = []
    for i in range(4):
        make_image(str(root / f"{i}.png"), 100, 40, seed=i)  # bucket 96x32 from 96x38: room to crop vertically
        rows.append({"file_name": f"{i}.png", "text": f"c{i}"})
    with open(root / "metadata.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    kw = dict(vq_model=vq, processor=processor, random_crop=True, seed=5, progress=False)
    a, _ = tokenize_dataset(root, tmp_path / "a", **kw)
    b, _ = tokenize_dataset(root, tmp_path / "b", **{**kw, "chunk_size": 1})
    centre, _ = tokenize_dataset(root, tmp_path / "c", **{**kw, "random_crop": False})
    assert a[:] == b[:]
    assert a["input_ids"] != centre["input_ids"]


def test_uncond_only_applies_to_single_output_image_conversations(tmp_path, vq, processor):
    root = str(tmp_path / "json")
    path, items = write_json_set(root)
    ds, report = tokenize_dataset(path, tmp_path / "out", vq_model=vq, processor=processor, uncond_ratio=1.0, progress=False)
    starts = [row["input_ids"][0] for row in ds]
    # only the text-to-image conversation (one image, in the assistant turn) becomes the image alone
    assert starts == [BOS, BOS, BOS, BOS, IMAGE_START]
    assert report["num_unconditional"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------
def test_resume_after_interruption(tmp_path, vq, processor, monkeypatch):
    make_folder(tmp_path / "data", n=6)
    kw = dict(processor=processor, chunk_size=2, uncond_ratio=0.3, no_size_ratio=0.3, progress=False)
    full, full_report = tokenize_dataset(tmp_path / "data", tmp_path / "full", vq_model=vq, **kw)

    real_save = ChunkStore.write

    def save_then_fail(self, name, *args, **kwargs):
        if name == "00001":
            raise KeyboardInterrupt("simulated interruption in chunk 2")
        return real_save(self, name, *args, **kwargs)

    monkeypatch.setattr(ChunkStore, "write", save_then_fail)
    first = CountingVQ(vq)
    with pytest.raises(KeyboardInterrupt):
        tokenize_dataset(tmp_path / "data", tmp_path / "out", vq_model=first, **kw)
    chunks = tmp_path / "out" / "_chunks"
    assert sorted(p for p in os.listdir(chunks) if not p.endswith((".json", ".json.gz"))) == ["00000"]
    assert first.images == 4  # chunk 1 written, chunk 2 encoded but not written

    # a rerun with other settings refuses to mix chunks
    with pytest.raises(ValueError, match="seed"):
        tokenize_dataset(tmp_path / "data", tmp_path / "out", vq_model=CountingVQ(vq, fail=True), **{**kw, "seed": 1})

    monkeypatch.setattr(ChunkStore, "write", real_save)
    second = CountingVQ(vq)
    resumed, report = tokenize_dataset(tmp_path / "data", tmp_path / "out", vq_model=second, **kw)
    assert second.images == 4  # chunks 2 and 3 only: chunk 1 is not re-encoded
    assert resumed[:] == full[:]
    assert not (tmp_path / "out" / "_chunks").exists()
    timing = ("items_this_run", "seconds_this_run", "items_per_second", "processes")
    assert {k: v for k, v in report.items() if k not in timing} == {k: v for k, v in full_report.items() if k not in timing}
    assert report["items_this_run"] == 4

    # running again when finished is a no-op; other settings need overwrite
    third = CountingVQ(vq, fail=True)
    again, _ = tokenize_dataset(tmp_path / "data", tmp_path / "out", vq_model=third, **kw)
    assert again[:] == full[:]
    with pytest.raises(ValueError, match="overwrite"):
        tokenize_dataset(tmp_path / "data", tmp_path / "out", vq_model=third, **{**kw, "max_length": 2000})
    redone, _ = tokenize_dataset(tmp_path / "data", tmp_path / "out", vq_model=vq, overwrite=True, **{**kw, "seed": 9})
    assert len(redone) == 6 and redone[:] != full[:]


# ---------------------------------------------------------------------------------------------------------------
# Bad items and bad input
# ---------------------------------------------------------------------------------------------------------------
def test_bad_items_are_skipped_and_counted(tmp_path, vq, processor):
    root = tmp_path / "data"
    make_image(str(root / "good0.png"), 64, 64, 0)
    make_image(str(root / "good1.png"), 48, 96, 1)
    make_image(str(root / "tiny.png"), 20, 20, 2)  # under min_side
    make_image(str(root / "pal.png"), 64, 64, 3, mode="P")  # palette: fine
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    max_length = minimum_max_length(processor) + 30
    rows = [
        {"file_name": "good0.png", "text": "ok"},  # 0
        {"file_name": "corrupt.png", "text": "corrupt"},  # 1 image_error
        {"file_name": "missing.png", "text": "missing"},  # 2 image_error
        {"file_name": "tiny.png", "text": "too small"},  # 3 image_error
        {"file_name": "good1.png", "text": "x" * 200},  # 4 too_long
        {"file_name": "good1.png"},  # 5 missing_caption
        {"file_name": "good1.png", "text": "   "},  # 6 missing_caption
        {"file_name": "pal.png", "text": "has a <|image|> marker"},  # 7 image_count_mismatch
        {"file_name": "pal.png", "text": "palette"},  # 8
    ]
    with open(root / "metadata.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    counter = CountingVQ(vq)
    ds, report = tokenize_dataset(root, tmp_path / "out", vq_model=counter, processor=processor, max_length=max_length, progress=False)
    assert ds["source_index"] == [0, 8]
    assert counter.images == 2  # skipped items are never encoded
    assert report["skipped"] == {"image_error": 3, "missing_caption": 2, "image_count_mismatch": 1, "too_long": 1}
    assert report["num_skipped"] == 7 and report["num_written"] == 2
    assert [s["index"] for s in report["skipped_items"]] == [1, 2, 3, 4, 5, 6, 7]
    assert all(s["message"] for s in report["skipped_items"])
    assert max(ds["length"]) <= max_length

    # conversation-level problems
    make_image(str(tmp_path / "j" / "a.png"), 64, 64, 0)
    items = [
        {"conversations": [{"from": "human", "value": "<|image|> <|image|> two markers"}, {"from": "gpt", "value": "x"}], "image": ["a.png"]},
        {"conversations": [{"from": "human", "value": "only a question"}], "image": []},
        {"conversations": [{"from": "system", "value": "sys"}, {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "<|image|> fine"}, {"from": "gpt", "value": "yes"}], "image": ["a.png"]},
        {"conversations": []},  # no turns
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": None}]},
    ]
    with open(tmp_path / "j" / "train.json", "w") as f:
        json.dump(items, f)
    ds, report = tokenize_dataset(tmp_path / "j" / "train.json", tmp_path / "out2", vq_model=vq, processor=processor, progress=False)
    assert ds["source_index"] == [3]
    assert report["skipped"] == {"image_count_mismatch": 1, "no_trainable_token": 1, "invalid_item": 3}
    # an item that is not an object makes the file unreadable as a dataset: one clear error before any work
    with open(tmp_path / "j" / "bad.json", "w") as f:
        json.dump(items[:4] + [42], f)
    never = CountingVQ(vq, fail=True)
    with pytest.raises(ValueError, match=r"bad.json could not be read as a list of training items.*fix or remove"):
        tokenize_dataset(tmp_path / "j" / "bad.json", tmp_path / "out3", vq_model=never, processor=processor, progress=False)
    assert not (tmp_path / "out3").exists()


def test_bad_input_raises_before_any_work(tmp_path, vq, processor):
    make_folder(tmp_path / "data", n=2)
    never = CountingVQ(vq, fail=True)
    out = tmp_path / "out"

    def run(source=tmp_path / "data", **kw):
        kw = {"vq_model": never, "processor": processor, "progress": False, **kw}
        return tokenize_dataset(source, out, **kw)

    with pytest.raises(ValueError, match=r"caption column 'caption'.*available columns: \['extra', 'file_name', 'text'\]"):
        run(caption_column="caption")
    ds_in = datasets.Dataset.from_dict({"img": ["x.png"], "text": ["a"]})
    with pytest.raises(ValueError, match=r"no image column 'image'; available columns: \['img', 'text'\]"):
        run(ds_in)
    with pytest.raises(ValueError, match="no caption column 'prompt'"):
        run(ds_in, image_column="img", caption_column="prompt")
    need = minimum_max_length(processor)
    with pytest.raises(ValueError, match=f"max_length=50 is too short.*needs {need} tokens"):
        run(max_length=50)
    with pytest.raises(ValueError, match="does not exist"):
        run(tmp_path / "nope")
    with pytest.raises(ValueError, match="target_size=100 is not supported"):
        run(target_size=100)
    with pytest.raises(ValueError, match="target_size=8192 is not supported"):
        run(target_size=8192)  # its widest bucket needs more size units than the size tokens carry
    with pytest.raises(ValueError, match="uncond_ratio"):
        run(uncond_ratio=1.5)
    make_image(str(tmp_path / "no_meta" / "a.png"), 64, 64, 0)
    with pytest.raises(ValueError, match="no metadata file"):
        run(tmp_path / "no_meta")
    with pytest.raises(ValueError, match="not a .json"):
        run(tmp_path / "data" / "img_0.png")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a tokenized dataset"):
        tokenize_dataset(tmp_path / "data", tmp_path / "foreign", vq_model=never, processor=processor)
    assert not out.exists()
    assert never.calls == 0


def test_minimum_max_length_at_published_sizes():
    proc = build_tiny_processor(512)
    # the tallest bucket (256x1024: 64 rows of 16 codes + row ends) is the longest UniRep span: 64 * 17 + 4
    assert minimum_max_length(proc, text_to_image=False) == 1092 + 3
    assert minimum_max_length(proc, target_size=768, text_to_image=False) == 96 * 25 + 4 + 3
    t2i = minimum_max_length(proc)
    assert t2i > 1095 and t2i - 1095 == max(
        len(proc.tokenizer(text_to_image_prompt("", w, h), add_special_tokens=False)["input_ids"])
        for w, h in proc.image_processor.bucket_sizes
    )


# ---------------------------------------------------------------------------------------------------------------
# Loading the VQ model from a folder, CLI
# ---------------------------------------------------------------------------------------------------------------
def test_vq_model_from_folder(tmp_path, model, processor):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    vq = load_vq_model(folder)
    px = torch.rand(2, 3, 64, 32) * 2 - 1
    assert torch.equal(vq.encode_images(px), model.encode_images(px))
    make_folder(tmp_path / "data", n=2)
    a, _ = tokenize_dataset(tmp_path / "data", tmp_path / "a", vq_model=folder, progress=False)  # processor from the folder
    b, _ = tokenize_dataset(tmp_path / "data", tmp_path / "b", vq_model=model, processor=processor, progress=False)
    assert a[:] == b[:]

    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "vqmodel" not in k}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no complete VQGAN"):
        load_vq_model(folder)


def test_cli_tokenize(tmp_path, capsys):
    from lumina_hf.cli import main

    make_folder(tmp_path / "data", n=2)
    out = tmp_path / "out"
    rc = main(["tokenize", str(tmp_path / "data"), "-o", str(out), "--model", "tiny-random", "--target-size", "64", "--no-progress"])
    assert rc == 0
    assert "2 of 2 items written" in capsys.readouterr().out
    ds = datasets.load_from_disk(str(out))
    assert ds.column_names == ["input_ids", "labels", "length", "source_index"] and len(ds) == 2
    with pytest.raises(SystemExit, match="error: .*caption column 'nope'"):
        main(["tokenize", str(tmp_path / "data"), "-o", str(tmp_path / "o2"), "--model", "tiny-random", "--caption-column", "nope"])
