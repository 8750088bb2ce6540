"""Tokenizing with several processes: real two-process launches (`torchrun -m lumina_hf.tokenize`, gloo on CPU) on a
few hundred synthetic images against the one-process result (rows, order, skip report), a process killed midway and
the run resumed (same launch, or one process), processes launched with different arguments, and a stream that
cannot be split."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import numpy as np
import PIL.Image
import pytest
from test_training_data import CountingVQ

from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor
from lumina_hf.training import tokenize_dataset
from lumina_hf.training import tokenize as tokenize_mod
from lumina_hf.training.chunks import ChunkStore
from lumina_hf.training.tokenize import FAIL_AFTER_ENV

TS = 64
N_IMAGES = 200
CHUNK = 16  # 13 chunks: 6 for rank 0, 7 for rank 1
RUN_KEYS = ("items_this_run", "seconds_this_run", "items_per_second", "processes", "device", "world_size")
SIZES = [(64, 64), (96, 48), (40, 120), (128, 40), (50, 50), (33, 70), (70, 70)]


def make_source(root) -> None:
    """N_IMAGES images with captions; every 23rd caption blank, every 31st image corrupt, every 37th too small."""
    os.makedirs(root, exist_ok=True)
    rows = []
    for i in range(N_IMAGES):
        w, h = (20, 20) if i % 37 == 36 else SIZES[i % len(SIZES)]
        path = os.path.join(root, f"{i:04d}.png")
        if i % 31 == 30:
            with open(path, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n broken")
        else:
            PIL.Image.fromarray(np.random.RandomState(i).randint(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        rows.append({"file_name": f"{i:04d}.png", "text": "" if i % 23 == 22 else f"picture {i}"})
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))


def launch(args: list[str], nproc: int = 2, env: dict | None = None, script: list[str] | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += script or ["-m", "lumina_hf.tokenize"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=900)


def cli_args(source, out) -> list[str]:
    return [str(source), "-o", str(out), "--model", "tiny-random", "--target-size", str(TS), "--chunk-size", str(CHUNK),
            "--num-workers", "1", "--device", "cpu", "--no-progress", "--uncond-ratio", "0.2", "--no-size-ratio", "0.3"]


def strip(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in RUN_KEYS}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenize-dist") / "data"
    make_source(root)
    return root


@pytest.fixture(scope="module")
def model():
    return build_tiny_model()  # what `--model tiny-random` builds


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory, model):
    """The one-process result, in this process (the same tiny model and processor as `--model tiny-random`)."""
    out = tmp_path_factory.mktemp("tokenize-dist") / "one"
    return tokenize_dataset(source, out, vq_model=model, processor=build_tiny_processor(TS), chunk_size=CHUNK,
                            num_workers=0, device="cpu", progress=False, uncond_ratio=0.2, no_size_ratio=0.3)


def written(out) -> tuple[list[str], int]:
    store = ChunkStore(str(out))
    names = sorted(n for n in os.listdir(store.dir) if store.done(n)) if os.path.isdir(store.dir) else []
    return names, sum(store.report(n)["rows"] for n in names)


def test_two_processes_give_the_one_process_dataset(source, reference, tmp_path):
    proc = launch(cli_args(source, tmp_path / "two"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ds = datasets.load_from_disk(str(tmp_path / "two"))
    with open(tmp_path / "two" / "tokenize_report.json") as f:
        report = json.load(f)
    assert ds[:] == reference.dataset[:]  # rows and order
    assert strip(report) == strip(reference.report)  # counts, skipped items by reason and index, settings
    assert report["skipped"] == {"image_error": 11, "missing_caption": 8}
    assert report["world_size"] == 2 and [p["rank"] for p in report["processes"]] == [0, 1]
    assert [p["items"] for p in report["processes"]] == [6 * CHUNK, N_IMAGES - 6 * CHUNK]  # both did their share
    assert all(p["items_per_second"] > 0 and p["decode_share"] is not None for p in report["processes"])
    assert proc.stdout.count("items written") == 1  # one summary line per launch


def test_killed_process_resumes_without_reencoding(source, reference, tmp_path):
    """Rank 0 dies after its first chunk (torchrun stops the other); the same command resumes: the result equals
    the uninterrupted run and the processes encode only the items of the chunks that were not written."""
    out = tmp_path / "out"
    killed = launch(cli_args(source, out), env={FAIL_AFTER_ENV: "0:1"})
    assert killed.returncode != 0 and "injected failure" in killed.stderr
    names, rows_before = written(out)
    assert "00000" in names and len(names) < 13 and not (out / "state.json").exists()
    resumed = launch(cli_args(source, out))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    with open(out / "tokenize_report.json") as f:
        report = json.load(f)
    assert datasets.load_from_disk(str(out))[:] == reference.dataset[:]
    assert strip(report) == strip(reference.report)
    encoded = sum(p["images_encoded"] for p in report["processes"])
    assert encoded == reference.report["num_written"] - rows_before  # one image per written item
    assert sum(p["items"] for p in report["processes"]) == N_IMAGES - sum(
        min(CHUNK, N_IMAGES - int(n) * CHUNK) for n in names
    )


def test_resume_with_another_number_of_processes(source, reference, model, tmp_path, caplog):
    """Chunks belong to source positions, not processes: a two-process run killed midway finishes in one process
    with the same result, and the chunks written are not encoded again."""
    out = tmp_path / "out"
    killed = launch(cli_args(source, out), env={FAIL_AFTER_ENV: "1:2"})
    assert killed.returncode != 0
    names, rows_before = written(out)
    assert len(names) >= 2
    counter = CountingVQ(model)
    with caplog.at_level("INFO"):
        result = tokenize_dataset(source, out, vq_model=counter, processor=build_tiny_processor(TS), chunk_size=CHUNK,
                                  num_workers=0, device="cpu", progress=False, uncond_ratio=0.2, no_size_ratio=0.3)
    assert "written by 2 process(es) with 1" in caplog.text
    assert result.dataset[:] == reference.dataset[:]
    assert strip(result.report) == strip(reference.report)
    assert counter.images == reference.report["num_written"] - rows_before


def test_processes_launched_with_different_arguments_are_refused(source, tmp_path):
    script = tmp_path / "launch_with_rank_seed.py"
    script.write_text(
        "import os, sys\nfrom lumina_hf.tokenize import main\n"
        "sys.exit(main(sys.argv[1:] + ['--seed', os.environ['RANK']]))\n"
    )
    proc = launch(cli_args(source, tmp_path / "out"), script=[str(script)])
    assert proc.returncode != 0
    assert "error: process 1 was launched with other arguments, model or processor than process 0 (differs in: seed)" in proc.stderr
    assert "launch every process with the same command" in proc.stderr
    assert "lumina_hf/training" not in proc.stderr  # one line per process, no traceback of ours (torchrun adds its own)
    assert not (tmp_path / "out").exists()


def test_a_stream_without_shards_cannot_be_split(tmp_path, model, monkeypatch):
    """Checked before any work, like the other launch problems (here without a launch: the check needs only the
    world size)."""
    folder = tmp_path / "one-shard"
    folder.mkdir()
    image = tmp_path / "a.png"
    PIL.Image.new("RGB", (64, 64), "red").save(image)
    ds = datasets.Dataset.from_dict({"image": [{"bytes": image.read_bytes(), "path": None}], "text": ["a"]})
    ds.cast_column("image", datasets.Image()).to_parquet(str(folder / "train.parquet"))

    class TwoProcesses(tokenize_mod._Processes):
        def __init__(self, device):
            self.state, self.rank, self.world, self.is_main = None, 0, 2, True

    monkeypatch.setattr(tokenize_mod, "_Processes", TwoProcesses)
    with pytest.raises(ValueError, match=r"the stream has 1 shard, which cannot be split over 2 processes: store it as "
                                         r"several files.*num_shards=N.*or run one process"):
        tokenize_dataset(folder, tmp_path / "out", streaming=True, vq_model=model, processor=build_tiny_processor(TS),
                         progress=False)
    assert not (tmp_path / "out").exists()
