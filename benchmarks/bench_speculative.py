"""Speculative (Jacobi) decoding vs plain token-by-token decoding: forwards per image, time, acceptance lengths.

    python benchmarks/bench_speculative.py                       # nano model, CPU: the table below
    python benchmarks/bench_speculative.py --ablation            # + draft coupling / initialisation variants
    python benchmarks/bench_speculative.py --cost --model 7b --size 768   # CUDA: cost of a forward per window size

Table (nano model): for each sampling setting (the nano model's own generation_config, and the reference's top-k
2000, temperature 1.0, guidance 4.0) and rows per call (1, and 8 = the pipeline's default `num_candidates` rows
for one prompt), decoder forwards per call, how many times fewer than plain decoding, wall and CPU seconds per
image, mean tokens decided per row per forward, and the distribution of that acceptance length. Prompts are the
held-out items of the nano evaluation (its three aspect ratios). The forward counts are what the decoder runs
(`ImageGenerationOutput.num_forwards`, equal to a forward-hook count); on a GPU a window forward of a large model
costs about as much as a one-token forward (see `--cost`), so fewer forwards is the speed-up there, while on a CPU
a window forward costs roughly its token count.

`--cost` times one decoding forward of a window of N tokens (batched guidance: 2 rows per image) against the
static cache of a 768x768 image, with random weights (random weights say nothing about acceptance), and projects
the time per image from the nano model's measured forwards per image.
"""

import argparse
import collections
import os
import sys
import time

import torch

from lumina_hf import text_to_image_prompt
from lumina_hf.generation_lumina_mgpt import generate_image_tokens
from lumina_hf.speculative import speculative_generate

WINDOWS = (8, 16, 32)


def nano_setup(n):
    # the nano evaluation items live with the rest of the nano tooling in examples/ (not in the wheel)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from examples.nano.evaluate import EVAL_SEED
    from examples.nano.shapes import aspect_size, make_item
    from lumina_hf.nano import load_nano_pipeline

    pipe = load_nano_pipeline()
    target = pipe.processor.image_processor.target_size
    items = [make_item(i, seed=EVAL_SEED, target_size=target) for i in range(n)]
    jobs = []
    for it in items:
        w, h = aspect_size(it.aspect, target)
        ids = pipe.processor(text=text_to_image_prompt(it.caption, w, h), return_tensors=None)["input_ids"][0]
        jobs.append((ids, h, w))
    return pipe, jobs


def run(model, jobs, rows, window, settings, seed0=0, **spec_options):
    """Decode every job (one prompt, `rows` rows of it in one call); totals of forwards, images, times, and the
    acceptance lengths of every row and forward (rows still decoding)."""
    forwards, images, wall, cpu = 0, 0, 0.0, 0.0
    lengths = collections.Counter()
    for j, (ids, h, w) in enumerate(jobs):
        gens = [torch.Generator().manual_seed(seed0 + 1000 * j + r) for r in range(rows)]
        t, c = time.perf_counter(), time.process_time()
        if spec_options:
            out = speculative_generate(model, [ids] * rows, [(h, w)] * rows, window=window, generator=gens,
                                       **settings, **spec_options)
        else:
            out = generate_image_tokens(model, [ids] * rows, height=h, width=w, generator=gens,
                                        speculative_window=window, **settings)
        wall += time.perf_counter() - t
        cpu += time.process_time() - c
        forwards += out.num_forwards
        images += rows
        if out.accepted_per_forward is not None:
            acc = out.accepted_per_forward.flatten()
            lengths.update(acc[acc > 0].tolist())
    return forwards, images, wall, cpu, lengths


def histogram(lengths):
    if not lengths:
        return "", float("nan")
    total = sum(lengths.values())
    mean = sum(k * v for k, v in lengths.items()) / total
    bins = [(1, 1), (2, 2), (3, 3), (4, 5), (6, 9), (10, 10_000)]
    parts = []
    for lo, hi in bins:
        share = sum(v for k, v in lengths.items() if lo <= k <= hi) / total
        name = str(lo) if lo == hi else (f"{lo}-{hi}" if hi < 10_000 else f"{lo}+")
        parts.append(f"{name}:{share:.2f}")
    return " ".join(parts), mean


def nano_table(args):
    torch.set_grad_enabled(False)
    pipe, jobs = nano_setup(args.n)
    model = pipe.model
    gen = model.generation_config
    nano = {"guidance_scale": gen.guidance_scale, "image_top_k": gen.image_top_k, "temperature": gen.temperature}
    reference = {"guidance_scale": 4.0, "image_top_k": 2000, "temperature": 1.0}
    settings = [("nano defaults " + str(nano), nano), ("reference " + str(reference), reference)]
    print(f"nano model, {len(jobs)} held-out prompts (aspects 1:1, 2:1, 1:2), {torch.get_num_threads()} CPU threads")
    header = (f"{'rows':>4s} {'window':>6s} {'fwd/call':>8s} {'fewer':>6s} {'wall s/img':>10s} {'cpu s/img':>9s} "
              f"{'tok/fwd':>7s}  acceptance length per row and forward (share)")
    for title, st in settings:
        print(f"\n== {title}")
        print(header)
        for rows in args.rows:
            sub = jobs if rows == 1 else jobs[: max(1, len(jobs) // 4)]
            base = None
            for window in (None, *args.windows):
                fwd, imgs, wall, cpu, lengths = run(model, sub, rows, window, st)
                per_call = fwd / len(sub)
                base = base or per_call
                hist, mean = histogram(lengths)
                print(f"{rows:4d} {window or 'plain':>6} {per_call:8.1f} {base / per_call:5.2f}x {wall / imgs:10.3f} "
                      f"{cpu / imgs:9.3f} {mean:7.2f}  {hist}")
    if args.ablation:
        print("\n== ablation, 1 row per call, window 16: draft coupling x first draft (all lossless); greedy = Jacobi")
        print(f"{'setting':10s} {'coupling':12s} {'draft_init':10s} {'fwd/img':>8s} {'tok/fwd':>7s}")
        for title, st in (("nano", nano), ("reference", reference)):
            for coupling in ("gumbel", "maximal", "independent"):
                for init in ("above", "left", "random"):
                    fwd, imgs, _, _, lengths = run(model, jobs, 1, 16, st, coupling=coupling, draft_init=init)
                    print(f"{title:10s} {coupling:12s} {init:10s} {fwd / imgs:8.1f} {histogram(lengths)[1]:7.2f}")
        greedy = dict(nano, do_sample=False)
        fwd, imgs, _, _, lengths = run(model, jobs, 1, 16, greedy, coupling="gumbel", draft_init="above")
        print(f"{'greedy':10s} {'-':12s} {'above':10s} {fwd / imgs:8.1f} {histogram(lengths)[1]:7.2f}")


def cost_table(args):
    """Time of one decoding forward per window size against a filled static cache (CUDA, random weights)."""
    from lumina_hf import LuminaMGPTConfig, LuminaMGPTForConditionalGeneration
    from lumina_hf.speculative import _WindowStep  # the decode step the speculative loop runs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model == "7b":
        cfg = LuminaMGPTConfig(vocab_size=65536, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=5120)
        with torch.device(device):
            model = LuminaMGPTForConditionalGeneration(cfg).to(dtype).eval()
    else:
        from lumina_hf.testing_utils import build_tiny_model

        model = build_tiny_model().to(device)
    size = args.size or 64
    span = model.config.unirep.grid_length(*model.config.unirep.grid_shape(size, size))
    prompt_len = 64
    code_ids = model.model.image_code_to_id.to(device)
    rows = 2 * args.batch  # conditional + unconditional
    print(f"model={args.model} device={device} image={size}x{size} ({span} tokens) rows={rows} compile={args.compile}")
    print(f"{'window':>6s} {'ms/forward':>10s} {'x one-token':>11s}")
    base = None
    for window in (1, *args.windows):
        total = prompt_len + span + window + 1
        mask = torch.ones((rows, total), dtype=torch.long, device=device)
        step = _WindowStep(model, code_ids, args.compile, total)
        step.start()
        with torch.no_grad():
            ids = torch.randint(4, 8000, (rows, prompt_len + span // 2), device=device)
            pos = torch.arange(ids.shape[1], device=device).expand(rows, -1)
            model.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=step.cache, use_cache=True)
            step.load_head(model)
            tok = torch.randint(4, 8000, (rows, window), device=device)
            p = ids.shape[1] + torch.arange(window, device=device).expand(rows, -1)
            times = []
            for _ in range(args.repeats + 3):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                step(tok, p, mask)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                step.cache.crop(-window)  # the next forward writes the same slots again, as the loop does
        ms = 1000 * sorted(times[3:])[len(times[3:]) // 2]
        base = base or ms
        print(f"{window:6d} {ms:10.2f} {ms / base:11.2f}")
    print("projected s/image = forwards/image (nano's measured ratio applied to the span) x ms/forward of that window")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=12, help="held-out prompts (rows=1; a quarter of them for more rows)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="rows of one prompt per call")
    ap.add_argument("--windows", type=int, nargs="+", default=list(WINDOWS))
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cost", action="store_true", help="time one forward per window size instead (CUDA)")
    ap.add_argument("--model", default="tiny", choices=["tiny", "7b"], help="for --cost")
    ap.add_argument("--size", type=int, default=None, help="for --cost")
    ap.add_argument("--batch", type=int, default=1, help="for --cost: images per forward")
    ap.add_argument("--repeats", type=int, default=20, help="for --cost")
    ap.add_argument("--compile", action="store_true", help="for --cost")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cost:
        cost_table(args)
    else:
        nano_table(args)


if __name__ == "__main__":
    main()
