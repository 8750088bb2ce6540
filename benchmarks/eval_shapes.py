"""Evaluate a model on held-out synthetic shapes and print a table.

    python benchmarks/eval_shapes.py --model nano --n 60
    python benchmarks/eval_shapes.py --model runs/nano/final --n 60 --tasks t2i
    python benchmarks/eval_shapes.py --n 60 --tasks t2i --speculative-window 16   # same scores within noise

Targets for the nano model: colors >= 90%, shape kind >= 80%, sizes 100%, segmentation IoU >= 0.7.
"""

import argparse
import os
import sys
import time

import torch

from lumina_hf import LuminaMGPTPipeline

# the nano evaluation lives with the rest of the nano tooling in examples/ (not in the wheel)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples.nano.evaluate import EVAL_SEED, evaluate_shapes  # noqa: E402

TARGETS = {"background": 0.9, "color": 0.9, "shape": 0.8, "size": 1.0, "segmentation_iou": 0.7, "description": None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="nano", help="'nano' (the shipped model) or a pipeline folder")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--tasks", default="t2i,segmentation,describe")
    ap.add_argument("--guidance-scale", type=float, default=None, help="text-to-image override of the model's default")
    ap.add_argument("--top-k", type=int, default=None, help="text-to-image override of the model's default")
    ap.add_argument("--temperature", type=float, default=None, help="text-to-image override of the model's default")
    ap.add_argument("--num-candidates", type=int, default=None,
                    help="text-to-image override: candidates ranked by the model's own description likelihood")
    ap.add_argument("--speculative-window", type=int, default=None,
                    help="text-to-image: lossless speculative decoding, this many tokens per forward")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quantize", default=None, choices=["int8", "int4"],
                    help="load the language model with torchao weight-only quantization (lumina_hf.quantization)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("guidance_scale", args.guidance_scale), ("top_k", args.top_k),
                                   ("temperature", args.temperature),
                                   ("num_candidates", args.num_candidates),
                                   ("speculative_window", args.speculative_window)) if v is not None}
    kwargs = {}
    if args.quantize:
        # the standard diffusers pipeline-level config, quantizing the `model` component (decoder layers only)
        from lumina_hf.quantization import check_kind, pipeline_quantization_config

        check_kind(args.quantize, "torchao", "cpu")
        kwargs["quantization_config"] = pipeline_quantization_config(args.quantize)
    if args.model == "nano":
        from lumina_hf.nano import load_nano_pipeline

        pipe = load_nano_pipeline(**kwargs)
    else:
        pipe = LuminaMGPTPipeline.from_pretrained(args.model, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    torch.set_grad_enabled(False)
    t = time.perf_counter()
    score = evaluate_shapes(pipe, n=args.n, seed=args.seed, tasks=tuple(args.tasks.split(",")), **overrides)
    dt = time.perf_counter() - t
    print(f"\nmodel={args.model}{' ' + args.quantize if args.quantize else ''} n={args.n} per task, seed={args.seed}, {dt:.0f} s, t2i overrides {overrides or 'none'}")
    print(f"{'metric':20s} {'score':>8s} {'target':>8s} {'ok':>4s}")
    for name, value in score.rates().items():
        target = TARGETS.get(name)
        ok = "" if target is None else ("yes" if value >= target else "NO")
        print(f"{name:20s} {value:8.3f} {'' if target is None else f'{target:8.2f}':>8s} {ok:>4s}")


if __name__ == "__main__":
    main()
