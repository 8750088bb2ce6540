"""Raw training data -> a tokenized `datasets.Dataset` of `input_ids` / `labels` / `length` (images VQ-encoded once),
on one process or many.

`tokenize_dataset` is `lumina-hf tokenize` (one process) and `accelerate launch -m lumina_hf.tokenize` /
`torchrun -m lumina_hf.tokenize` (many: every process runs it with the same arguments). The source is cut into chunks
by position (`lumina_hf.training.chunks`); a map-style source's chunks are dealt to the processes in contiguous
blocks, a stream's shards likewise. Each process decodes images in `DataLoader` worker processes, VQ-encodes them in
batches of one bucket on its device (from page-locked memory on a GPU) and writes its chunks; the main process then
merges all chunks in source order, so the result, and its report of skipped items, do not depend on the number of
processes. A killed run resumes from its written chunks (with any number of processes); everything that identifies
the tokenization (`lumina_hf.training.identity`) must match, or the run stops before any work and says what differs.

The output holds only token columns (`input_ids`, `labels`, `length`, optionally `source_index`): a column named
`image`/`images` would switch TRL to its vision path. Bad items are skipped and counted by reason in
`output/tokenize_report.json`, never truncated.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections import Counter
from typing import Any

import torch

from . import identity as ident
from .chunks import (
    CONFIG_FILE,
    REPORT_FILE,
    RUN_FILE,
    SOURCE_FILES,
    ChunkStore,
    chunk_name,
    clean_stale,
    is_dataset_dir,
    merge_reports,
    output_features,
    read_json,
    remove_dataset_files,
    write_json,
)
from .items import SKIP_REASONS, ChunkTokenizer, ItemBuilder, minimum_max_length, with_target_size
from .sources import CAPTION, open_source

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
# Fault injection for tests: `k` or `rank:k` makes (that rank of) a run raise after writing k chunks.
FAIL_AFTER_ENV = "LUMINA_HF_TOKENIZE_FAIL_AFTER"


@dataclasses.dataclass
class TokenizeResult:
    """`dataset`: the tokenized `datasets.Dataset` (memory-mapped from `output_dir`); `report`: the dict written to
    `output_dir/tokenize_report.json` (counts, skipped items by reason, settings, per-process throughput)."""

    dataset: Any
    report: dict

    def __iter__(self):  # `dataset, report = tokenize_dataset(...)`
        return iter((self.dataset, self.report))


# ------------------------------------------------------------------------------------------------ processes
class _Processes:
    """Rank, world size and the few collectives a run needs; accelerate's state when launched distributed."""

    def __init__(self, device: str | None):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
            self.state = PartialState(cpu=cpu)
        self.rank = self.state.process_index if self.state else 0
        self.world = self.state.num_processes if self.state else 1
        self.is_main = self.rank == 0

    def device(self, device: str | None) -> torch.device:
        if device is not None:
            return torch.device(device)
        if self.state is not None and self.state.device.type != "cpu":
            return self.state.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def gather(self, obj) -> list:
        if self.state is None:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def agree(self, fn):
        """Run `fn` on the main process and hand its result (or its ValueError, raised everywhere) to all."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except ValueError as err:
                error = str(err)
        value, error = self.gather((result, error))[0]
        if error is not None:
            raise ValueError(error)
        return value


# ------------------------------------------------------------------------------------------------ checks
def _check_ratio(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
    return float(value)


def _check_positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _load_processor(processor, vq_path):
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
    return processor


def _start_over_hint() -> str:
    return "pass overwrite=True (CLI: --overwrite) to start over, or pick another output folder"


def _check_output(output: str, store: ChunkStore, config: dict, stats: dict | None, overwrite: bool):
    """What to do with `output` (main process): "new", "resume", or "done" (an identical finished dataset)."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"output {output!r} exists and is not a folder.")
    if not os.path.isdir(output) or not os.listdir(output):
        return "new"
    has_chunks = os.path.isdir(store.dir)
    if not has_chunks and not is_dataset_dir(output):
        raise ValueError(f"output {output!r} is a non-empty folder that is not a tokenized dataset: pick an empty or new folder.")
    if has_chunks:
        stored = read_json(os.path.join(store.dir, CONFIG_FILE)) if os.path.isfile(os.path.join(store.dir, CONFIG_FILE)) else None
        old_stats = ident.read_stats(os.path.join(store.dir, SOURCE_FILES))
        what = "chunks of an interrupted run"
    else:
        report = read_json(os.path.join(output, REPORT_FILE)) if os.path.isfile(os.path.join(output, REPORT_FILE)) else {}
        stored = report.get("config")
        from .chunks import FINAL_SOURCE_FILES

        old_stats = ident.read_stats(os.path.join(output, FINAL_SOURCE_FILES))
        what = "a tokenized dataset"
    if stored == config:
        return "resume" if has_chunks else "done"
    if overwrite:
        return "overwrite"
    differs = ident.config_differences(stored, config)
    files = ident.diff_stats(old_stats, stats) if old_stats is not None and stats is not None else ""
    raise ValueError(
        f"{output} holds {what} made with other settings or data (differs in: {ident.explain_differences(differs)}"
        + (f"; source files: {files}" if files else "")
        + "); rerun with the same model, processor, settings and data to "
        + ("resume" if has_chunks else "reuse it")
        + f", or {_start_over_hint()}."
    )


# ------------------------------------------------------------------------------------------------ the work
@dataclasses.dataclass
class _Work:
    """One process's share: map-style chunk numbers, or stream shards."""

    chunks: list[int] = dataclasses.field(default_factory=list)
    shards: list[int] = dataclasses.field(default_factory=list)


def _share(n: int, rank: int, world: int) -> list[int]:
    return list(range(n * rank // world, n * (rank + 1) // world))


def _fail_after(rank: int) -> int | None:
    value = os.environ.get(FAIL_AFTER_ENV)
    if not value:
        return None
    if ":" in value:
        r, k = value.split(":", 1)
        return int(k) if int(r) == rank else None
    return int(value)


# ------------------------------------------------------------------------------------------------ entry point
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
    streaming: bool = False,
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
            `.json`/`.jsonl` file (conversations), a `datasets.Dataset`/`DatasetDict`, a `save_to_disk` folder, or a
            stream: a `datasets.IterableDataset`, or a Hub id / folder of parquet shards with `streaming=True`.
        output_dir: where the dataset, `tokenize_report.json` and (while running) `_chunks/` go.
        vq_model: a `LuminaMGPTForConditionalGeneration` (only its VQGAN is used), anything with
            `encode_images(pixel_values) -> (B, H/16, W/16) token ids` and its VQGAN as `vqmodel`, or a model folder.
        processor: a `LuminaMGPTProcessor` or a folder; default: the `vq_model` folder.
        target_size: the bucket family (default: the processor's image processor `target_size`).
        max_length: longer items are skipped (`too_long`); it must fit one image of the largest bucket.
        image_column / caption_column / conversation_column / split: column names for dataset sources (a dataset
            with no `text` column but a `conversations`/`messages` column is read as conversations).
        streaming: open a path source with `load_dataset(..., streaming=True)` and work shard by shard.
        no_size_ratio: share of text-to-image items with the size-free prompt.
        uncond_ratio: share of single-output-image items written as the image alone (no BOS, no text; 0.1 in
            Lumina-mGPT 2.0).
        seed: per-item choices (and random crops) come from `random.Random(f"{seed}-{index}")`.
        random_crop: crop at a seeded random offset (training augmentation) instead of the centre.
        chunk_size: items per resumable chunk; batch_size: images per VQ forward; num_workers: image-decoding worker
            processes per process (default: up to 8 over the local processes; 0: decode in the main thread);
            device: where the VQGAN runs (default: the process's GPU when there is one).
        keep_source_index: keep the `source_index` column (the item's position in the source).
        overwrite: replace a finished dataset in `output_dir` (or chunks written with other settings or data).
        push_to_hub: a repo id (or a dict of `Dataset.push_to_hub` keyword arguments): upload the result as parquet
            shards.

    Returns:
        `TokenizeResult(dataset, report)`; the report is also written to `output_dir/tokenize_report.json`.
    """
    t0 = time.perf_counter()
    # ---------------- validation: everything that can fail fails here, before any work ----------------
    settings = {
        "max_length": None if max_length is None else _check_positive("max_length", max_length),
        "seed": seed,
        "no_size_ratio": _check_ratio("no_size_ratio", no_size_ratio),
        "uncond_ratio": _check_ratio("uncond_ratio", uncond_ratio),
        "random_crop": bool(random_crop),
        "chunk_size": _check_positive("chunk_size", chunk_size),
        "keep_source_index": bool(keep_source_index),
    }
    batch_size = _check_positive("batch_size", batch_size)
    procs = _Processes(None if device is None else str(device))
    num_workers = _check_workers(num_workers, procs.world)
    vq_path = _check_vq_model(vq_model)
    processor = with_target_size(_load_processor(processor, vq_path), target_size)
    src = open_source(source, image_column=image_column, caption_column=caption_column,
                      conversation_column=conversation_column, split=split, streaming=streaming, quiet=not progress)
    _check_source(src, procs.world, processor, settings["max_length"])
    if vq_path is not None:
        from .vq import load_vq_model

        vq_model = load_vq_model(vq_path)
    config = _agreed_config(procs, src, vq_model, processor, settings)

    output = os.path.abspath(os.fspath(output_dir))
    store = ChunkStore(output)
    decision = _prepare_output(procs, src, store, config, overwrite)
    if decision == "done":
        from datasets import load_from_disk

        logger.info("%s already holds this tokenization: nothing to do.", output)
        return TokenizeResult(load_from_disk(output), read_json(os.path.join(output, REPORT_FILE)))

    # ---------------- work: every process its share of the chunks ----------------
    run_device = procs.device(None if device is None else str(device))
    restore = _move_vq(vq_model, run_device, owned=vq_path is not None)
    builder = ItemBuilder(processor, mode=src.mode, max_length=settings["max_length"], seed=seed,
                          no_size_ratio=settings["no_size_ratio"], uncond_ratio=settings["uncond_ratio"],
                          random_crop=settings["random_crop"], streamed=src.streamed)
    from tqdm.auto import tqdm

    bar = tqdm(total=None if src.streamed else len(src), unit="item", desc="tokenize", disable=not progress or not procs.is_main)
    runner = ChunkTokenizer(builder, vq_model, store, output_features(keep_source_index), device=run_device,
                            batch_size=batch_size, num_workers=num_workers, fail_after=_fail_after(procs.rank),
                            bar=bar if procs.is_main else None)
    t_work = time.perf_counter()
    try:
        if src.streamed:
            _run_stream(src, runner, store, settings["chunk_size"], _share(src.num_shards, procs.rank, procs.world))
        else:
            _run_map(src, runner, store, settings["chunk_size"], procs, bar)
    finally:
        bar.close()
        if restore is not None:
            restore()
    everyone = procs.gather(_process_stats(procs.rank, run_device, runner, time.perf_counter() - t_work, num_workers))
    procs.barrier()

    # ---------------- report + final dataset (main process) ----------------
    if procs.is_main:
        report = _finish(src, store, config, everyone, settings["chunk_size"], run_device, max_shard_size, progress)
        dataset = report.pop("_dataset")
    procs.barrier()
    if not procs.is_main:
        from datasets import load_from_disk

        dataset, report = load_from_disk(output), read_json(os.path.join(output, REPORT_FILE))
    _log_result(procs, output, report, time.perf_counter() - t0)
    if push_to_hub and procs.is_main:
        kwargs = dict(push_to_hub) if isinstance(push_to_hub, dict) else {"repo_id": push_to_hub}
        if max_shard_size is not None:
            kwargs.setdefault("max_shard_size", max_shard_size)
        dataset.push_to_hub(**kwargs)
    return TokenizeResult(dataset, report)


def _check_workers(num_workers, world: int) -> int:
    if num_workers is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) or 1
        return max(0, min(8, (os.cpu_count() or 1) // local))
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}.")
    return num_workers


def _check_vq_model(vq_model) -> str | None:
    """The model folder, when `vq_model` is one."""
    if vq_model is None:
        raise ValueError("vq_model is required: a LuminaMGPTForConditionalGeneration or a model folder.")
    vq_path = os.fspath(vq_model) if isinstance(vq_model, (str, os.PathLike)) else None
    if vq_path is not None and not os.path.isdir(vq_path):
        raise ValueError(f"vq_model folder {vq_path!r} does not exist.")
    if vq_path is None and not callable(getattr(vq_model, "encode_images", None)):
        raise ValueError(f"vq_model must have an encode_images(pixel_values) method, got {type(vq_model).__name__}.")
    return vq_path


def _check_source(src, world: int, processor, max_length: int | None) -> None:
    if not src.streamed and len(src) == 0:
        raise ValueError("the source has no items.")
    if src.streamed and src.num_shards < world:
        if src.num_shards == 1:
            raise ValueError(
                f"the stream has 1 shard, which cannot be split over {world} processes: store it as several "
                "files (e.g. `Dataset.push_to_hub(..., num_shards=N)` or one `to_parquet` file per `ds.shard(N, i)`), "
                "load it with `data_files` listing them, or run one process."
            )
        logger.warning("the stream has %d shards for %d processes: some processes have no work.", src.num_shards, world)
    if max_length is not None:
        need = minimum_max_length(processor, text_to_image=src.mode == CAPTION)
        if max_length < need:
            raise ValueError(
                f"max_length={max_length} is too short for target_size={processor.image_processor.target_size}: one "
                f"image of its largest bucket plus the prompt needs {need} tokens. Use max_length >= {need} (or a "
                "smaller target size)."
            )


def _agreed_config(procs: _Processes, src, vq_model, processor, settings: dict) -> dict:
    """What identifies this tokenization (without the source files' digest, which the main process adds); the same
    on every process, or a ValueError on all of them before any work."""
    import json

    config = {
        "format_version": FORMAT_VERSION,
        "source": src.describe(),
        "vq_model": ident.vq_identity(vq_model),
        "processor": ident.processor_identity(processor),
        "target_size": processor.image_processor.target_size,
        **settings,
    }
    config = json.loads(json.dumps(config))  # the JSON round trip makes it comparable with the stored one
    configs = procs.gather(config)
    if any(c != configs[0] for c in configs):
        bad = next(r for r, c in enumerate(configs) if c != configs[0])
        raise ValueError(
            f"process {bad} was launched with other arguments, model or processor than process 0 (differs in: "
            f"{ident.explain_differences(ident.config_differences(configs[0], configs[bad]))}): launch every process "
            "with the same command."
        )
    return config


def _prepare_output(procs: _Processes, src, store: ChunkStore, config: dict, overwrite: bool) -> str:
    """Fingerprint the source files and decide what to do with the output (main process; the decision, or its
    ValueError, reaches every process); then the main process sets up `_chunks/` for the work."""
    output = store.output

    def main_checks():
        stats = ident.file_stats(ident.source_files(src))
        config["source"]["files_sha256"] = ident.stats_digest(stats)
        config["source"]["num_files"] = len(stats)
        return _check_output(output, store, config, stats, overwrite), config["source"]["files_sha256"], len(stats), stats

    decision, digest, n_files, file_table = procs.agree(main_checks)
    config["source"]["files_sha256"], config["source"]["num_files"] = digest, n_files
    if decision == "done":
        return decision
    if procs.is_main:
        if decision == "overwrite":
            if os.path.isdir(store.dir):
                shutil.rmtree(store.dir)
            if is_dataset_dir(output):
                remove_dataset_files(output)
        os.makedirs(store.dir, exist_ok=True)
        clean_stale(output)
        clean_stale(store.dir)
        if not os.path.isfile(os.path.join(store.dir, CONFIG_FILE)):
            ident.write_stats(os.path.join(store.dir, SOURCE_FILES), file_table)
            write_json(os.path.join(store.dir, CONFIG_FILE), config)
        run_path = os.path.join(store.dir, RUN_FILE)
        if os.path.isfile(run_path) and read_json(run_path).get("world_size") != procs.world:
            logger.info(
                "resuming chunks written by %s process(es) with %d: chunks belong to source positions, not processes, "
                "so the result is the same.", read_json(run_path).get("world_size"), procs.world,
            )
        write_json(run_path, {"world_size": procs.world})
    procs.barrier()
    return decision


def _log_result(procs: _Processes, output: str, report: dict, seconds: float) -> None:
    if report["num_skipped"] and procs.is_main:
        logger.warning(
            "skipped %d of %d items (%s); see %s for each item.", report["num_skipped"], report["num_source_items"],
            ", ".join(f"{r}: {c}" for r, c in report["skipped"].items()), os.path.join(output, REPORT_FILE),
        )
    logger.info(
        "rank %d: tokenized %d items into %s (%d written, %d tokens) in %.1f s (%s items/s).", procs.rank,
        report["num_source_items"], output, report["num_written"], report["num_tokens"], seconds,
        report["items_per_second"],
    )


def _move_vq(vq_model, device: torch.device, owned: bool):
    """Put the VQGAN on `device`; returns how to put a caller's model back (None when nothing moved)."""
    from .vq import vq_module

    module = vq_module(vq_model)
    if module is None:
        return None
    current = next(module.parameters()).device
    if current == device:
        return None
    (vq_model if owned and isinstance(vq_model, torch.nn.Module) else module).to(device)
    return None if owned else (lambda: module.to(current))


def _run_map(src, runner: ChunkTokenizer, store: ChunkStore, chunk_size: int, procs: _Processes, bar) -> None:
    n = len(src)
    total_chunks = (n + chunk_size - 1) // chunk_size
    done_items = sum(min(chunk_size, n - k * chunk_size) for k in range(total_chunks) if store.done(chunk_name(k)))
    if done_items:
        logger.info("resuming: %d of %d items already written.", done_items, n)
    bar.update(done_items)
    for k in _share(total_chunks, procs.rank, procs.world):
        name = chunk_name(k)
        if store.done(name):
            continue
        rows = src.rows(k * chunk_size, min(n, (k + 1) * chunk_size))
        columns, report = runner.chunk(rows)
        runner.save(name, columns, {**report, "shard": 0, "number": k, "last": k == total_chunks - 1})


def _run_stream(src, runner: ChunkTokenizer, store: ChunkStore, chunk_size: int, shards: list[int]) -> None:
    for shard in shards:
        first = 0
        while store.done(chunk_name(first, shard)):
            if store.report(chunk_name(first, shard))["last"]:
                break
            first += 1
        else:
            for number, rows in src.shard_chunks(shard, chunk_size, first):
                columns, report = runner.chunk(rows)
                runner.save(chunk_name(number, shard), columns,
                            {**report, "shard": shard, "number": number, "last": len(rows) < chunk_size})


def _process_stats(rank: int, device, runner: ChunkTokenizer, work_s: float, num_workers: int) -> dict:
    t = runner.timing
    busy = t["decode_seconds"] + t["encode_seconds"]
    return {
        "rank": rank,
        "device": str(device),
        "decode_workers": num_workers,
        "items": int(t["items"]),
        "chunks_written": runner.written,
        "seconds": round(work_s, 3),
        "items_per_second": round(t["items"] / work_s, 3) if work_s > 0 and t["items"] else None,
        "images_encoded": int(t["images_encoded"]),
        "encoder_calls": int(t["encoder_calls"]),
        "decode_seconds": round(t["decode_seconds"], 3),  # summed over the decoding workers
        "encode_seconds": round(t["encode_seconds"], 3),
        "wait_seconds": round(t["wait_seconds"], 3),  # the main thread waiting for decoded images
        "decode_share": round(t["decode_seconds"] / busy, 3) if busy else None,
        "encode_share": round(t["encode_seconds"] / busy, 3) if busy else None,
    }


def _chunk_order(src, store: ChunkStore, chunk_size: int) -> tuple[list[str], dict[str, int]]:
    """All chunk names in source order (a ValueError if one is missing) and each chunk's source-index offset."""
    if not src.streamed:
        n = len(src)
        names = [chunk_name(k) for k in range((n + chunk_size - 1) // chunk_size)]
        missing = [nm for nm in names if not store.done(nm)]
        if missing:
            raise ValueError(f"chunks {missing[:5]} are missing after the run: rerun the same command to finish them.")
        return names, {}
    names, offsets, before = [], {}, 0
    for shard in range(src.num_shards):
        number, rows = 0, 0
        while True:
            name = chunk_name(number, shard)
            if not store.done(name):
                raise ValueError(f"chunk {name} is missing after the run: rerun the same command to finish it.")
            rep = store.report(name)
            names.append(name)
            offsets[name] = before
            rows += rep["rows_read"]
            if rep["last"]:
                break
            number += 1
        before += rows
    return names, offsets


def _finish(src, store: ChunkStore, config: dict, processes: list[dict], chunk_size: int, device, max_shard_size,
            progress: bool) -> dict:
    names, offsets = _chunk_order(src, store, chunk_size)
    reports = [store.report(nm) for nm in names]
    for nm, rep in zip(names, reports):
        for s in rep["skipped"]:
            s["index"] += offsets.get(nm, 0)
    skipped, stats = merge_reports(reports)
    n = sum(rep["rows_read"] for rep in reports)
    by_reason = Counter(s["reason"] for s in skipped)
    items_now = sum(p["items"] for p in processes)
    seconds = max((p["seconds"] for p in processes), default=0.0)
    report = {
        "config": config,
        "num_source_items": n,
        "num_written": n - len(skipped),
        "num_skipped": len(skipped),
        "skipped": {r: by_reason[r] for r in SKIP_REASONS if by_reason[r]},
        "skipped_items": skipped,
        "num_unconditional": int(stats["unconditional"]),
        "num_no_size": int(stats["no_size"]),
        "num_tokens": int(stats["tokens"]),
        "device": str(device),
        "world_size": len(processes),
        "items_this_run": items_now,
        "seconds_this_run": round(seconds, 3),
        "items_per_second": round(items_now / seconds, 3) if seconds > 0 and items_now else None,
        "processes": processes,
    }
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    description = ident.describe_dataset(ident.dataset_identity(config))
    report["_dataset"] = store.finalize(names, offsets, {k: v for k, v in report.items() if k != "_dataset"},
                                        output_features(config["keep_source_index"]), description, save_kwargs, progress)
    return report


__all__ = ["FAIL_AFTER_ENV", "TokenizeResult", "tokenize_dataset"]
