"""Image generation speed: lumina_hf's batched guided loop vs the reference's plain loop, same model, one run.

The plain loop is what the original code does per image: two batch-1 forwards per step (conditional and
unconditional, each with its own dynamic cache), full-vocabulary logits processing, `torch.multinomial`.

    python benchmarks/bench_generate.py                      # CPU, tiny model (64x64 images)
    python benchmarks/bench_generate.py --model 7b --size 768 --batch 1 8 --compile   # CUDA, random 7B

Prints seconds per image, decoding steps per second, peak memory, and on CUDA the memory-bandwidth floor
(weights read once per step) beside it.
"""

import argparse
import time

import torch
from transformers import DynamicCache

from lumina_hf import LuminaMGPTConfig, LuminaMGPTForConditionalGeneration, text_to_image_prompt
from lumina_hf.generation_lumina_mgpt import generate_image_tokens, grid_tokens
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor


def plain_loop(model, prompt, height, width, guidance=4.0, top_k=2000, generator=None):
    cfg = model.config
    dev = model.device
    rows, cols = height // 16, width // 16
    prefix = [cfg.image_start_token_id, cfg.size_token_id(height // 32), cfg.size_token_id(width // 32)]
    codes = torch.tensor(cfg.image_code_to_token_id(), device=dev)
    cond_cache, unc_cache = DynamicCache(config=cfg), DynamicCache(config=cfg)
    cond = model(torch.tensor([list(prompt) + prefix], device=dev), cache=cond_cache, use_cache=True).logits[0, -1]
    unc = model(torch.tensor([prefix], device=dev), cache=unc_cache, use_cache=True).logits[0, -1]
    out = []
    total = rows * (cols + 1)
    for pos in range(total):
        logits = (unc + guidance * (cond - unc)).float()
        mask = torch.full_like(logits, float("-inf"))
        if pos % (cols + 1) == cols:
            mask[cfg.image_row_end_token_id] = 0
        else:
            mask[codes] = 0
        logits = logits + mask
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        out.append(int(token))
        t = token.view(1, 1)
        cond = model(t, cache=cond_cache, use_cache=True).logits[0, -1]
        unc = model(t, cache=unc_cache, use_cache=True).logits[0, -1]
    return out + [cfg.image_end_token_id]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(model_name, device, dtype):
    if model_name == "tiny":
        return build_tiny_model().to(device)
    cfg = LuminaMGPTConfig(vocab_size=65536, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=5120)
    with torch.device(device):
        model = LuminaMGPTForConditionalGeneration(cfg).to(dtype)
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=["tiny", "7b"])
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="GPU memory bandwidth for the floor (H100 SXM: 3350)")
    ap.add_argument("--skip-plain", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = args.size or (768 if args.model == "7b" else 64)
    model = build(args.model, device, dtype)
    proc = build_tiny_processor(size)
    prompt = proc(text=text_to_image_prompt("a red circle on a blue background", size, size), return_tensors=None)["input_ids"][0]
    steps = grid_tokens(size // 16, size // 16) + 3
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "vqmodel" not in n)

    rows = []
    if not args.skip_plain:
        gen = torch.Generator(device).manual_seed(0)
        plain_loop(model, prompt, 32, 32, generator=gen)  # warm-up
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        plain_loop(model, prompt, size, size, generator=gen)
        sync(device)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        rows.append(("plain loop (2 fwd/step, dynamic cache)", 1, dt, steps / dt, dc, peak_mb(device)))
    for b in args.batch:
        gens = [torch.Generator(device).manual_seed(i) for i in range(b)]
        generate_image_tokens(model, [prompt] * b, height=32, width=32, generator=gens, compile=args.compile)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        generate_image_tokens(model, [prompt] * b, height=size, width=size, generator=gens, compile=args.compile)
        sync(device)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        name = f"lumina_hf batched CFG, static cache{' + compile' if args.compile else ''}"
        rows.append((name, b, dt / b, steps / dt, dc / b, peak_mb(device)))

    floor = None
    if device.type == "cuda":
        floor = weight_bytes / (args.bandwidth_gbs * 1e9) * steps
    print(f"\nmodel={args.model} device={device} dtype={dtype} image={size}x{size} steps/image={steps}")
    # CPU seconds (process time, all threads) are less disturbed by other load than wall time.
    print(f"{'method':48s} {'batch':>5s} {'s/image':>9s} {'steps/s':>9s} {'cpu s/img':>9s} {'peak MB':>9s}")
    for name, b, spi, sps, cpi, mem in rows:
        print(f"{name:48s} {b:5d} {spi:9.3f} {sps:9.1f} {cpi:9.3f} {mem:9.0f}")
    if rows and not args.skip_plain:
        base, base_cpu = rows[0][3], rows[0][4]
        for name, b, _, sps, cpi, _ in rows[1:]:
            print(f"batch {b}: {sps / base:.2f}x the plain loop's steps/s (wall), {base_cpu / cpi:.2f}x less CPU time per image")
    if floor is not None:
        print(f"memory-bandwidth floor, batch 1 (weights read once per step): {floor:.2f} s/image")


if __name__ == "__main__":
    main()
