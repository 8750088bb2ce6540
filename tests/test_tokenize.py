"""Offline tokenization: streamed sources, the resume fingerprint (model, processor, arguments, source files) and the
tokenization identity that training checks. One process; `test_tokenize_distributed.py` launches several."""

from __future__ import annotations

import io
import json
import logging
import os

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from test_training_data import CachedVQ, CountingVQ, make_folder, make_image

import lumina_hf  # noqa: F401
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor
from lumina_hf.training import build_datasets, parse_recipe, tokenize_dataset
from lumina_hf.training.chunks import ChunkStore
from lumina_hf.training.identity import model_vq_sha256, read_dataset_identity, tokenizer_digest, vq_identity
from lumina_hf.training.tokenize import FAIL_AFTER_ENV

TS = 64
RUN_KEYS = ("items_this_run", "seconds_this_run", "items_per_second", "processes", "device", "world_size")


@pytest.fixture(scope="module")
def model():
    return build_tiny_model()


@pytest.fixture(scope="module")
def other_model():
    return build_tiny_model(seed=1)  # same architecture, other VQGAN weights


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(TS)


@pytest.fixture(scope="module")
def vq(model):
    return CachedVQ(model)


def same_result(a, b):
    """Equal tokenizations: the rows, and the report less what belongs to one run."""
    (da, ra), (db, rb) = a, b
    assert da[:] == db[:]
    strip = lambda r: {k: v for k, v in r.items() if k not in RUN_KEYS}  # noqa: E731
    assert strip(ra) == strip(rb)


def png(seed: int, w: int = 64, h: int = 64) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_parquet_shards(folder, sizes=(6, 5, 3)):
    """Parquet shards with an image column (bytes) and a caption column; item k of shard s has seed 100 s + k. One
    blank caption and one corrupt image are skipped."""
    os.makedirs(folder, exist_ok=True)
    for s, n in enumerate(sizes):
        images, texts = [], []
        for k in range(n):
            images.append({"bytes": b"not a png" if (s, k) == (1, 2) else png(100 * s + k, *[(64, 64), (96, 48), (40, 120)][k % 3]),
                           "path": None})
            texts.append("" if (s, k) == (0, 4) else f"shard {s} item {k}")
        ds = datasets.Dataset.from_dict({"image": images, "text": texts}).cast_column("image", datasets.Image())
        ds.to_parquet(os.path.join(folder, f"train-{s:05d}-of-{len(sizes):05d}.parquet"))


# ---------------------------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------------------------
def test_streamed_parquet_gives_the_rows_of_the_map_style_path(tmp_path, vq, processor):
    """A local parquet dataset read with `streaming=True` shard by shard (chunks of 3: shard 0 ends exactly on a chunk
    boundary) gives the rows, source indices and skip report of the same files read map-style."""
    write_parquet_shards(tmp_path / "pq")
    kw = dict(vq_model=vq, processor=processor, chunk_size=3, progress=False, num_workers=0)
    mapped = datasets.load_dataset("parquet", data_dir=str(tmp_path / "pq"), split="train")
    assert mapped.num_rows == 14
    ref = tokenize_dataset(mapped, tmp_path / "map", **kw)
    streamed = tokenize_dataset(tmp_path / "pq", tmp_path / "stream", streaming=True, **kw)
    assert streamed.dataset[:] == ref.dataset[:]
    assert streamed.report["skipped_items"] == ref.report["skipped_items"]
    assert [s["index"] for s in ref.report["skipped_items"]] == [4, 8]  # global indices: shard 1 starts at 6
    assert streamed.report["skipped"] == {"image_error": 1, "missing_caption": 1}
    assert streamed.report["config"]["source"]["streamed"] and streamed.report["config"]["source"]["num_shards"] == 3
    # an IterableDataset object works the same
    obj = datasets.load_dataset("parquet", data_dir=str(tmp_path / "pq"), split="train", streaming=True)
    again = tokenize_dataset(obj, tmp_path / "obj", **kw)
    assert again.dataset[:] == ref.dataset[:]


def test_streamed_run_resumes_by_shard_without_reencoding(tmp_path, vq, processor, monkeypatch):
    write_parquet_shards(tmp_path / "pq")
    kw = dict(processor=processor, chunk_size=3, progress=False, num_workers=0, streaming=True)
    full = tokenize_dataset(tmp_path / "pq", tmp_path / "full", vq_model=vq, **kw)
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")
    first = CountingVQ(vq)
    with pytest.raises(RuntimeError, match="injected failure after 2 chunk"):
        tokenize_dataset(tmp_path / "pq", tmp_path / "out", vq_model=first, **kw)
    written = ChunkStore(str(tmp_path / "out"))
    done = sorted(n for n in os.listdir(written.dir) if written.done(n))
    assert done == ["s00000-00000", "s00000-00001"]
    already = sum(written.report(n)["rows"] for n in done)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    second = CountingVQ(vq)
    resumed = tokenize_dataset(tmp_path / "pq", tmp_path / "out", vq_model=second, **kw)
    same_result(resumed, full)
    assert second.images == full.report["num_written"] - already  # written chunks are not encoded again
    assert resumed.report["processes"][0]["images_encoded"] == second.images


# ---------------------------------------------------------------------------------------------------------------
# The resume fingerprint: model, processor, arguments, source files
# ---------------------------------------------------------------------------------------------------------------
def interrupt_after_first_chunk(monkeypatch, run):
    real = ChunkStore.write

    def fail(self, name, *args, **kwargs):
        if name != "00000":
            raise KeyboardInterrupt("simulated kill")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(ChunkStore, "write", fail)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(ChunkStore, "write", real)


def folder_listing(path):
    return sorted((os.path.relpath(os.path.join(r, f), path), os.path.getmtime(os.path.join(r, f)))
                  for r, _, fs in os.walk(path) for f in fs)


def test_resume_with_another_model_is_refused(tmp_path, model, other_model, processor, monkeypatch):
    """Killed, then rerun with another --model: refused (it used to finish with rows from two VQGANs), nothing
    touched; the same model resumes."""
    make_folder(tmp_path / "data", n=6)
    kw = dict(processor=processor, chunk_size=2, progress=False, num_workers=0)
    interrupt_after_first_chunk(monkeypatch, lambda: tokenize_dataset(tmp_path / "data", tmp_path / "out", vq_model=CachedVQ(model), **kw))
    before = folder_listing(tmp_path / "out")
    never = CountingVQ(other_model, fail=True)
    with pytest.raises(ValueError, match=r"chunks of an interrupted run.*the VQGAN weights \(another --model\).*overwrite=True"):
        tokenize_dataset(tmp_path / "data", tmp_path / "out", vq_model=never, **kw)
    assert folder_listing(tmp_path / "out") == before and never.calls == 0
    resumed = tokenize_dataset(tmp_path / "data", tmp_path / "out", vq_model=CachedVQ(model), **kw)
    same_result(resumed, tokenize_dataset(tmp_path / "data", tmp_path / "ref", vq_model=CachedVQ(model), **kw))


def test_finished_dataset_with_another_model_is_refused(tmp_path, model, other_model, processor):
    """A finished dataset rerun with another model used to return the old data: refused; overwrite redoes it."""
    make_folder(tmp_path / "data", n=3)
    kw = dict(processor=processor, progress=False, num_workers=0)
    first = tokenize_dataset(tmp_path / "data", tmp_path / "out", vq_model=CachedVQ(model), **kw)
    with pytest.raises(ValueError, match=r"a tokenized dataset made with other settings.*VQGAN weights.*overwrite=True"):
        tokenize_dataset(tmp_path / "data", tmp_path / "out", vq_model=CountingVQ(other_model, fail=True), **kw)
    redone = tokenize_dataset(tmp_path / "data", tmp_path / "out", vq_model=CachedVQ(other_model), overwrite=True, **kw)
    assert redone.dataset["input_ids"] != first.dataset["input_ids"]
    assert redone.report["config"]["vq_model"] == vq_identity(other_model)


def test_changed_source_image_is_noticed(tmp_path, vq, processor, monkeypatch):
    """An image rewritten with other content (size / modification time) is named, for a finished dataset and for
    interrupted chunks."""
    items = make_folder(tmp_path / "data", n=4)
    kw = dict(vq_model=vq, processor=processor, chunk_size=2, progress=False, num_workers=0)
    tokenize_dataset(tmp_path / "data", tmp_path / "done", **kw)
    interrupt_after_first_chunk(monkeypatch, lambda: tokenize_dataset(tmp_path / "data", tmp_path / "part", **kw))
    changed = items[1][0]
    make_image(changed, 70, 64, seed=99)
    for out in ("done", "part"):
        with pytest.raises(ValueError, match=rf"the source files.*1 changed \({changed}\)"):
            tokenize_dataset(tmp_path / "data", tmp_path / out, **kw)
    redone = tokenize_dataset(tmp_path / "data", tmp_path / "part", overwrite=True, **kw)
    assert redone.report["num_written"] == 4


def test_processor_and_argument_changes_are_named(tmp_path, vq, processor):
    make_folder(tmp_path / "data", n=2)
    kw = dict(vq_model=vq, progress=False, num_workers=0)
    tokenize_dataset(tmp_path / "data", tmp_path / "out", processor=processor, **kw)
    strict = build_tiny_processor(TS)
    strict.image_processor.max_image_pixels = 10_000
    with pytest.raises(ValueError, match=r"processor\.image_processor\.max_image_pixels"):
        tokenize_dataset(tmp_path / "data", tmp_path / "out", processor=strict, **kw)
    with pytest.raises(ValueError, match=r"differs in: seed"):
        tokenize_dataset(tmp_path / "data", tmp_path / "out", processor=processor, seed=5, **kw)


def test_source_without_vq_weights_is_refused(tmp_path, processor, model):
    class Opaque:  # an encoder that does not show its weights cannot be identified
        def encode_images(self, pixel_values):
            return model.encode_images(pixel_values)

    make_folder(tmp_path / "data", n=1)
    with pytest.raises(ValueError, match="cannot identify the VQGAN"):
        tokenize_dataset(tmp_path / "data", tmp_path / "out", vq_model=Opaque(), processor=processor, progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Training refuses a dataset tokenized for another model
# ---------------------------------------------------------------------------------------------------------------
def test_training_refuses_a_dataset_of_another_model(tmp_path, model, other_model, processor, caplog):
    make_folder(tmp_path / "data", n=3)
    out = tokenize_dataset(tmp_path / "data", tmp_path / "tok", vq_model=CachedVQ(model), processor=processor,
                           progress=False, num_workers=0)
    stored = read_dataset_identity(datasets.load_from_disk(str(tmp_path / "tok")))
    assert stored == read_dataset_identity(out.dataset)
    assert stored["vqgan_sha256"] == vq_identity(model)["sha256"]
    assert stored["tokenizer_sha256"] == tokenizer_digest(processor.tokenizer)
    cfg = {
        "model_name_or_path": "tiny-random", "tiny_target_size": TS, "target_size": TS, "prompt_room": 128,
        "output_dir": str(tmp_path / "train"), "max_length": 512, "report_to": "none",
        "dataset_mixture": [{"path": str(tmp_path / "tok"), "weight": 1.0}],
    }
    recipe = parse_recipe(cfg)
    # the recipe runner reads the model folder's VQGAN digest before loading any weight
    model.save_pretrained(tmp_path / "model_a")
    other_model.save_pretrained(tmp_path / "model_b")
    digest_a, digest_b = model_vq_sha256(str(tmp_path / "model_a")), model_vq_sha256(str(tmp_path / "model_b"))
    assert digest_a == vq_identity(model)["sha256"] and digest_b == vq_identity(other_model)["sha256"] != digest_a
    train, _ = build_datasets(recipe.data, recipe.training, model.config, processor, digest_a)
    assert len(train) == 3
    with pytest.raises(ValueError, match=r"dataset_mixture\[0\].*another VQGAN weights.*allow_mismatch: true"):
        build_datasets(recipe.data, recipe.training, other_model.config, processor, digest_b)
    allowed = parse_recipe(cfg, ["--allow-mismatch"])
    assert allowed.data.allow_mismatch is True
    with caplog.at_level(logging.WARNING):
        train, _ = build_datasets(allowed.data, allowed.training, other_model.config, processor, digest_b)
    assert len(train) == 3 and "allowed by allow_mismatch" in caplog.text
    # through the recipe runner: the tiny-random model of seed 7 is not the one (seed 0) that tokenized the data
    from lumina_hf.training import run_recipe

    with pytest.raises(ValueError, match=r"another VQGAN weights"):
        run_recipe(parse_recipe({**cfg, "seed": 7, "max_steps": 1}))
    assert not (tmp_path / "train").exists()  # refused before the model loaded or anything was written
    # a dataset that records no identity (not made by `lumina-hf tokenize`) is not checked
    plain = datasets.Dataset.from_dict({"input_ids": out.dataset["input_ids"], "labels": out.dataset["labels"]})
    plain.save_to_disk(str(tmp_path / "plain"))
    recipe2 = parse_recipe({**cfg, "dataset_mixture": [{"path": str(tmp_path / "plain"), "weight": 1.0}]})
    assert len(build_datasets(recipe2.data, recipe2.training, other_model.config, processor, digest_b)[0]) == 3


def test_report_gives_throughput_and_time_shares(tmp_path, vq, processor):
    make_folder(tmp_path / "data", n=4)
    report = tokenize_dataset(tmp_path / "data", tmp_path / "out", vq_model=vq, processor=processor, progress=False,
                              num_workers=2, chunk_size=2).report
    (proc,) = report["processes"]
    assert proc["rank"] == 0 and proc["items"] == 4 and proc["decode_workers"] == 2 and proc["items_per_second"] > 0
    assert proc["decode_share"] + proc["encode_share"] == pytest.approx(1.0, abs=2e-3)
    assert proc["images_encoded"] == 4 and proc["encoder_calls"] >= 1
    assert report["world_size"] == 1 and json.load(open(tmp_path / "out" / "tokenize_report.json")) == report




def test_vq_model_from_a_folder_keeps_the_stored_weights():
    """The shipped nano folder records `dtype: bfloat16` in its VQGAN config while storing the encoder in fp32:
    `load_vq_model` used to build the VQGAN in bf16 and round the encoder on loading, so tokenization encoded with
    other weights than the model's own encoder."""
    from safetensors import safe_open

    from lumina_hf import LuminaMGPTForConditionalGeneration
    from lumina_hf.nano import WEIGHTS_DIR
    from lumina_hf.training import load_vq_model

    folder = os.path.join(WEIGHTS_DIR, "model")
    encoder = load_vq_model(folder)
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        for key, value in encoder.vqmodel.state_dict().items():
            stored = f.get_tensor(f"model.vqmodel.{key}")
            assert value.dtype == torch.float32 and torch.equal(value, stored.to(torch.float32)), key
    model = LuminaMGPTForConditionalGeneration.from_pretrained(folder)
    pixels = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(encoder.encode_images(pixels), model.encode_images(pixels))
    assert vq_identity(encoder) == vq_identity(model)  # what training compares
