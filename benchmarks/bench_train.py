"""Training throughput through the real training path (recipe -> LuminaSFTTrainer -> TRL/transformers Trainer):
chunked LM-head loss with z-loss, activation checkpointing, length-grouped batches.

    python benchmarks/bench_train.py                 # CPU: the tiny model, LoRA and full fine-tuning
    python benchmarks/bench_train.py --large 7b      # + CUDA: a random-weight 7B, LoRA at 768 px, batch 1
    python benchmarks/bench_train.py --large small   # the large-model code path with a small config (any device)

Prints a table: trained setting, device, batch x tokens, tokens/s (all tokens fed, padding excluded, timed after
warm-up steps), seconds per step and peak memory (CUDA: max allocated; CPU: peak resident set of the process).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import tempfile
import time

import torch
from transformers import TrainerCallback

from lumina_hf import LuminaMGPTConfig, LuminaMGPTForConditionalGeneration
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor
from lumina_hf.training import build_trainer, parse_recipe, synthetic_dataset


class _Timer(TrainerCallback):
    """Times the optimizer steps after `warmup` steps and counts the tokens they consumed."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.trainer = None
        self.t0 = self.tokens0 = None
        self.t1 = self.tokens1 = None
        self.steps = 0

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        if state.global_step == self.warmup:
            self.t0, self.tokens0 = time.perf_counter(), self.trainer._total_train_tokens
        elif state.global_step > self.warmup:
            self.t1, self.tokens1 = time.perf_counter(), self.trainer._total_train_tokens
            self.steps = state.global_step - self.warmup
        return control


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(name, model, processor, dataset, use_peft, steps, warmup, batch, device, extra=None):
    out = tempfile.mkdtemp(prefix="bench_train_")
    cfg = {
        "model_name_or_path": "tiny-random",  # not loaded: the model is passed in
        "dataset_mixture": [{"path": "synthetic:tiny"}],
        "output_dir": out,
        "max_length": 8192,
        "per_device_train_batch_size": batch,
        "max_steps": steps + warmup,
        "learning_rate": 1e-4,
        "warmup_ratio": 0.0,
        "logging_steps": 1000,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dropout": 0.05,
        "use_peft": use_peft,
        "dataloader_pin_memory": device == "cuda",
    }
    if use_peft:
        cfg.update(lora_r=64, lora_alpha=64, lora_train_image_head=True)
    cfg.update(extra or {})
    recipe = parse_recipe(cfg)
    timer = _Timer(warmup)
    trainer = build_trainer(recipe, model, processor, train_dataset=dataset, callbacks=[timer])
    timer.trainer = trainer
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds = timer.t1 - timer.t0
    tokens = timer.tokens1 - timer.tokens0
    lengths = dataset["length"]
    return {
        "setting": name,
        "device": device,
        "batch x tokens": f"{batch} x {sum(lengths) // len(lengths)}",
        "tokens/s": tokens / seconds,
        "s/step": seconds / timer.steps,
        "peak MiB": _peak_memory_mb(device),
    }


def cpu_cases(steps, warmup):
    processor = build_tiny_processor(64)
    rows = []
    for name, use_peft in (("tiny LoRA r64 (+image rows)", True), ("tiny full fine-tuning", False)):
        model = build_tiny_model(seed=0)
        data = synthetic_dataset(model.config, processor, num_items=32)
        rows.append(run_case(name, model, processor, data, use_peft, steps, warmup, batch=4, device="cpu"))
    return rows


def large_case(kind, steps, warmup):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "7b":
        if device != "cuda":
            raise SystemExit("--large 7b needs a CUDA GPU (use --large small to exercise the code path on CPU).")
        cfg = LuminaMGPTConfig(vocab_size=65536, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192)
        size, name = 768, "7B LoRA r64 (+image rows), 768 px"
    else:
        from lumina_hf.testing_utils import tiny_config

        cfg = tiny_config(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, max_position_embeddings=8192)
        size, name = 256, "small LoRA r64 (+image rows), 256 px"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = LuminaMGPTForConditionalGeneration(cfg)
        finally:
            torch.set_default_dtype(old)
    model.model.vqmodel.to(torch.float32)
    processor = build_tiny_processor(size)
    data = synthetic_dataset(model.config, processor, num_items=steps + warmup + 2)
    extra = {"bf16": device == "cuda", "activation_checkpointing": True}
    return run_case(name, model, processor, data, True, steps, warmup, batch=1, device=device, extra=extra)


def print_table(rows):
    cols = ["setting", "device", "batch x tokens", "tokens/s", "s/step", "peak MiB"]
    fmt = {"tokens/s": "{:.0f}", "s/step": "{:.3f}", "peak MiB": "{:.0f}"}
    cells = [[fmt.get(c, "{}").format(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--large", choices=["7b", "small"], default=None, help="also run the large-model LoRA case")
    ap.add_argument("--skip-cpu", action="store_true", help="only the --large case")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [] if args.skip_cpu else cpu_cases(args.steps, args.warmup)
    if args.large or torch.cuda.is_available():
        rows.append(large_case(args.large or "7b", args.steps, args.warmup))
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, CUDA {torch.cuda.is_available()}")
    print_table(rows)


if __name__ == "__main__":
    main()
