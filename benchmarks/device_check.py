"""The one command to run on a GPU machine: correctness on CUDA and every speed/memory number at once.

    python benchmarks/device_check.py --out DIR              # a CUDA GPU: the random 7B, ~7 minutes
    python benchmarks/device_check.py --out DIR --dry-run    # any machine: the same code, tiny model, CPU

Sections, in order (each one guarded: a failure becomes a row of the table and the run goes on):
  environment      versions, the GPU, which optional packages are installed
  pytest_cuda      `pytest -m cuda` in a subprocess with its own timeout (one row per test)
  model            a randomly initialised 7B with the published config, built directly on the GPU (bf16,
                   the VQGAN in fp32): no CPU initialisation, no download
  bandwidth        device memory bandwidth, measured with a large device-to-device copy
  decode_eager     768x768 text-to-image at batch 1, 8, 16: s/image, decode steps/s, peak memory, next to
                   the bandwidth floor (weights read per step / measured bandwidth); plus one full image
  reference_loop   the reference's loop: two batch-1 forwards per step with dynamic caches
  lora             7B LoRA at 768 px, batch 1, gradient checkpointing: peak memory and tokens/s
  decode_compiled  as decode_eager with compile="reduce-overhead" (CUDA graphs), batch 1, 16, 8
  speculative      speculative decoding: cost of a window forward (1, 8, 16, 32 tokens), the time per image it
                   projects with the nano model's measured acceptance, greedy tokens equal to plain decoding,
                   one whole image at window 16
  memory           bench_memory.device_section: bf16, int8, int4 (torchao), model_offload, device_map_2way on a fresh
                   random 7B each at 768, batch 1: peak memory next to the planner's prediction (memory_estimate)
                   and their ratio (target: within 15%), s/image extrapolated from a few steps, token agreement
                   with bf16; sequential_offload left out (minutes per image); a missing package is a skipped row
  tokenize         bench_tokenize.device_section: tokenize_dataset items/s with the Chameleon-sized VQGAN at 768,
                   decode vs encode shares; without datasets/TRL (the GPU machine) the VQ encode alone

Sections come in this order; on a GPU the estimates of all of them add up to more than the default budget, so
when the earlier ones take as long as estimated the last ones are skipped (`--sections memory,tokenize` runs those
two alone: they build their own models). Later issues add sections with the `@section` decorator: a function
`fn(ctx)` that calls `ctx.add(...)` for each row. Decode timings run a fixed number of steps twice (stopped
by the step callback) and extrapolate the per-step time to a whole image; the table says so.

Writes `device_check.md` (one markdown table) and `device_check.json` to `--out`, after every row, so a run
that is cut short still leaves what it measured. `--budget-s` (default 420) is the time the sections may
take: a section or case whose estimate does not fit in what is left is skipped (and listed as skipped); a
watchdog ends the run `--grace-s` after the budget whatever happens.

Needs torch, transformers, safetensors, tokenizers and peft (lora section); pytest for pytest_cuda; diffusers
only for the pipeline tests; accelerate for the pipeline tests and memory's offload modes, torchao for memory's
int8/int4 rows (each a skipped row without it); datasets and TRL for tokenize's tokenize_dataset row. `--wheels DIR`
(default: `.whl/` at the repository root, when present) installs missing ones from local wheel files first; see
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if (SRC / "lumina_hf").is_dir():  # run from a checkout: its own package, installed or not
    sys.path.insert(0, str(SRC))

# import name -> distribution name, for the optional packages the report lists and `--wheels` installs
OPTIONAL = {"PIL": "pillow", "pytest": "pytest", "accelerate": "accelerate", "diffusers": "diffusers"}
REPORTED = ["torch", "transformers", "peft", "safetensors", "tokenizers", "accelerate", "diffusers", "pytest", "PIL", "numpy", "trl", "datasets"]

# The published 7B (Lumina-mGPT-7B-768): the Chameleon 7B decoder; the VQGAN config is the default (Meta's).
CONFIG_7B = dict(
    vocab_size=65536, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=10240, model_parallel_size=1, qk_norm_layout="grouped",
    dropout=0.05, z_loss_weight=1e-5,
)
# LoRA as `lumina-hf train` configures it by default (training/arguments.py LoraArguments)
LORA = dict(r=64, lora_alpha=64, lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass(frozen=True)
class Plan:
    """What a run measures: the GPU plan, or the dry run's small version of it."""

    size: int  # image side in pixels
    eager_batches: tuple[int, ...]
    compiled_batches: tuple[int, ...]
    warm_steps: int  # steps of the warm-up run (compilation, CUDA graph recording)
    short_steps: int  # the two timed runs: per-step time = (t(long) - t(short)) / (long - short)
    long_steps: int
    reference_steps: int
    lora_steps: int
    lora_warmup: int
    copy_bytes: int
    pytest_timeout_s: int
    repeats: int = 1  # timed runs of each length (the fastest counts): more where timings are noisy
    compile_mode: str = "reduce-overhead"


GPU_PLAN = Plan(size=768, eager_batches=(1, 8, 16), compiled_batches=(1, 16, 8), warm_steps=8, short_steps=32,
                long_steps=160, reference_steps=300, lora_steps=10, lora_warmup=2, copy_bytes=4 << 30,
                pytest_timeout_s=170)
DRY_PLAN = Plan(size=64, eager_batches=(1, 2), compiled_batches=(1,), warm_steps=2, short_steps=4, long_steps=16,
                reference_steps=8, lora_steps=2, lora_warmup=1, copy_bytes=64 << 20, pytest_timeout_s=150, repeats=2)

# Estimated seconds per unit of work, (GPU, dry run): a section or case is skipped when it would not fit.
ESTIMATES = {
    "environment": (2, 1),
    "pytest_cuda": (120, 30),
    "model": (40, 3),
    "bandwidth": (5, 1),
    "decode_case": (8, 3),
    "full_image": (15, 2),
    "reference_loop": (20, 3),
    "lora": (50, 10),
    "compiled_case": (90, 30),
}


# ---------------------------------------------------------------------- registry
@dataclass
class Section:
    name: str
    fn: Callable
    estimate: str  # key of ESTIMATES for the section as a whole (its cases check their own)
    doc: str


SECTIONS: list[Section] = []


def section(name: str, estimate: str | tuple[float, float] | None = None):
    """Register `fn(ctx)` as a section of the check (run in registration order). `estimate`: its expected
    seconds `(on a GPU, in the dry run)`, or the key of an entry of `ESTIMATES` (default: the section's name);
    the section is skipped when that does not fit in the budget left. Cases inside a section check their own
    estimates with `ctx.fits(...)`."""

    def register(fn):
        key = estimate if isinstance(estimate, str) else name
        if isinstance(estimate, tuple):
            ESTIMATES[name] = estimate
        doc = (fn.__doc__ or "").strip().splitlines()
        SECTIONS.append(Section(name, fn, key, doc[0] if doc else ""))
        return fn

    return register


# ---------------------------------------------------------------------- context: rows, budget, output
COLUMNS = [
    ("section", "Section"), ("case", "Case"), ("status", "Status"), ("batch", "Batch"), ("s_per_image", "s/image"),
    ("steps_per_s", "steps/s"), ("tokens_per_s", "tokens/s"), ("peak_gib", "peak GiB"),
    ("floor_s_per_image", "floor s/img (weights)"), ("floor_kv_s_per_image", "floor s/img (weights+KV)"),
    ("x_floor", "x floor"), ("notes", "Notes"),
]


class Context:
    def __init__(self, args):
        self.args = args
        self.dry_run = args.dry_run
        self.plan = DRY_PLAN if args.dry_run else GPU_PLAN
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.budget_s = args.budget_s
        self.rows: list[dict] = []
        self.info: dict = {"mode": "dry run (CPU, tiny model)" if args.dry_run else "GPU (random 7B)"}
        self.current = ""
        self.model = None
        self.device = None
        self.lock = threading.Lock()
        self.child = None  # a running subprocess (pytest), stopped by the watchdog

    # budget
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def estimate(self, key: str) -> float:
        gpu, dry = ESTIMATES[key]
        return dry if self.dry_run else gpu

    def fits(self, key: str, case: str, factor: float = 1.0) -> bool:
        """True when `key`'s estimate fits in the budget left; otherwise records the case as skipped."""
        need = self.estimate(key) * factor
        if need <= self.remaining():
            return True
        self.add(case=case, status="skipped", notes=f"budget: needs ~{need:.0f} s, {max(self.remaining(), 0):.0f} s left")
        return False

    # rows and files
    def add(self, case: str, status: str = "ok", **fields) -> dict:
        row = {"section": self.current, "case": case, "status": status, **fields}
        with self.lock:
            self.rows.append(row)
            self.write()
        return row

    def write(self) -> None:
        meta = dict(self.info, started=self.started, wall_s=round(self.elapsed(), 1), budget_s=self.budget_s,
                    argv=sys.argv[1:], sections=[s.name for s in selected_sections(self.args)])
        _atomic_write(self.out / "device_check.json", json.dumps({"meta": meta, "rows": self.rows}, indent=2, default=str))
        _atomic_write(self.out / "device_check.md", render_markdown(meta, self.rows))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.01:
            return f"{value:.3g}"
        return f"{value:.2e}"
    return str(value).replace("|", "/").replace("\n", " ")


def render_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# device_check: {meta.get('mode', '')}",
        "",
        f"{meta.get('device_name', '?')}; torch {meta.get('torch', '?')}, CUDA {meta.get('cuda', '-')}, "
        f"transformers {meta.get('transformers', '?')}; started {meta['started']}, wall {meta['wall_s']} s of a "
        f"{meta['budget_s']} s budget. Decode rows: {meta.get('decode_note', '')}",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- helpers
def sync(ctx) -> None:
    import torch

    if ctx.device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(ctx) -> None:
    import torch

    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(ctx) -> float:
    """CUDA: max allocated since the last reset. CPU: the process's peak resident set (since it started)."""
    import torch

    if ctx.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prompt_ids(i: int) -> list[int]:
    """A text-to-image prompt of 38-42 token ids (BOS ... separator): lengths differ between rows, so left
    padding is exercised. The ids are ordinary text ids; with random weights their meaning does not matter."""
    return [0] + [9300 + (7 * i + j) % 800 for j in range(36 + i % 5)] + [8710]


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: the decoder layers and final norm, plus the image-code rows of
    the LM head (the loop applies only those); the embedding reads one row per token."""
    decoder = sum(p.numel() * p.element_size() for n, p in model.model.named_parameters()
                  if not n.startswith(("vqmodel.", "embed_tokens.")))
    head = model.model.image_code_to_id.numel() * model.config.hidden_size * model.lm_head.weight.element_size()
    return decoder + head


def kv_bytes(model, rows: int, cache_len: int) -> int:
    """Bytes of the static KV cache that attention reads every step (the whole cache: positions not yet written
    are masked, not skipped)."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * rows * kv_heads * head_dim * cache_len * model.lm_head.weight.element_size()


# ---------------------------------------------------------------------- sections
@section("environment")
def environment(ctx):
    """Versions, the device, which optional packages are installed."""
    import torch

    versions = {}
    for name in REPORTED:  # presence as the import system sees it, versions from the metadata (no imports)
        if importlib.util.find_spec(name) is None:
            versions[name] = None
            continue
        try:
            versions[name] = importlib.metadata.version(OPTIONAL.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "?"
    ctx.info.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                    transformers=versions["transformers"], packages=versions)
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        ctx.info.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                        sm_count=props.multi_processor_count)
    else:
        ctx.info.update(device_name=f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    missing = [n for n, v in versions.items() if v is None]
    boot = ctx.info.get("bootstrap")
    notes = f"python {ctx.info['python']}, {ctx.info['device_name']}; missing: {', '.join(missing) or 'none'}"
    if boot:
        notes += f"; wheels: {boot}"
    ctx.add(case="versions", notes=notes)


def _cuda_test_files() -> list[str]:
    """The test files that hold `pytest.mark.cuda` tests (only those are collected: the others may import
    packages a GPU machine lacks)."""
    files = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        text = path.read_text(encoding="utf-8")
        if "mark.cuda" in text:
            files.append(str(path.relative_to(REPO)))
    return files


@section("pytest_cuda")
def pytest_cuda(ctx):
    """`pytest -m cuda` in a subprocess with its own timeout; one row per test."""
    if importlib.util.find_spec("pytest") is None:
        ctx.add(case="pytest -m cuda", status="failed", notes="pytest is not installed (see benchmarks/README.md: --wheels)")
        return
    files = _cuda_test_files()
    junit = ctx.out / "pytest_cuda.xml"
    timeout = max(30, min(ctx.plan.pytest_timeout_s, int(ctx.remaining()) - 60))
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rA", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={junit}", *files]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t = time.perf_counter()
    log = ctx.out / "pytest_cuda.log"
    with open(log, "w", encoding="utf-8") as fh:
        ctx.child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True)
        try:
            rc = ctx.child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            ctx.child.kill()
            ctx.child.wait()
            rc = None
        finally:
            ctx.child = None
    output = log.read_text(encoding="utf-8", errors="replace")
    dt = time.perf_counter() - t
    tail = " ".join(output.strip().splitlines()[-1:])[:200]
    if rc is None:
        # no junit file: the tests that finished are in the verbose log
        for name, outcome in re.findall(r"^\S*?(test_\w+\.py::\S+) (PASSED|FAILED|SKIPPED|ERROR)", output, re.M):
            ctx.add(case=name.replace(".py", ""), status={"PASSED": "ok", "SKIPPED": "skipped"}.get(outcome, "failed"),
                    notes=outcome.lower())
        ctx.add(case="pytest -m cuda", status="failed", notes=f"timed out after {timeout} s (log: pytest_cuda.log)")
        return
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{Path(case.get('file') or case.get('classname', '').replace('.', '/')).stem}::{case.get('name')}"
            status, notes = "ok", f"{float(case.get('time', 0)):.1f} s"
            for tag, label in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
                found = case.find(tag)
                if found is not None:
                    message = (found.get("message") or found.text or label).strip()
                    status, notes = label, (message.splitlines() or [label])[0][:240]
                    break
            ctx.add(case=name, status=status, notes=notes)
    ctx.add(case="pytest -m cuda (summary)", status="ok" if rc in (0, 5) else "failed",
            notes=f"exit {rc} in {dt:.0f} s: {tail} (log: pytest_cuda.log)")


@section("model")
def build_model(ctx):
    """A randomly initialised 7B with the published config, built on the device (dry run: the tiny config)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lumina_hf import LuminaMGPTConfig
    from lumina_hf.testing_utils import tiny_config

    if ctx.dry_run:
        config, dtype = tiny_config(), torch.float32
        what = "random tiny model (hidden 64, 2 layers, full vocabulary), fp32"
    else:
        config, dtype = LuminaMGPTConfig(**CONFIG_7B), torch.bfloat16
        what = "random 7B, published config, bf16 (VQGAN fp32), built on the GPU"
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(ctx.device):  # parameters are created where they run: no CPU initialisation on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    sync(ctx)
    dt = time.perf_counter() - t
    where = {p.device.type for p in model.parameters()}
    if where != {ctx.device.type}:
        raise RuntimeError(f"the model was built on {sorted(where)}, not on {ctx.device.type}")
    n = sum(p.numel() for p in model.parameters())
    vq_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.vqmodel.parameters()})
    ctx.model = model
    ctx.info["decode_weight_bytes"] = decode_weight_bytes(model)
    ctx.add(case=what, peak_gib=peak_gib(ctx), notes=f"{n / 1e9:.3f} B params in {dt:.1f} s; weights read per decode "
            f"step {ctx.info['decode_weight_bytes'] / 1e9:.3f} GB; VQGAN {', '.join(vq_dtypes)}")


@section("bandwidth")
def bandwidth(ctx):
    """Device memory bandwidth: the best of 10 copies of a large buffer (bytes read + written per second)."""
    import torch

    n = ctx.plan.copy_bytes
    src = torch.empty(n, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(10):
        sync(ctx)
        t = time.perf_counter()
        dst.copy_(src)
        sync(ctx)
        best = min(best, time.perf_counter() - t)
    gbs = 2 * n / best / 1e9
    ctx.info["bandwidth_gbs"] = gbs
    del src, dst
    ctx.add(case=f"copy {n / 2**30:.2f} GiB", notes=f"{gbs:.0f} GB/s (read + write), best of 10")


def time_decode(ctx, batch: int, compile) -> dict:
    """Time the guided decode loop at `batch` images of `plan.size`: a warm-up run, then two runs stopped by the
    step callback after `short_steps` and `long_steps` steps. Returns the row fields."""
    from lumina_hf.unirep import UniRepLayout
    import torch
    from torch._dynamo.utils import counters

    from lumina_hf.generation_lumina_mgpt import CACHE_LENGTH_MULTIPLE, clear_decode_cache, generate_image_tokens

    plan, model = ctx.plan, ctx.model
    size = plan.size
    n_steps = UniRepLayout.grid_length(*UniRepLayout.grid_shape(size, size))
    prompts = [prompt_ids(i) for i in range(batch)]
    graphs0 = counters["stats"]["unique_graphs"]
    skips0 = counters["inductor"]["cudagraph_skips"]

    def run(steps: int) -> float:
        generators = [torch.Generator(ctx.device).manual_seed(i) for i in range(batch)]
        stop = (lambda s, tokens: s + 1 >= steps) if steps < n_steps else None
        sync(ctx)
        t = time.perf_counter()
        generate_image_tokens(model, prompts, height=size, width=size, generator=generators, compile=compile, callback=stop)
        sync(ctx)
        return time.perf_counter() - t

    reset_peak(ctx)
    t_warm = run(plan.warm_steps)
    t_short = min(run(plan.short_steps) for _ in range(plan.repeats))
    t_long = min(run(plan.long_steps) for _ in range(plan.repeats))
    per_step = (t_long - t_short) / (plan.long_steps - plan.short_steps)
    noisy = per_step <= 0  # the longer run was not slower: timings drowned in noise (a busy CPU)
    if noisy:
        per_step = t_long / plan.long_steps  # an upper bound: prefill included
    per_image = (t_short + (n_steps - plan.short_steps) * per_step) / batch
    peak = peak_gib(ctx)
    clear_decode_cache(model)

    bw = ctx.info.get("bandwidth_gbs")
    rows = 2 * batch  # conditional and unconditional rows
    total = max(len(p) for p in prompts) + 3 + n_steps
    cache_len = -(-total // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE
    weights = ctx.info["decode_weight_bytes"]
    kv = kv_bytes(model, rows, cache_len)
    fields = dict(batch=batch, s_per_image=per_image, steps_per_s=1 / per_step, tokens_per_s=batch / per_step, peak_gib=peak)
    notes = [f"per step {per_step * 1e3:.2f} ms, extrapolated from {plan.short_steps}/{plan.long_steps} steps to the "
             f"{n_steps} steps of a {size}x{size} image", f"first call {t_warm:.1f} s"]
    if noisy:
        notes[0] = f"per step {per_step * 1e3:.2f} ms from the {plan.long_steps}-step run alone (timings too noisy for the difference)"
    if bw:
        floor_step = weights / (bw * 1e9)
        fields.update(floor_s_per_image=n_steps * floor_step / batch,
                      floor_kv_s_per_image=n_steps * (weights + kv) / (bw * 1e9) / batch,
                      x_floor=per_step / floor_step)
        notes.append(f"KV cache read per step {kv / 1e9:.2f} GB ({rows} rows x {cache_len} positions)")
    if compile:
        notes.append(f"graphs compiled {counters['stats']['unique_graphs'] - graphs0}, "
                     f"cudagraph skips {counters['inductor']['cudagraph_skips'] - skips0}")
    fields["notes"] = "; ".join(notes)
    return fields


@section("decode_eager", estimate="decode_case")
def decode_eager(ctx):
    """Guided text-to-image decoding, eager, per batch size; then one whole image at batch 1, measured."""
    from lumina_hf.unirep import UniRepLayout
    import torch

    from lumina_hf.generation_lumina_mgpt import generate_image_tokens

    for batch in ctx.plan.eager_batches:
        case = f"eager, batch {batch}"
        if ctx.fits("decode_case", case, factor=1 + batch / 16):
            _guarded(ctx, case, lambda: ctx.add(case=case, **time_decode(ctx, batch, False)))
    case = "eager, batch 1, whole image + VQ decode (measured, not extrapolated)"
    if not ctx.fits("full_image", case):
        return

    def whole():
        size, model = ctx.plan.size, ctx.model
        reset_peak(ctx)
        sync(ctx)
        t = time.perf_counter()
        out = generate_image_tokens(model, [prompt_ids(0)], height=size, width=size,
                                    generator=torch.Generator(ctx.device).manual_seed(0))
        grid = out.sequences[0, 3:-1].view(size // 16, size // 16 + 1)[:, :-1]
        pixels = model.decode_image_tokens(grid.unsqueeze(0))
        sync(ctx)
        dt = time.perf_counter() - t
        assert tuple(pixels.shape) == (1, 3, size, size) and bool(torch.isfinite(pixels).all())
        steps = UniRepLayout.grid_length(*UniRepLayout.grid_shape(size, size))
        ctx.add(case=case, batch=1, s_per_image=dt, steps_per_s=steps / dt, tokens_per_s=steps / dt,
                peak_gib=peak_gib(ctx), notes=f"{steps} steps + prefill + VQGAN decode (fp32)")

    _guarded(ctx, case, whole)


@section("reference_loop")
def reference_loop(ctx):
    """The reference's loop: per step, guidance from two batch-1 forwards (each with its own dynamic cache),
    full-vocabulary logits, grid mask, top-k, softmax, multinomial, the token read back on the host."""
    import torch

    from lumina_hf.unirep import UniRepLayout

    model, size, steps = ctx.model, ctx.plan.size, ctx.plan.reference_steps
    plain = _benchmark_module("bench_generate")
    gen = torch.Generator(ctx.device).manual_seed(0)
    reset_peak(ctx)
    with torch.no_grad():
        tokens = plain.plain_loop_steps(model, prompt_ids(0), size, size, guidance=4.0, top_k=2000, generator=gen)
        times = []
        for _ in range(steps):  # the first step also runs the prompt's forwards: it is among the warm-up steps
            t = time.perf_counter()
            next(tokens)
            times.append(time.perf_counter() - t)
    sync(ctx)
    skip = min(10, steps // 4)  # the first steps warm up kernels and caches
    per_step = sum(times[skip:]) / (steps - skip)
    n_steps = UniRepLayout.grid_length(*UniRepLayout.grid_shape(size, size))
    ctx.info["reference_per_step_s"] = per_step
    fields = dict(batch=1, s_per_image=n_steps * per_step, steps_per_s=1 / per_step, tokens_per_s=1 / per_step,
                  peak_gib=peak_gib(ctx))
    bw = ctx.info.get("bandwidth_gbs")
    if bw:
        floor_step = ctx.info["decode_weight_bytes"] / (bw * 1e9)
        fields.update(floor_s_per_image=n_steps * floor_step, x_floor=per_step / floor_step)
    ctx.add(case="2 x batch-1 forwards per step, dynamic cache", **fields,
            notes=f"per step {per_step * 1e3:.2f} ms over {steps - skip} steps (after {skip} warm-up), extrapolated "
                  f"to {n_steps} steps; full-vocabulary head, so the floor is a lower bound")


@section("lora")
def lora(ctx):
    """LoRA (PEFT, the `lumina-hf train` defaults) at the image's full sequence length, batch 1, gradient
    checkpointing, AdamW: peak memory and tokens/s after warm-up steps. A plain PyTorch loop."""
    from lumina_hf.unirep import UniRepLayout
    import torch
    from peft import LoraConfig, get_peft_model


    model, plan, size = ctx.model, ctx.plan, ctx.plan.size
    cfg = model.config
    prompt = prompt_ids(0)
    span = 3 + UniRepLayout.grid_length(*UniRepLayout.grid_shape(size, size))
    g = torch.Generator().manual_seed(0)
    image = torch.randint(cfg.image_code_id_start, cfg.image_code_id_end + 1, (span,), generator=g).tolist()
    ids = torch.tensor([prompt + image + [cfg.separator_token_id]], device=ctx.device)
    labels = ids.clone()
    labels[:, : len(prompt)] = -100
    length = ids.shape[1]

    reset_peak(ctx)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, LoraConfig(**LORA))
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        times, losses = [], []
        for step in range(plan.lora_steps):
            sync(ctx)
            t = time.perf_counter()
            loss = peft_model(input_ids=ids, labels=labels, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(ctx)
            times.append(time.perf_counter() - t)
            losses.append(float(loss))
        timed = times[plan.lora_warmup :]
        per_step = sum(timed) / len(timed)
        trainable = sum(p.numel() for p in params)
        ctx.add(case=f"LoRA r={LORA['r']}, {size} px, batch 1, grad. checkpointing", batch=1,
                tokens_per_s=length / per_step, peak_gib=peak_gib(ctx),
                notes=f"{length} tokens/step, {per_step:.2f} s/step over {len(timed)} steps after {plan.lora_warmup} "
                      f"warm-up; {trainable / 1e6:.1f} M trainable; loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    finally:
        # back to the plain inference model for the sections after this one
        optimizer = params = None
        peft_model.unload()
        model.gradient_checkpointing_disable()
        model.eval().requires_grad_(False)
        reset_peak(ctx)


@section("decode_compiled", estimate="compiled_case")
def decode_compiled(ctx):
    """As decode_eager with compile="reduce-overhead": one compilation per batch size, CUDA graphs on a GPU."""
    for batch in ctx.plan.compiled_batches:
        case = f"compile={ctx.plan.compile_mode}, batch {batch}"
        if ctx.fits("compiled_case", case):
            _guarded(ctx, case, lambda: ctx.add(case=case, **time_decode(ctx, batch, ctx.plan.compile_mode)))


# Tokens decided per forward on the nano model at the reference's settings (top-k 2000, temperature 1.0, guidance
# 4.0), one image per call, from `benchmarks/bench_speculative.py` (README table). Random 7B weights say nothing
# about acceptance, so the projection below applies these to the measured cost of a window forward.
NANO_TOKENS_PER_FORWARD = {8: 1.68, 16: 1.73, 32: 1.74}


@section("speculative", estimate=(60, 6))
def speculative(ctx):
    """Speculative decoding: the cost of one window forward (N tokens per image) against a filled cache, the
    time per image it projects with the acceptance measured on the nano model, greedy tokens equal to plain
    decoding on this device, and one whole image at window 16."""
    import torch

    from lumina_hf.generation_lumina_mgpt import generate_image_tokens
    from lumina_hf.speculative import _WindowStep  # the step the speculative loop runs, timed alone
    from lumina_hf.unirep import UniRepLayout

    plan, model = ctx.plan, ctx.model
    size = plan.size
    n_steps = UniRepLayout.grid_length(*UniRepLayout.grid_shape(size, size))
    code_ids = model.model.image_code_to_id.to(ctx.device)
    rows = 2  # one image: conditional and unconditional rows
    repeats = 5 if ctx.dry_run else 20

    def window_cost() -> dict[int, float]:
        costs = {}
        prompt = torch.tensor([prompt_ids(0)] * rows, device=ctx.device)
        for window in (1, *NANO_TOKENS_PER_FORWARD):
            total = prompt.shape[1] + n_steps + window + 1
            step = _WindowStep(model, code_ids, False, total)
            step.start()
            mask = torch.ones((rows, total), dtype=torch.long, device=ctx.device)
            filled = torch.cat([prompt, torch.randint(4, 8000, (rows, n_steps // 2), device=ctx.device)], dim=1)
            pos = torch.arange(filled.shape[1], device=ctx.device).expand(rows, -1)
            with torch.no_grad():
                model.model(input_ids=filled, attention_mask=mask, position_ids=pos, cache=step.cache, use_cache=True)
                step.load_head(model)
                tokens = torch.randint(4, 8000, (rows, window), device=ctx.device)
                positions = filled.shape[1] + torch.arange(window, device=ctx.device).expand(rows, -1)
                times = []
                for _ in range(repeats + 2):
                    sync(ctx)
                    t = time.perf_counter()
                    step(tokens, positions, mask)
                    sync(ctx)
                    times.append(time.perf_counter() - t)
                    step.cache.crop(-window)  # the next forward writes the same slots, as the loop does
            costs[window] = sorted(times[2:])[len(times[2:]) // 2]
            del step
            reset_peak(ctx)
        return costs

    def cost_rows():
        costs = window_cost()
        one = costs[1]
        for window, cost in costs.items():
            notes = f"{cost * 1e3:.2f} ms per forward of {window} token(s) x {rows} rows, {cost / one:.2f}x one token"
            fields = dict(batch=1, steps_per_s=1 / cost)
            if window in NANO_TOKENS_PER_FORWARD:
                tpf = NANO_TOKENS_PER_FORWARD[window]
                fields["s_per_image"] = n_steps / tpf * cost
                notes += (f"; projected {n_steps / tpf:.0f} forwards per {size}x{size} image at the nano model's "
                          f"{tpf} tokens/forward (reference settings): {n_steps * one / (n_steps / tpf * cost):.2f}x "
                          "the one-token loop")
            else:
                fields["s_per_image"] = n_steps * cost
            ctx.add(case=f"window {window}: forward cost" if window > 1 else "window 1 (plain step): forward cost",
                    notes=notes, **fields)

    _guarded(ctx, "window forward cost", cost_rows)

    def greedy_equal():
        small = 64
        prompts = [prompt_ids(i) for i in range(2)]
        kw = dict(height=small, width=small, guidance_scale=3.0, do_sample=False)
        plain = generate_image_tokens(model, prompts, **kw)
        spec = generate_image_tokens(model, prompts, speculative_window=6, **kw)
        if not torch.equal(plain.sequences, spec.sequences):
            raise AssertionError("greedy speculative tokens differ from plain greedy decoding on this device")
        ctx.add(case="greedy tokens equal plain decoding (64x64, window 6, guidance 3)", batch=2,
                notes=f"{spec.num_forwards} forwards vs {plain.num_forwards}")

    _guarded(ctx, "greedy tokens equal plain decoding", greedy_equal)

    case = f"whole {size}x{size} image, window 16, batch 1 (random weights: acceptance not meaningful)"

    def whole():
        reset_peak(ctx)
        sync(ctx)
        t = time.perf_counter()
        out = generate_image_tokens(model, [prompt_ids(0)], height=size, width=size, speculative_window=16,
                                    generator=torch.Generator(ctx.device).manual_seed(0))
        sync(ctx)
        dt = time.perf_counter() - t
        ctx.add(case=case, batch=1, s_per_image=dt, steps_per_s=out.num_forwards / dt, tokens_per_s=n_steps / dt,
                peak_gib=peak_gib(ctx), notes=f"{out.num_forwards} forwards for {n_steps} tokens")

    if ctx.fits("full_image", case, factor=2):
        _guarded(ctx, case, whole)


def _benchmark_module(name: str):
    """A module of benchmarks/ (bench_memory, bench_tokenize), loaded from its file: this script runs as a script or
    through runpy, so benchmarks/ need not be on sys.path."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


# The memory section's modes and their decoding steps on the GPU (seconds per image are extrapolated from them):
# device_map_2way on one GPU reads half the decoder layers from CPU memory at every step, so it gets few steps.
MEMORY_MODES = ("bf16", "int8", "int4", "model_offload", "device_map_2way")
MEMORY_STEPS = {"bf16": 32, "int8": 32, "int4": 32, "model_offload": 32, "device_map_2way": 6}
# (GPU, dry run) seconds per mode: build a random 7B on the GPU, quantize or move it, warm up, time the steps
MEMORY_MODE_ESTIMATES = {"bf16": (10, 1), "int8": (15, 1), "int4": (20, 1), "model_offload": (20, 1),
                         "device_map_2way": (30, 1)}
PLANNER_TOLERANCE = 0.15  # the planner should be within 15% of the measured peak on a GPU


@section("memory", estimate=(95, 4))
def memory(ctx):
    """Memory-saving modes (bf16, int8, int4, model_offload, device_map_2way) on a fresh random 7B each
    (`benchmarks/bench_memory.py device_section`): peak memory next to the planner's prediction
    (`lumina_hf.memory_estimate`) and their ratio, s/image extrapolated from a few decoding steps, token agreement
    with bf16. A mode whose package is missing (torchao, accelerate), that needs CUDA (dry run), or that errors is a
    skipped row with the reason. sequential_offload is left out: it moves every layer to the GPU at every step, so
    even a few steps of a 7B take minutes (run it with bench_memory.device_section directly)."""
    import torch

    bench = _benchmark_module("bench_memory")
    if ctx.dry_run:
        from lumina_hf.testing_utils import tiny_config

        kw = dict(config=tiny_config(), device="cpu", max_steps=8)
    else:
        kw = dict(device=str(ctx.device), max_steps=MEMORY_STEPS)

    def before_mode(mode: str) -> str | None:
        need = MEMORY_MODE_ESTIMATES[mode][1 if ctx.dry_run else 0]
        if need > ctx.remaining():
            return f"budget: needs ~{need:.0f} s, {max(ctx.remaining(), 0):.0f} s left"
        return None

    size = ctx.plan.size
    result = bench.device_section(size=size, modes=MEMORY_MODES, seeds=(0,), warmup_steps=2, log=lambda line: None,
                                  before_mode=before_mode, **kw)
    ctx.info["memory_model"] = result["config"]
    for row in result["rows"]:
        mode = row["mode"]
        case = f"{mode}, {size}x{size}, batch 1"
        if "skipped" in row:
            ctx.add(case=case, status="skipped", notes=row["skipped"])
            continue
        if "error" in row:
            ctx.add(case=case, status="skipped", notes=f"error: {row['error'][:300]}", traceback=row.get("traceback"))
            continue
        predicted = row["predicted_bytes"]
        peak = row["peak_bytes"]
        notes = []
        if peak is None:
            notes.append(f"planner {predicted / 2**30:.3g} GiB; peak not measured on {ctx.device.type}")
        elif mode in ("bf16", "int8", "int4", "model_offload"):
            ratio = peak / predicted
            verdict = "within" if abs(ratio - 1) <= PLANNER_TOLERANCE else "OUTSIDE"
            notes.append(f"planner {predicted / 2**30:.2f} GiB, measured/planner {ratio:.3f} ({verdict} "
                         f"{PLANNER_TOLERANCE:.0%})")
        else:  # part of the model lives elsewhere: the planner's figure is for all of it on one device
            notes.append(f"planner {predicted / 2**30:.2f} GiB for the whole model on one device (not comparable: "
                         f"{row.get('placement', 'split')}), measured/planner {peak / predicted:.3f}")
        notes.append(f"s/image extrapolated from {row['steps']} steps (after a 2-step warm-up, prefill included)")
        if mode != row.get("reference"):
            notes.append(f"token agreement with {row['reference']} {row['token_agreement']:.3f} over "
                         f"{row['agreement_steps']} steps")
        notes.append(f"built in {row['build_s']:.1f} s" + (f"; {row['placement']}" if "placement" in row else ""))
        ctx.add(case=case, batch=1, s_per_image=row["s_per_image"],
                peak_gib=None if peak is None else peak / 2**30, predicted_gib=predicted / 2**30,
                notes="; ".join(notes))
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


@section("tokenize", estimate=(45, 10))
def tokenize(ctx):
    """Offline tokenization throughput (`benchmarks/bench_tokenize.py device_section`): `tokenize_dataset` items/s
    with the Chameleon-sized VQGAN (random weights) at target 768, decode vs encode shares; without datasets/TRL (as
    on the GPU machine) the VQ encode alone, images/s on batches of 16."""
    bench = _benchmark_module("bench_tokenize")
    if ctx.dry_run:
        from lumina_hf.testing_utils import tiny_config

        kw = dict(device="cpu", target=32, vq_config=tiny_config().vq_config.to_diff_dict(), num_workers=0,
                  max_items=64, budget_s=12.0)
    else:  # tokenize_dataset picks the default CUDA device
        kw = dict(device="cuda", max_items=512, budget_s=max(10.0, min(40.0, ctx.remaining() - 5)))
    out: dict = {}
    bench.device_section(out, **kw)
    r = out["tokenize"]
    setting = r["setting"]
    if "items_per_second" in r:
        ctx.add(case=f"tokenize_dataset: {setting}", batch=16, s_per_image=1 / r["items_per_second"],
                peak_gib=r.get("peak_memory_gb"),
                notes=f"{r['items_per_second']:.1f} items/s over {r['items']} items, {r['decode_workers']} decode "
                      f"workers; per item decode {r['decode_seconds_per_item']:.2e} s, VQ encode "
                      f"{r['encode_seconds_per_item']:.2e} s; shares decode {r['decode_share']}, encode "
                      f"{r['encode_share']}; warm-up {r['warmup']['items_per_second']:.1f} items/s; s/image = per item"
                      + ("; peak: torch.cuda.max_memory_allocated, the models earlier sections hold included"
                         if r.get("peak_memory_gb") is not None else ""))
    if "skipped" in r:
        warm = f" (warm-up {r['warmup']['items_per_second']:.1f} items/s)" if "warmup" in r else ""
        ctx.add(case=f"tokenize_dataset: {setting}", status="skipped", notes=r["skipped"] + warm)
    if "encode_only" in r:
        e = r["encode_only"]
        ctx.add(case=f"VQ encode only: {setting}", batch=e["batch"], s_per_image=e["seconds_per_image"],
                notes=f"{e['images_per_second']:.1f} images/s over {e['images']} images (after 2 warm-up batches), "
                      f"pinned host memory -> device -> codes read back; codes {tuple(e['codes_shape'])}")


# ---------------------------------------------------------------------- running
def _guarded(ctx, case: str, fn) -> None:
    """Run `fn`; an exception becomes a failed row (with its traceback in the JSON) and the run goes on."""
    try:
        fn()
    except Exception as err:
        ctx.add(case=case, status="failed", notes=f"{type(err).__name__}: {str(err).strip()[:300]}",
                traceback=traceback.format_exc(limit=12))
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass


def selected_sections(args) -> list[Section]:
    if not args.sections:
        return SECTIONS
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    names = [s.name for s in SECTIONS]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}: the sections are {', '.join(names)}.")
    return [s for s in SECTIONS if s.name in wanted]


def install_missing(wheels: Path) -> str:
    """pip-install the optional packages that are missing, from the wheel files in `wheels` only (no index).
    Returns what happened, for the report."""
    missing = [dist for name, dist in OPTIONAL.items() if importlib.util.find_spec(name) is None]
    if not missing:
        return "nothing missing"
    base = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
            "--find-links", str(wheels)]
    done, failed = [], []
    for dist in missing:  # one at a time: a package that cannot be installed does not block the others
        proc = subprocess.run(base + [dist], capture_output=True, text=True)
        if proc.returncode != 0 and "externally-managed" in proc.stderr:
            proc = subprocess.run(base + ["--break-system-packages", dist], capture_output=True, text=True)
        (done if proc.returncode == 0 else failed).append(dist)
    importlib.invalidate_caches()
    return f"installed {', '.join(done) or 'none'}" + (f"; could not install {', '.join(failed)}" if failed else "")


def start_watchdog(ctx, limit_s: float) -> threading.Timer:
    """After `limit_s` seconds, record the section that is still running as timed out, write the files, stop a
    running pytest subprocess and end the process: the run always finishes, with what it measured."""

    def fire():
        ctx.add(case="(watchdog)", status="timeout", notes=f"still running {limit_s:.0f} s after the start: run stopped")
        if ctx.child is not None and ctx.child.poll() is None:
            ctx.child.kill()
        os._exit(3)

    timer = threading.Timer(limit_s, fire)
    timer.daemon = True
    timer.start()
    return timer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for device_check.md, device_check.json and the pytest log")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds the sections may take (default 420 on a GPU, 130 for --dry-run); sections or "
                         "cases that would not fit are skipped")
    ap.add_argument("--grace-s", type=float, default=45.0, help="the watchdog stops the run this long after the budget")
    ap.add_argument("--dry-run", action="store_true", help="the same code on CPU with the tiny model and small step counts")
    ap.add_argument("--sections", default=None, help="comma-separated subset of the sections (default: all)")
    ap.add_argument("--list", action="store_true", help="list the sections and exit")
    ap.add_argument("--wheels", default=None,
                    help="install missing optional packages (pillow, pytest, accelerate, diffusers) from the wheel "
                         "files in this folder first (default: .whl/ at the repository root, if present)")
    args = ap.parse_args(argv)
    if args.list:
        for s in SECTIONS:
            print(f"{s.name:16s} {s.doc}")
        return 0
    if not args.out:
        ap.error("--out DIR is required: the folder for device_check.md and device_check.json")
    if args.budget_s is None:
        args.budget_s = 130.0 if args.dry_run else 420.0
    selected_sections(args)  # unknown names fail here, before any work
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run to exercise the script on CPU.")

    wheels = Path(args.wheels) if args.wheels else (REPO / ".whl")
    boot = install_missing(wheels) if wheels.is_dir() else None

    ctx = Context(args)
    if boot:
        ctx.info["bootstrap"] = boot
    watchdog = start_watchdog(ctx, args.budget_s + args.grace_s)
    try:
        run_sections(ctx)
    finally:
        watchdog.cancel()
    print((ctx.out / "device_check.md").read_text(encoding="utf-8"))
    return 0


def run_sections(ctx) -> None:
    args = ctx.args
    import torch

    ctx.device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    ctx.info["decode_note"] = (
        f"{ctx.plan.size}x{ctx.plan.size} text-to-image, guidance 4 (conditional + unconditional rows in one batch), "
        f"top-k 2000, per-image generators; per-step time from runs of {ctx.plan.short_steps} and "
        f"{ctx.plan.long_steps} steps, extrapolated to the whole image. 'x floor' = measured / weights floor."
    )
    needs_model = {"decode_eager", "reference_loop", "lora", "decode_compiled"}
    for sec in selected_sections(args):
        ctx.current = sec.name
        if sec.name in needs_model and ctx.model is None and sec.name != "model":
            ctx.add(case="-", status="skipped", notes="no model (the model section did not run or failed)")
            continue
        if sec.estimate in ESTIMATES and sec.estimate not in ("decode_case", "compiled_case"):
            if not ctx.fits(sec.estimate, "-"):
                continue
        before = len(ctx.rows)
        _guarded(ctx, "-", lambda: sec.fn(ctx))
        if len(ctx.rows) == before:
            ctx.add(case="-", status="ok", notes="no rows")
    ctx.current = "total"
    ctx.add(case="wall time", notes=f"{ctx.elapsed():.0f} s; {sum(r['status'] == 'failed' for r in ctx.rows)} failed, "
            f"{sum(r['status'] == 'skipped' for r in ctx.rows)} skipped")


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's teardown: every result is already written (atomically) and printed, and the
    # teardown sometimes aborts in C++ after torch.compile has run ("terminate called without an active exception",
    # exit status 134; seen about once in three CPU dry runs), which would turn a complete run into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
