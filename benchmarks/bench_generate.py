"""Image generation speed: lumina_hf's batched guided loop vs the reference's plain loop and vs a bare forward
loop, same model, one run.

The plain loop is what the original code does per image: two batch-1 forwards per step (conditional and
unconditional, each with its own dynamic cache), full-vocabulary logits processing, `torch.multinomial`.
The bare forward loop is the floor of our loop on the same hardware: the same rows (conditional and
unconditional), the same static cache length and the same image-code head, but only the forward and an
argmax per step (no noise, guidance, top-k, sampler or grid rules). "ours / bare" is the sampler's overhead.

    python benchmarks/bench_generate.py                      # CPU, tiny model (64x64 images)
    python benchmarks/bench_generate.py --size 256 --batch 1 8 --repeats 5 --skip-plain   # the sampler ratio
    python benchmarks/bench_generate.py --model 7b --size 768 --batch 1 8 --compile   # CUDA, random 7B

Prints seconds per image, decoding steps per second, peak memory, and on CUDA the memory-bandwidth floor
(weights read once per step) beside it. With `--repeats N` every timing is the best of N runs (for busy
machines). For the full GPU measurement use benchmarks/device_check.py.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

from lumina_hf import LuminaMGPTConfig, LuminaMGPTForConditionalGeneration, text_to_image_prompt
from lumina_hf.generation_lumina_mgpt import CACHE_LENGTH_MULTIPLE, generate_image_tokens
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor
from lumina_hf.unirep import UniRepLayout


def plain_loop_steps(model, prompt, height, width, guidance=4.0, top_k=2000, generator=None):
    """The reference's loop, one image token per `next()`: per step, guidance from two batch-1 forwards (each with
    its own dynamic cache), full-vocabulary logits, grid mask, top-k, softmax, multinomial, the token read back on
    the host. The prompt's forwards run at the first `next()`."""
    cfg = model.config
    dev = model.device
    rows, cols = height // 16, width // 16
    prefix = [cfg.image_start_token_id, cfg.size_token_id(height // 32), cfg.size_token_id(width // 32)]
    codes = torch.tensor(cfg.image_code_to_token_id(), device=dev)
    cond_cache, unc_cache = DynamicCache(config=cfg), DynamicCache(config=cfg)
    cond = model(torch.tensor([list(prompt) + prefix], device=dev), cache=cond_cache, use_cache=True).logits[0, -1]
    unc = model(torch.tensor([prefix], device=dev), cache=unc_cache, use_cache=True).logits[0, -1]
    for pos in range(rows * (cols + 1)):
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
        yield int(token)
        t = token.view(1, 1)
        cond = model(t, cache=cond_cache, use_cache=True).logits[0, -1]
        unc = model(t, cache=unc_cache, use_cache=True).logits[0, -1]


def plain_loop(model, prompt, height, width, guidance=4.0, top_k=2000, generator=None):
    """The whole image by the reference's loop: its tokens after the size tokens, the end token included."""
    steps = plain_loop_steps(model, prompt, height, width, guidance, top_k, generator)
    return list(steps) + [model.config.image_end_token_id]


@torch.no_grad()
def bare_forward_loop(model, prompt, batch, height, width):
    """`2 * batch` rows (prompt + image prefix, image prefix alone) through the decoder with a static cache as long
    as the guided loop's, the image-code rows of the LM head, and the argmax fed back: one forward per step of
    the image, nothing else."""
    cfg = model.config
    dev = model.device
    prefix = [cfg.image_start_token_id, cfg.size_token_id(height // 32), cfg.size_token_id(width // 32)]
    rows = [list(prompt) + prefix] * batch + [prefix] * batch
    n_steps = UniRepLayout.grid_length(*UniRepLayout.grid_shape(height, width))
    n = max(len(r) for r in rows)
    cache_len = -(-(n + n_steps) // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE
    ids = torch.full((len(rows), n), cfg.pad_token_id, dtype=torch.long)
    mask = torch.ones((len(rows), cache_len), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r) :] = torch.tensor(r)
        mask[i, : n - len(r)] = 0
    pos = (mask[:, :n].cumsum(-1) - 1).clamp(min=0)
    ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
    code_ids = model.model.image_code_to_id.to(dev)
    head = model.lm_head.weight.index_select(0, code_ids)
    cache = StaticCache(config=cfg, max_cache_len=cache_len)
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).last_hidden_state
    token = code_ids[F.linear(hidden[:, -1], head).argmax(-1)]
    position = pos[:, -1:]
    for _ in range(n_steps - 1):
        position = position + 1
        hidden = model.model(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache,
                             use_cache=True).last_hidden_state
        token = code_ids[F.linear(hidden[:, -1], head).argmax(-1)]
    return token


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


def timed(device, repeats, fn):
    """(wall s, process CPU s) of `fn()`, the fastest of `repeats` runs."""
    best = None
    for _ in range(repeats):
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        run = (time.perf_counter() - t, time.process_time() - c)
        best = run if best is None or run[0] < best[0] else best
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=["tiny", "7b"])
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="GPU memory bandwidth for the floor (H100 SXM: 3350)")
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="time every row this many times and keep the fastest run")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = args.size or (768 if args.model == "7b" else 64)
    model = build(args.model, device, dtype)
    proc = build_tiny_processor(size)
    prompt = proc(text=text_to_image_prompt("a red circle on a blue background", size, size), return_tensors=None)["input_ids"][0]
    steps = UniRepLayout.grid_length(*UniRepLayout.grid_shape(size, size)) + 3
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "vqmodel" not in n)

    rows = []
    plain = None
    if not args.skip_plain:
        gen = torch.Generator(device).manual_seed(0)
        plain_loop(model, prompt, 32, 32, generator=gen)  # warm-up
        dt, dc = timed(device, args.repeats, lambda: plain_loop(model, prompt, size, size, generator=gen))
        plain = (dt, dc)
        rows.append(("plain loop (2 fwd/step, dynamic cache)", 1, dt, steps / dt, dc, peak_mb(device)))
    ratios = []
    for b in args.batch:
        gens = [torch.Generator(device).manual_seed(i) for i in range(b)]
        bare_forward_loop(model, prompt, b, 32, 32)  # warm-up
        generate_image_tokens(model, [prompt] * b, height=32, width=32, generator=gens, compile=args.compile)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # the two loops alternate, so that a change of load on a shared machine hits both alike
        bare, ours = [], []
        for _ in range(args.repeats):
            bare.append(timed(device, 1, lambda: bare_forward_loop(model, prompt, b, size, size)))
            ours.append(timed(device, 1, lambda: generate_image_tokens(
                model, [prompt] * b, height=size, width=size, generator=gens, compile=args.compile)))
        (bt, bc), (dt, dc) = min(bare), min(ours)
        rows.append(("bare forward (static cache, argmax only)", b, bt / b, steps / bt, bc / b, peak_mb(device)))
        name = f"lumina_hf batched CFG, static cache{' + compile' if args.compile else ''}"
        rows.append((name, b, dt / b, steps / dt, dc / b, peak_mb(device)))
        ratios.append((b, dt / bt, min(c for _, c in ours) / min(c for _, c in bare), dt, dc))

    floor = None
    if device.type == "cuda":
        floor = weight_bytes / (args.bandwidth_gbs * 1e9) * steps
    print(f"\nmodel={args.model} device={device} dtype={dtype} threads={torch.get_num_threads()} image={size}x{size} "
          f"steps/image={steps} repeats={args.repeats} (best run kept)")
    # CPU seconds (process time, all threads) are less disturbed by other load than wall time.
    print(f"{'method':48s} {'batch':>5s} {'s/image':>9s} {'steps/s':>9s} {'cpu s/img':>9s} {'peak MB':>9s}")
    for name, b, spi, sps, cpi, mem in rows:
        print(f"{name:48s} {b:5d} {spi:9.3f} {sps:9.1f} {cpi:9.3f} {mem:9.0f}")
    for b, wall, cpu, dt, dc in ratios:
        line = f"batch {b}: ours / bare forward = {wall:.2f}x wall, {cpu:.2f}x CPU time"
        if plain is not None:
            line += f"; {plain[0] / (dt / b):.2f}x the plain loop's images/s (wall), {plain[1] / (dc / b):.2f}x less CPU time per image"
        print(line)
    if floor is not None:
        print(f"memory-bandwidth floor, batch 1 (weights read once per step): {floor:.2f} s/image")


if __name__ == "__main__":
    main()
