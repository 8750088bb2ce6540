"""Peak memory of `lumina-hf convert` on a synthetic, published-format 7B-shaped checkpoint.

Writes a checkpoint exactly like Alpha-VLLM/Lumina-mGPT-7B-* on disk (Chameleon-fork config.json, sharded
bf16/fp16 safetensors + index, grouped `[1, 128]` q/k-norm, a full-size Meta-layout `vqgan.ckpt` + `vqgan.yaml`,
a 65536-token tokenizer.json), converts it in a fresh process per row and prints that process's peak resident
memory (`resource.getrusage(...).ru_maxrss`) next to the checkpoint size:

    python benchmarks/bench_convert.py                       # full 7B shapes if the disk allows
    python benchmarks/bench_convert.py --layers 8 --max-shard-size 5GB 1GB

The weights are arbitrary (a small random pool repeated): only shapes, dtypes and sizes matter here. Nothing is
downloaded. Needs about twice the checkpoint size of free disk (input + output); `--layers` shrinks it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time

GB = 10**9
VQ_YAML = """model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 8192
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: []
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_start: 100001
"""


def published_config(args, vocabulary_map: dict) -> dict:
    return {
        "_name_or_path": "Alpha-VLLM/Lumina-mGPT-7B-768",
        "architectures": ["ChameleonXLLMXForConditionalGeneration"],
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "dropout": 0.05,
        "hidden_act": "silu", "hidden_size": args.hidden, "initializer_range": 0.02,
        "intermediate_size": args.intermediate, "mask_image_logits": False, "max_position_embeddings": 10240,
        "mlp_bias": False, "model_parallel_size": 1, "model_type": "chameleon", "num_attention_heads": args.heads,
        "num_hidden_layers": args.layers, "num_key_value_heads": args.heads, "pad_token_id": None,
        "qk_layernorm": True, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
        "swin_norm": False, "tie_word_embeddings": False, "torch_dtype": args.dtype,
        "transformers_version": "4.44.0", "use_cache": True, "vocab_size": args.vocab,
        "vocabulary_map": vocabulary_map,
        "vq_config": {"embed_dim": 256, "n_embed": 8192, "double_z": False, "z_channels": 256, "resolution": 256,
                      "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
                      "attn_resolutions": [], "dropout": 0.0},
        "z_loss_weight": 1e-05,
    }


def lm_shapes(args) -> dict[str, tuple[int, ...]]:
    """Published key names and shapes of the language model (grouped q/k-norm, mp = 1)."""
    h, i, v, hd = args.hidden, args.intermediate, args.vocab, args.hidden // args.heads
    out = {"model.embed_tokens.weight": (v, h)}
    for n in range(args.layers):
        p = f"model.layers.{n}."
        for m in ("q", "k", "v", "o"):
            out[p + f"self_attn.{m}_proj.weight"] = (h, h)
        for m in ("q", "k"):
            out[p + f"self_attn.{m}_norm.weight"] = (1, hd)
            out[p + f"self_attn.{m}_norm.bias"] = (1, hd)
        out[p + "mlp.gate_proj.weight"] = (i, h)
        out[p + "mlp.up_proj.weight"] = (i, h)
        out[p + "mlp.down_proj.weight"] = (h, i)
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def checkpoint_bytes(args) -> int:
    itemsize = 2
    total = 0
    for shape in lm_shapes(args).values():
        n = 1
        for s in shape:
            n *= s
        total += n * itemsize
    return total


def write_checkpoint(args, root: str) -> tuple[str, str, int]:
    import torch
    from safetensors.torch import save_file

    from lumina_hf import LuminaMGPTVQGAN
    from lumina_hf.configuration_lumina_mgpt import LuminaMGPTVQConfig
    from lumina_hf.conversion.sources import parse_size
    from lumina_hf.testing_utils import build_tiny_tokenizer, tiny_vocabulary

    dtype = getattr(torch, args.dtype)
    ckpt = os.path.join(root, "Lumina-mGPT-7B-768")
    vq_dir = os.path.join(root, "tokenizer")
    os.makedirs(ckpt)
    os.makedirs(vq_dir)
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 24, generator=g) * 0.02).to(dtype)  # 16M values, repeated to fill the tensors

    def fill(shape):
        t = torch.empty(shape, dtype=dtype)
        flat = t.view(-1)
        for start in range(0, flat.numel(), pool.numel()):
            n = min(pool.numel(), flat.numel() - start)
            flat[start : start + n].copy_(pool[:n])
        return t

    shapes = lm_shapes(args)
    limit = parse_size(args.input_shard_size)
    groups, size = [[]], 0
    for k, shape in shapes.items():
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= s
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    weight_map, total = {}, 0
    for idx, keys in enumerate(groups):
        name = f"model-{idx + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: fill(shapes[k]) for k in keys}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, os.path.join(ckpt, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        del tensors
        print(f"  wrote {name}", file=sys.stderr, flush=True)
    with open(os.path.join(ckpt, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(published_config(args, dict(tiny_vocabulary())), f)
    build_tiny_tokenizer().backend_tokenizer.save(os.path.join(ckpt, "tokenizer.json"))

    vq = LuminaMGPTVQGAN(LuminaMGPTVQConfig())  # the published VQGAN shapes (about 70M fp32 parameters)
    state = {k: v.contiguous() for k, v in vq.state_dict().items()}
    state["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": state}, os.path.join(vq_dir, "vqgan.ckpt"))
    with open(os.path.join(vq_dir, "vqgan.yaml"), "w") as f:
        f.write(VQ_YAML)
    return ckpt, vq_dir, total


def _rss_now_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _write_child(args, root, queue):
    queue.put(write_checkpoint(args, root))


def _convert_child(ckpt, vq_dir, out, max_shard_size, queue):
    import resource

    import lumina_hf  # noqa: F401 - imports counted in the baseline
    from lumina_hf.convert_lumina_mgpt import convert_checkpoint

    baseline = _rss_now_kb()
    t0 = time.perf_counter()
    convert_checkpoint(ckpt, vq_dir, out, max_shard_size=max_shard_size, dtype="auto", progress=False)
    seconds = time.perf_counter() - t0
    # ru_maxrss (KiB on Linux) survives exec: it also holds the parent's RSS at fork time, which is why the
    # parent of this process never imports torch nor holds weights. VmHWM is this process image's own peak.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"baseline_kb": baseline, "peak_kb": peak, "hwm_kb": _hwm_kb(), "seconds": seconds})


def _run_child(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    try:
        result = queue.get()
    except BaseException:
        proc.terminate()
        raise
    proc.join()
    if proc.exitcode:
        raise SystemExit(f"error: {target.__name__} failed (exit code {proc.exitcode}).")
    return result


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32 if the disk allows, else fewer)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--input-shard-size", default="5GB", help="shard size of the synthetic input checkpoint")
    p.add_argument("--max-shard-size", nargs="+", default=["5GB", "1GB"], help="one table row per output shard size")
    p.add_argument("--workdir", default=None, help="where to write (default: a temporary folder in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and outputs")
    args = p.parse_args()

    base = args.workdir or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    free = shutil.disk_usage(base).free
    requested = args.layers
    if args.layers is None:
        args.layers = 32
        while args.layers > 1 and 2 * checkpoint_bytes(args) + 2 * GB > free:
            args.layers -= 1
        if args.layers < 32:
            print(f"note: {free / GB:.0f} GB free in {base}: using {args.layers} layers instead of 32", file=sys.stderr)
    need = 2 * checkpoint_bytes(args) + 2 * GB
    if need > free:
        raise SystemExit(f"error: {need / GB:.1f} GB of free disk needed in {base}, {free / GB:.1f} GB available; use --layers.")

    root = tempfile.mkdtemp(prefix="bench_convert-", dir=base)
    try:
        print(f"writing a {args.layers}-layer synthetic checkpoint to {root} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        # in a child process, so that this process stays small (see `_convert_child`)
        ckpt, vq_dir, ckpt_bytes = _run_child(_write_child, args, root)
        n_in = len([f for f in os.listdir(ckpt) if f.endswith(".safetensors")])
        print(f"  {ckpt_bytes / GB:.2f} GB in {n_in} shard(s), {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        rows = []
        for shard in args.max_shard_size:
            out = os.path.join(root, f"out-{shard}")
            res = _run_child(_convert_child, ckpt, vq_dir, out, shard)
            n_out = len([f for f in os.listdir(os.path.join(out, "model")) if f.endswith(".safetensors")])
            rows.append((shard, n_out, folder_bytes(out), res))
            shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    params = ckpt_bytes / 2 / 1e9
    print(f"\nconvert_checkpoint, synthetic Lumina-mGPT-7B layout: {args.layers} layers "
          f"({'full 7B' if args.layers == 32 and args.hidden == 4096 else 'reduced'}), {params:.2f}B LM parameters, "
          f"{args.dtype}, {n_in} input shard(s); full-size fp32 VQGAN; CPU, {os.cpu_count()} cores"
          + ("" if requested is not None or args.layers == 32 else " (layers reduced to fit the disk)"))
    head = ("max shard", "out shards", "checkpoint GB", "output GB", "import RSS GB", "peak RSS GB (ru_maxrss)",
            "VmHWM GB", "peak - import GB", "peak / checkpoint", "time s")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for shard, n_out, out_bytes, r in rows:
        peak = r["peak_kb"] * 1024
        base_rss = r["baseline_kb"] * 1024
        print(f"| {shard} | {n_out} | {ckpt_bytes / GB:.2f} | {out_bytes / GB:.2f} | {base_rss / GB:.2f} | "
              f"{peak / GB:.2f} | {r['hwm_kb'] * 1024 / GB:.2f} | {(peak - base_rss) / GB:.2f} | {peak / ckpt_bytes:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
