"""Memory-saving modes side by side: peak memory (measured and as `lumina_hf.memory_estimate` predicts it), seconds per
image, and quality against the unquantized model on fixed seeds (token agreement of the image codes, PSNR of the
decoded pixels).

    python benchmarks/bench_memory.py                  # CPU: the nano model, 96x96, every mode that runs on a CPU

CPU measurement: each mode runs in a fresh process, with glibc serving allocations over 64 KiB by mmap
(MALLOC_MMAP_THRESHOLD_) so freed tensors leave the resident set (RSS). "loading" is the RSS high-water mark's growth
from before the model is loaded to just after; "generating" resets the kernel's high-water mark once the model is
loaded (/proc/self/clear_refs) and reports its growth over the pre-load RSS after the last image: the held weights
plus the generation's transients, what the planner predicts.

GPU: `device_section(...)` (called by benchmarks/device_check.py, section "memory") runs the same modes for a randomly
initialised model of the published 7B config, with `torch.cuda.max_memory_allocated` as the peak; with `device="cpu"`
and a tiny config it smoke-tests the same code on a CPU (no peak measured there).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

MODES_CPU = ["fp32", "bf16", "int8", "int4", "sequential_offload", "device_map_cpu_disk"]
CAPTIONS = ["a red circle on a blue background", "a green square on a white background",
            "a yellow triangle on a black background", "a blue circle on a red background"]

CHILD = r"""
import gc, json, os, resource, sys, tempfile, time
import numpy as np, psutil, torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
import lumina_hf
from lumina_hf import LuminaMGPTForConditionalGeneration, LuminaMGPTPipeline, memory_estimate, text_to_image_prompt
from lumina_hf.nano import load_nano_pipeline, nano_path
mode, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
captions = json.loads(sys.argv[4])
gc.collect()
base = psutil.Process().memory_info().rss
t0 = time.perf_counter()
kw = {}
if mode == "bf16":
    kw["dtype"] = torch.bfloat16
if mode == "int8":
    from lumina_hf.quantization import pipeline_quantization_config
    kw["quantization_config"] = pipeline_quantization_config("int8")
if mode == "device_map_cpu_disk":
    ref = LuminaMGPTForConditionalGeneration.from_pretrained(nano_path(), subfolder="model", dtype=torch.float32)
    layer = sum(p.numel() * 4 for p in ref.model.layers[0].parameters())
    n = ref.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.norm": "disk", "model.rotary_emb": "cpu", "model.vqmodel": "cpu", "lm_head": "disk"}
    device_map.update({f"model.layers.{i}": ("cpu" if i < n // 2 else "disk") for i in range(n)})
    del ref
    gc.collect()
    kw["model"] = LuminaMGPTForConditionalGeneration.from_pretrained(
        nano_path(), subfolder="model", dtype=torch.float32, device_map=device_map, offload_folder=tempfile.mkdtemp())
pipe = load_nano_pipeline(**kw)
if mode == "sequential_offload":
    from accelerate import cpu_offload
    cpu_offload(pipe.model, execution_device=torch.device("cpu"))
pipe.set_progress_bar_config(disable=True)
load_s = time.perf_counter() - t0
load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
gc.collect()
with open("/proc/self/clear_refs", "w") as fh:  # reset the kernel's peak RSS (VmHWM): loading transients end here
    fh.write("5")
t0 = time.perf_counter()
latents, pixels = [], []
with torch.no_grad():
    for i, caption in enumerate(captions):
        g = [torch.Generator().manual_seed(1000 + i)]
        img = pipe(caption, height=size, width=size, generator=g, num_candidates=1, output_type="pt").images
        pixels.append(img[0].numpy())
        g = [torch.Generator().manual_seed(1000 + i)]
        latents.append(pipe(caption, height=size, width=size, generator=g, num_candidates=1, output_type="latent").images[0].numpy())
gen_s = (time.perf_counter() - t0) / (2 * len(captions))
with open("/proc/self/status") as fh:
    hwm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
peak = hwm - base
cfg = pipe.model.config
prompt = len(pipe.processor(text=text_to_image_prompt(captions[0], size, size), return_tensors=None)["input_ids"][0])
dtype = torch.bfloat16 if mode == "bf16" else torch.float32
q = "int8" if mode == "int8" else None
est = memory_estimate(cfg, size, size, 1, dtype, q, guidance=False, prompt_length=prompt)
np.savez(out, latents=np.stack(latents), pixels=np.stack(pixels))
print(json.dumps({"peak": peak, "load_peak": load_peak, "predicted": est.peak, "s_per_image": gen_s, "load_s": load_s}))
"""


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def run_cpu_mode(mode: str, size: int, captions: list[str], threads: int) -> dict:
    import importlib.util

    if mode == "int4":
        return {"mode": mode, "note": "not run: torchao int4 weight-only (Int4WeightOnlyConfig) has no CPU kernels"}
    if mode == "int8" and importlib.util.find_spec("torchao") is None:
        return {"mode": mode, "note": 'not run: torchao missing (pip install "lumina-hf[quantization]")'}
    out = os.path.join(tempfile.mkdtemp(), f"{mode}.npz")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "BENCH_THREADS": str(threads)}
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(size), out, json.dumps(captions)],
                         capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        return {"mode": mode, "note": "failed: " + res.stderr.strip().splitlines()[-1]}
    row = json.loads(res.stdout.strip().splitlines()[-1])
    data = np.load(out)
    row.update(mode=mode, latents=data["latents"], pixels=data["pixels"])
    return row


def cpu_table(size=96, modes=MODES_CPU, captions=CAPTIONS, threads=2) -> list[dict]:
    rows = [run_cpu_mode(m, size, captions, threads) for m in modes]
    ref = next(r for r in rows if r["mode"] == "fp32")
    for r in rows:
        if "latents" in r:
            r["token_agreement"] = float((r["latents"] == ref["latents"]).mean())
            r["psnr_db"] = psnr(r["pixels"], ref["pixels"])
    return rows


def format_rows(rows: list[dict], unit=2**20, unit_name="MiB") -> str:
    lines = [f"| mode | peak {unit_name} generating (measured) | peak {unit_name} (planner) | peak {unit_name} loading | "
             "s / image | token agreement | PSNR dB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['mode']} | {r['note']} | | | | | |")
            continue
        p = "inf" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.1f}"
        lines.append(f"| {r['mode']} | {r['peak'] / unit:.1f} | {r['predicted'] / unit:.1f} | {r['load_peak'] / unit:.1f} | "
                     f"{r['s_per_image']:.2f} | "
                     f"{r['token_agreement']:.3f} | {p} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- GPU
GPU_MODES = ("bf16", "int8", "int4", "model_offload", "sequential_offload", "device_map_2way")


def _config_7b():
    from lumina_hf import LuminaMGPTConfig

    return LuminaMGPTConfig(vocab_size=65536, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=5120)


def _mode_unavailable(mode: str, device: torch.device) -> str | None:
    """Why `mode` cannot run here (a package is missing, or it needs a CUDA device), or None."""
    import importlib.util

    if mode not in GPU_MODES:
        return f"unknown mode {mode!r} (modes: {', '.join(GPU_MODES)})"
    if mode == "int4" and device.type != "cuda":
        return "torchao int4 weight-only (Int4WeightOnlyConfig) needs a CUDA device"
    if mode in ("int8", "int4") and importlib.util.find_spec("torchao") is None:
        return 'torchao is not installed (pip install "lumina-hf[quantization]")'
    if mode in ("model_offload", "sequential_offload", "device_map_2way"):
        if device.type != "cuda":
            return "offloads to a CUDA device: needs one"
        if importlib.util.find_spec("accelerate") is None:
            return "accelerate is not installed (pip install accelerate)"
    return None


def device_section(size: int = 768, batch_size: int = 1, modes=GPU_MODES, seeds=(0, 1),
                   max_steps: int | dict | None = None, guidance_scale: float = 4.0, image_top_k: int = 2000,
                   config=None, log=print, device: str = "cuda", before_mode=None, warmup_steps: int = 0) -> dict:
    """GPU rows of the memory table, for `benchmarks/device_check.py`: the published 7B config with random weights
    (seeded), `size` x `size` images, `batch_size` prompts per call, one call per seed.

    Modes: "bf16" (reference), "int8"/"int4" (torchao weight-only through `lumina_hf.quantization.quantize_in_place`),
    "model_offload" / "sequential_offload" (accelerate's `cpu_offload_with_hook` / `cpu_offload` with the GPU as the
    execution device, what the pipeline's `enable_*_cpu_offload` attach), "device_map_2way" (decoder layers split
    between two GPUs when there are two, else half of them on the CPU; a layer is never split). The model is built
    as `from_pretrained` would load it: bf16, the VQGAN in float32 (what the planner assumes).

    `max_steps` (an int, or a dict mode -> steps; a mode not in it runs whole images) stops each generation after that
    many decoding steps (the slow offload modes), and the seconds per image are extrapolated from the steps run (the
    prefill included: an upper bound); token agreement is then over the steps all modes ran. `warmup_steps` > 0 runs
    an untimed generation of that many steps first (first-call costs out of the timing). The peak is
    `torch.cuda.max_memory_allocated` from after the model is built (quantized, placed) to the end of its last
    generation, minus what was allocated before the mode started (another model held by the caller does not count).

    `device="cpu"` (with a small `config`, e.g. `lumina_hf.testing_utils.tiny_config()`) smoke-tests the same code on
    a CPU: no peak is measured there (None), and the modes that need CUDA are skipped. `before_mode(mode)` may return
    a reason to skip a mode (the caller's time budget).

    Returns `{"rows": [...], "config": ..., "size": ..., "batch_size": ..., "device": ...}`, a row per mode: `{"mode",
    "peak_bytes" (None on CPU), "predicted_bytes", "s_per_image", "steps", "build_s", "token_agreement",
    "agreement_steps", "reference", "psnr_db"|None, "placement" (device_map_2way)}`, or `{"mode", "skipped": reason}`
    (not runnable here, or `before_mode` said so), or `{"mode", "error", "traceback"}` (it raised). Token agreement
    and PSNR are against the first mode that ran (bf16 when it is in `modes`).
    """
    import gc
    import traceback

    from lumina_hf import LuminaMGPTForConditionalGeneration, memory_estimate
    from lumina_hf.generation_lumina_mgpt import generate_image_tokens

    config = config or _config_7b()
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    prompt = [0] + list(range(9300, 9340)) + [8710]  # 42 tokens standing for a tokenized caption
    prompts = [prompt] * batch_size

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def build():
        torch.manual_seed(0)
        with torch.device(device):
            model = LuminaMGPTForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
        return model.eval().requires_grad_(False)

    def steps_for(mode):
        return max_steps.get(mode) if isinstance(max_steps, dict) else max_steps

    def run(model, max_steps):
        if warmup_steps:
            with torch.no_grad():
                generate_image_tokens(model, prompts[:1], height=size, width=size, guidance_scale=guidance_scale,
                                      image_top_k=image_top_k, generator=torch.Generator(device).manual_seed(12345),
                                      callback=lambda s, toks: s + 1 >= warmup_steps)
        seqs, steps_done, t_total = [], 0, 0.0
        for seed in seeds:
            gens = [torch.Generator(device).manual_seed(seed * 1000 + i) for i in range(batch_size)]
            stop = (lambda s, toks: s + 1 >= max_steps) if max_steps else None
            sync()
            t = time.perf_counter()
            with torch.no_grad():
                out = generate_image_tokens(model, prompts, height=size, width=size, guidance_scale=guidance_scale,
                                            image_top_k=image_top_k, generator=gens, callback=stop)
            sync()
            t_total += time.perf_counter() - t
            seqs.append(out.sequences)
            steps_done += (max_steps if out.interrupted else out.sequences.shape[1] - 3)
        full = config.unirep.grid_length(size // 16, size // 16)
        s_per_image = t_total / len(seeds) * (full / (steps_done / len(seeds))) / batch_size
        return seqs, s_per_image, steps_done // len(seeds)

    def decode(model, seqs, max_steps):
        if max_steps:
            return None
        f = size // 16
        grids = [s[:, 3:-1].view(-1, f, f + 1)[:, :, :f] for s in seqs]
        with torch.no_grad():
            return [model.decode_image_tokens(g).float().cpu() for g in grids]

    rows, ref = [], None
    for mode in modes:
        row = {"mode": mode}
        reason = _mode_unavailable(mode, device) or (before_mode(mode) if before_mode else None)
        if reason:
            row["skipped"] = reason
            log(json.dumps(row))
            rows.append(row)
            continue
        model = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device) if cuda else 0
        try:
            quant = mode if mode in ("int8", "int4") else None
            est = memory_estimate(config, size, size, batch_size, torch.bfloat16, quant, guidance=guidance_scale != 1.0,
                                  prompt_length=len(prompt))
            t_build = time.perf_counter()
            model = build()
            if quant:
                from lumina_hf.quantization import quantize_in_place

                quantize_in_place(model, quant)
            elif mode == "model_offload":
                from accelerate import cpu_offload_with_hook

                model.to("cpu")
                cpu_offload_with_hook(model, device)
            elif mode == "sequential_offload":
                from accelerate import cpu_offload

                model.to("cpu")
                cpu_offload(model, execution_device=device)
            elif mode == "device_map_2way":
                from accelerate import dispatch_model

                n = config.num_hidden_layers
                second = device.index + 1 if torch.cuda.device_count() > device.index + 1 else "cpu"
                device_map = {"model.embed_tokens": device.index, "model.rotary_emb": device.index,
                              "model.vqmodel": device.index, "model.norm": second, "lm_head": second}
                device_map.update({f"model.layers.{i}": (device.index if i < n // 2 else second) for i in range(n)})
                model.to("cpu")
                model = dispatch_model(model, device_map=device_map, main_device=device.index)
                where = "the CPU" if second == "cpu" else f"GPU {second}"
                row["placement"] = f"layers {n // 2}-{n - 1}, norm and head on {where}"
            sync()
            row["build_s"] = time.perf_counter() - t_build
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            seqs, s_per_image, steps = run(model, steps_for(mode))
            pixels = decode(model, seqs, steps_for(mode))
            row.update(peak_bytes=torch.cuda.max_memory_allocated(device) - base if cuda else None,
                       predicted_bytes=est.peak, s_per_image=s_per_image, steps=steps)
            if ref is None:
                ref = (seqs, pixels, steps, mode)
            # over the image tokens both generated (the 3-token prefix is the same for every mode)
            n = min(steps, ref[2])
            agree = [float((a[:, 3:3 + n] == b[:, 3:3 + n]).float().mean()) for a, b in zip(seqs, ref[0])]
            row.update(token_agreement=sum(agree) / len(agree), agreement_steps=n, reference=ref[3])
            if pixels is not None and ref[1] is not None:
                row["psnr_db"] = float(np.mean([psnr(((a + 1) / 2).numpy(), ((b + 1) / 2).numpy())
                                                for a, b in zip(pixels, ref[1])]))
            else:
                row["psnr_db"] = None
        except Exception as err:  # noqa: BLE001 - one failing mode must not hide the others' numbers
            row["error"] = f"{type(err).__name__}: {err}"
            row["traceback"] = traceback.format_exc(limit=8)
        finally:
            model = None
        log(json.dumps({k: v for k, v in row.items() if k != "traceback"}))
        rows.append(row)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    name = ("7B (published config, random weights)" if config.hidden_size == 4096
            else f"random (hidden {config.hidden_size}, {config.num_hidden_layers} layers)")
    return {"rows": rows, "config": name, "size": size, "batch_size": batch_size, "device": str(device)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--modes", nargs="+", default=MODES_CPU)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    t = time.perf_counter()
    rows = cpu_table(args.size, args.modes, threads=args.threads)
    print(f"nano model, {args.size}x{args.size}, {len(CAPTIONS)} images per mode (num_candidates=1, the model's "
          f"sampling defaults), quality against fp32 on the same seeds; {time.perf_counter() - t:.0f} s")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
