"""Offline tokenization throughput: items/s of `python -m lumina_hf.tokenize` with 1 and 2 processes (torchrun, gloo,
one CPU thread per process) on synthetic images with the shipped nano VQGAN, at target sizes 64 and 128, and the
scaling efficiency `items/s(2) / (2 * items/s(1))`.

    python benchmarks/bench_tokenize.py                    # CPU table (best of --repeats runs per setting)
    python benchmarks/bench_tokenize.py --n 512 --repeats 3 --json out.json

items/s is the report's figure for the work loop (decode + VQ encode + write of this run's items, summed over the
processes; process start-up and the final merge are not in it); the wall column is the whole command. On a shared
machine the best of several runs is the least disturbed one.

`device_section(out, budget_s)` is the GPU part (for `benchmarks/device_check.py`, section "tokenize"): items/s of
`tokenize_dataset` in this process for the Chameleon-sized VQGAN (random weights) at target size 768, decoding in
worker processes and encoding from pinned memory, with the decode/encode time shares; it sizes its runs to fit
`budget_s`. Without datasets/TRL (as on the GPU machine) it measures the VQ encode alone.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import PIL.Image

SIZES = [(1.0, 1.0), (1.5, 1.0), (1.0, 1.5), (2.0, 1.0), (1.0, 2.0), (1.3, 1.1)]


def make_images(root: str, n: int, target: int, seed: int = 0) -> None:
    """`n` PNG images around `target` px with aspect ratios of several buckets, plus `metadata.jsonl`."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.RandomState(seed)
    rows = []
    for i in range(n):
        fw, fh = SIZES[i % len(SIZES)]
        w, h = int(target * fw * 1.1), int(target * fh * 1.1)
        PIL.Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, f"{i:05d}.png"))
        rows.append({"file_name": f"{i:05d}.png", "text": f"image {i}"})
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))


def run_cli(nproc: int, source: str, out: str, target: int, chunk: int, batch: int) -> dict:
    from lumina_hf.nano import nano_path

    folder = nano_path()
    args = [source, "-o", out, "--model", os.path.join(folder, "model"), "--processor", os.path.join(folder, "processor"),
            "--target-size", str(target), "--chunk-size", str(chunk), "--batch-size", str(batch), "--num-workers", "0",
            "--device", "cpu", "--no-progress", "--max-length", "100000"]
    launcher = [sys.executable, "-m", "lumina_hf.tokenize"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "lumina_hf.tokenize"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"tokenize with {nproc} process(es) failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "tokenize_report.json")) as f:
        report = json.load(f)
    return {"items_per_second": report["items_per_second"], "wall_seconds": round(wall, 2),
            "processes": report["processes"], "items": report["num_source_items"]}


def cpu_table(n: int, targets: list[int], repeats: int, chunk: int, batch: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in targets:
            source = os.path.join(tmp, f"src{target}")
            make_images(source, n, target)
            best = {}
            for nproc in (1, 2):
                runs = [run_cli(nproc, source, os.path.join(tmp, f"out{target}-{nproc}"), target, chunk, batch) for _ in range(repeats)]
                best[nproc] = max(runs, key=lambda r: r["items_per_second"])
                best[nproc]["all_items_per_second"] = [r["items_per_second"] for r in runs]
            rows.append({
                "target": target, "items": n,
                "items_per_second_1": best[1]["items_per_second"], "items_per_second_2": best[2]["items_per_second"],
                "wall_1": best[1]["wall_seconds"], "wall_2": best[2]["wall_seconds"],
                "scaling_efficiency": round(best[2]["items_per_second"] / (2 * best[1]["items_per_second"]), 3),
                "runs_1": best[1]["all_items_per_second"], "runs_2": best[2]["all_items_per_second"],
                "per_process_2": [p["items_per_second"] for p in best[2]["processes"]],
                "decode_share_1": best[1]["processes"][0]["decode_share"],
            })
    return rows


def _encode_only(vqgan, device: str, target: int, seconds: float, max_images: int, batch: int = 16) -> dict:
    """Images/s of the VQ encode alone (`encode_to_codes`) on `batch` random `target` x `target` images from pinned
    host memory, the codes read back: the device part of tokenization, measured without `tokenize_dataset`. Two
    warm-up batches, then batches for about `seconds` (at least 2, at most `max_images` images)."""
    import torch

    dev = torch.device(device)
    vqgan = vqgan.to(dev)
    g = torch.Generator().manual_seed(0)
    host = torch.rand((batch, 3, target, target), generator=g) * 2 - 1
    if dev.type == "cuda":
        host = host.pin_memory()

    def step():
        with torch.no_grad():
            codes = vqgan.encode_to_codes(host.to(dev, non_blocking=True))
        return codes.cpu()  # the read-back synchronizes

    for _ in range(2):  # warm-up: kernel selection, allocator
        codes = step()
    t0 = time.perf_counter()
    n = 0
    while n < 2 or (time.perf_counter() - t0 < seconds and (n + 1) * batch <= max_images):
        step()
        n += 1
    dt = time.perf_counter() - t0
    return {"images": n * batch, "batch": batch, "images_per_second": n * batch / dt,
            "seconds_per_image": round(dt / (n * batch), 5), "codes_shape": list(codes.shape)}


def device_section(out: dict, budget_s: float, device: str = "cuda", target: int = 768, vq_config: dict | None = None,
                   max_items: int = 2048, num_workers: int | None = None) -> dict:
    """GPU throughput of offline tokenization: `tokenize_dataset` in this process with the Chameleon-sized VQGAN
    (random weights, fp32) at target size 768, on the default CUDA device. Writes `out["tokenize"]`: a warm-up
    measurement, then one timed run (at most `max_items` items) sized to about half of what is left of `budget_s` (one
    chunk of 64 items at least, when that fits in what is left), reporting items/s, seconds per item decode (in worker
    processes) vs VQ encode, and the shares. The source images
    are a pool of 32 JPEGs repeated (each item is still decoded and encoded; making thousands would take longer than
    the measurement). Skips (with a reason) without CUDA or time. `tokenize_dataset` needs datasets and TRL
    (`lumina_hf.training` imports both): without them it writes the reason to `"skipped"` and measures the VQ encode
    alone (`"encode_only"`: images/s of `encode_to_codes` on batches of 16 from pinned memory).
    `device`, `target`, `vq_config` (fields of `LuminaMGPTVQConfig`) and `num_workers` (default: up to 8 decoding
    processes; 0 decodes in this process) exist to smoke-test it on a CPU."""
    import importlib.util

    import torch

    result: dict = {"setting": f"{'Chameleon-sized' if vq_config is None else 'small'} VQGAN (random weights), "
                               f"target {target}, batch 16, {device}" + (", pinned memory" if device == "cuda" else "")}
    out["tokenize"] = result
    t_start = time.perf_counter()
    if device == "cuda" and not torch.cuda.is_available():
        result["skipped"] = "no CUDA device"
        return out

    from lumina_hf.configuration_lumina_mgpt import LuminaMGPTVQConfig
    from lumina_hf.modeling_vqgan import LuminaMGPTVQGAN

    torch.manual_seed(0)
    config = LuminaMGPTVQConfig(**(vq_config or {}))
    vqgan = LuminaMGPTVQGAN._from_config(config).float().eval()
    missing = [name for name in ("datasets", "trl") if importlib.util.find_spec(name) is None]
    if missing:
        result["skipped"] = (f"{' and '.join(missing)} not installed: tokenize_dataset needs datasets and TRL "
                             "(lumina_hf.training imports them); the VQ encode alone was measured instead")
        left = budget_s - (time.perf_counter() - t_start)
        result["encode_only"] = _encode_only(vqgan, device, target, max(1.0, 0.5 * left), max_items)
        return out

    from datasets import Dataset, Image

    from lumina_hf.testing_utils import build_tiny_processor, tiny_vocabulary
    from lumina_hf.training import tokenize_dataset
    from lumina_hf.training.vq import VQImageEncoder
    from lumina_hf.unirep import image_code_table

    vq = VQImageEncoder(vqgan, image_code_table(tiny_vocabulary(), config.num_embeddings))
    processor = build_tiny_processor(target)
    rng = np.random.RandomState(0)
    pool = []
    for i in range(32):
        fw, fh = SIZES[i % len(SIZES)]
        buf = io.BytesIO()
        side = target * 1.1
        PIL.Image.fromarray(rng.randint(0, 256, (int(side * fh), int(side * fw), 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        pool.append(buf.getvalue())

    def images(k):
        return [{"bytes": pool[i % len(pool)], "path": None} for i in range(k)]

    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    with tempfile.TemporaryDirectory() as tmp:
        def run(k: int, name: str) -> dict:
            ds = Dataset.from_dict({"image": images(k), "text": [f"image {i}" for i in range(k)]}).cast_column("image", Image())
            rep = tokenize_dataset(ds, os.path.join(tmp, name), vq_model=vq, processor=processor, batch_size=16,
                                   chunk_size=64, num_workers=workers, device=device, progress=False,
                                   max_length=100000).report
            return rep["processes"][0]

        warm = run(32, "warm")
        result["warmup"] = {"items": warm["items"], "items_per_second": warm["items_per_second"]}
        left = budget_s - (time.perf_counter() - t_start)
        rate = warm["items_per_second"] or 0
        k = int(min(max_items, max(0, 0.5 * left * rate)) // 64 * 64)
        if k < 64 and rate and 64 / rate <= 0.8 * left:  # one chunk still fits in what is left
            k = 64
        if k < 64:
            result["skipped"] = f"budget: {left:.0f} s left after the warm-up"
            return out
        p = run(k, "timed")
        result.update({
            "items": p["items"], "items_per_second": p["items_per_second"], "decode_workers": p["decode_workers"],
            "decode_seconds_per_item": round(p["decode_seconds"] / p["items"], 5),
            "encode_seconds_per_item": round(p["encode_seconds"] / p["items"], 5),
            "wait_seconds": p["wait_seconds"], "decode_share": p["decode_share"], "encode_share": p["encode_share"],
        })
        if device == "cuda":
            result.update(gpu=torch.cuda.get_device_name(), peak_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="images per setting (default 256)")
    parser.add_argument("--targets", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; the best is reported")
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gpu-budget", type=float, default=0.0, help="also run device_section with this many seconds")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    rows = cpu_table(args.n, args.targets, args.repeats, args.chunk_size, args.batch_size)
    print(f"{'target':>6} {'items':>5} | {'1 proc items/s':>14} {'2 procs items/s':>15} | {'efficiency':>10} | wall 1 / 2 (s)")
    for r in rows:
        print(f"{r['target']:>6} {r['items']:>5} | {r['items_per_second_1']:>14.1f} {r['items_per_second_2']:>15.1f} | "
              f"{r['scaling_efficiency']:>10.2f} | {r['wall_1']:.1f} / {r['wall_2']:.1f}")
    results = {"cpu": rows, "cpu_count": os.cpu_count()}
    if args.gpu_budget:
        device_section(results, args.gpu_budget)
        print(json.dumps(results["tokenize"], indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
