"""benchmarks/device_check.py, known to work before it first meets a GPU: its dry run (the same code on CPU
with the tiny model) writes the table and the JSON it promises, its budget skips what does not fit, and the
package, the generation loop and the script import where diffusers, TRL and datasets are not installed (as on
the GPU machine)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lumina_hf

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.py"
# the lumina_hf this test session imports: the subprocesses must use the same one
SRC = str(Path(lumina_hf.__file__).resolve().parents[1])
ABSENT = ("diffusers", "trl", "datasets")
# `None` in sys.modules is how Python marks a module as not importable: `import x` raises ModuleNotFoundError
# and `importlib.util.find_spec("x")` returns None, which is what transformers' availability checks see.
BLOCK = f"import sys\nfor _name in {ABSENT!r}:\n    sys.modules[_name] = None\n"


def run_python(code: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def test_package_and_device_check_import_without_diffusers_trl_datasets():
    code = BLOCK + textwrap.dedent(f"""
        import importlib.util
        import torch
        import lumina_hf
        from lumina_hf import LuminaMGPTForConditionalGeneration, LuminaMGPTProcessor
        from lumina_hf.generation_lumina_mgpt import generate_image_tokens
        from lumina_hf.testing_utils import build_tiny_model
        from transformers import AutoModelForCausalLM
        from lumina_hf.testing_utils import tiny_config

        assert isinstance(AutoModelForCausalLM.from_config(tiny_config()), LuminaMGPTForConditionalGeneration)
        out = generate_image_tokens(build_tiny_model(), [[0, 9300, 8710]], height=32, width=64,
                                    generator=torch.Generator().manual_seed(0))
        assert tuple(out.sequences.shape) == (1, 3 + 2 * 5 + 1), out.sequences.shape
        spec = importlib.util.spec_from_file_location("device_check", {str(SCRIPT)!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules["device_check"] = module
        spec.loader.exec_module(module)
        assert [s.name for s in module.SECTIONS][:2] == ["environment", "pytest_cuda"]
        try:
            lumina_hf.LuminaMGPTPipeline
        except ImportError as err:
            assert "diffusers" in str(err), err
        else:
            raise AssertionError("the pipeline imported without diffusers")
        loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in {ABSENT!r})
        assert not loaded, loaded
        print("ok")
    """)
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole dry run, once, with diffusers/TRL/datasets blocked and a budget that fits everything."""
    out = tmp_path_factory.mktemp("device_check")
    code = BLOCK + textwrap.dedent(f"""
        import runpy
        sys.argv = ["device_check.py", "--dry-run", "--out", {str(out)!r}, "--budget-s", "900"]
        runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
    """)
    proc = run_python(code, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "device_check.json").read_text()), (out / "device_check.md").read_text()


def test_dry_run_measures_every_section(dry_run):
    out, report, markdown = dry_run
    rows = report["rows"]
    by_section = {}
    for row in rows:
        by_section.setdefault(row["section"], []).append(row)
    assert report["meta"]["sections"] == ["environment", "pytest_cuda", "model", "bandwidth", "decode_eager",
                                          "reference_loop", "lora", "decode_compiled", "speculative", "memory",
                                          "tokenize"]
    assert set(report["meta"]["sections"]) <= set(by_section)
    assert not [r for r in rows if r["status"] == "failed"], [r for r in rows if r["status"] == "failed"]

    # pytest -m cuda ran in its subprocess: every CUDA test is there, skipped on this CPU machine
    tests = [r for r in by_section["pytest_cuda"] if "::" in r["case"]]
    assert all(r["status"] == "skipped" for r in tests), [r for r in tests if r["status"] != "skipped"]
    # test_cuda's own tests skip for want of the GPU; the others (quantization, offload, the fused loss) for the
    # GPU or for an optional package, and their reason says which and how to install it
    assert len([r for r in tests if r["case"].startswith("test_cuda::")]) >= 7
    assert all("CUDA" in r["notes"] for r in tests if r["case"].startswith("test_cuda::"))
    assert all("CUDA" in r["notes"] or "install" in r["notes"] for r in tests), [r["notes"] for r in tests]
    assert (out / "pytest_cuda.log").exists()

    decode = {r["case"]: r for r in by_section["decode_eager"] + by_section["decode_compiled"]}
    for case, batch in (("eager, batch 1", 1), ("eager, batch 2", 2), ("compile=reduce-overhead, batch 1", 1)):
        row = decode[case]
        assert row["status"] == "ok" and row["batch"] == batch
        assert row["s_per_image"] > 0 and row["steps_per_s"] > 0 and row["peak_gib"] > 0
        assert row["floor_s_per_image"] > 0 and row["floor_kv_s_per_image"] > row["floor_s_per_image"]
        # extrapolated from two runs, or (a CPU too busy for the difference) taken from the longer run alone
        assert row["notes"].startswith("per step ") and ("extrapolated" in row["notes"] or "run alone" in row["notes"])
    assert "graphs compiled 1," in decode["compile=reduce-overhead, batch 1"]["notes"]
    whole = next(r for r in by_section["decode_eager"] if "whole image" in r["case"])
    assert whole["status"] == "ok" and whole["s_per_image"] > 0
    assert report["meta"]["bandwidth_gbs"] > 0 and report["meta"]["decode_weight_bytes"] > 0

    (reference,) = by_section["reference_loop"]
    assert reference["status"] == "ok" and reference["s_per_image"] > 0
    (lora,) = by_section["lora"]
    assert lora["status"] == "ok" and lora["tokens_per_s"] > 0 and "trainable" in lora["notes"]

    spec = {r["case"]: r for r in by_section["speculative"]}
    assert all(r["status"] == "ok" for r in spec.values()), spec
    assert "window 16: forward cost" in spec and "projected" in spec["window 16: forward cost"]["notes"]
    assert any(case.startswith("greedy tokens equal") for case in spec)
    assert any(case.startswith("whole ") and r["s_per_image"] > 0 for case, r in spec.items())

    # memory: every mode has its row; bf16 ran (planner figure, extrapolated s/image, no peak invented on a CPU);
    # the modes that need CUDA say so; int8 ran or says torchao is missing
    memory = {r["case"].split(",")[0]: r for r in by_section["memory"]}
    assert list(memory) == ["bf16", "int8", "int4", "model_offload", "device_map_2way"], list(memory)
    assert all(r["status"] in ("ok", "skipped") and r["notes"] for r in memory.values()), memory
    bf16 = memory["bf16"]
    assert bf16["status"] == "ok" and bf16["s_per_image"] > 0 and bf16["predicted_gib"] > 0
    assert bf16["peak_gib"] is None and "peak not measured on cpu" in bf16["notes"] and "extrapolated" in bf16["notes"]
    for mode in ("int4", "model_offload", "device_map_2way"):
        assert memory[mode]["status"] == "skipped" and "CUDA" in memory[mode]["notes"], memory[mode]
    int8 = memory["int8"]
    assert ((int8["status"] == "ok" and "token agreement with bf16" in int8["notes"])
            or (int8["status"] == "skipped" and "torchao is not installed" in int8["notes"])), int8
    assert "sequential_offload" not in memory  # slow: left out of the check (the section's docstring says so)

    # tokenize: datasets and TRL are blocked here, as on the GPU machine: tokenize_dataset is a skipped row that
    # says why, and the VQ encode alone is measured
    tokenize = by_section["tokenize"]
    assert [r["status"] for r in tokenize] == ["skipped", "ok"], tokenize
    assert tokenize[0]["case"].startswith("tokenize_dataset: ") and "datasets and trl not installed" in tokenize[0]["notes"]
    assert tokenize[1]["case"].startswith("VQ encode only: ") and tokenize[1]["s_per_image"] > 0
    assert "images/s" in tokenize[1]["notes"]

    # one markdown table holding every row of the JSON
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert table[0].startswith("| Section | Case | Status |") and set(table[1]) <= set("|-")
    assert len(table) == 2 + len(rows)


def test_tokenize_section_runs_tokenize_dataset_where_datasets_and_trl_are_installed(tmp_path):
    """The tokenize section's main path (the dry run above blocks datasets and TRL, so it measures the encode alone)."""
    pytest.importorskip("datasets")
    pytest.importorskip("trl")
    proc = run_python(f"import runpy, sys; sys.argv = ['x', '--out', {str(tmp_path)!r}, '--dry-run', '--sections', "
                      f"'tokenize']; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for r in json.loads((tmp_path / "device_check.json").read_text())["rows"] if r["section"] == "tokenize"]
    assert [r["status"] for r in rows] == ["ok"], rows
    (row,) = rows
    assert row["case"].startswith("tokenize_dataset: small VQGAN") and row["s_per_image"] > 0
    assert "items/s over 64 items" in row["notes"] and "VQ encode" in row["notes"]


def test_budget_skips_what_does_not_fit(tmp_path):
    """With no time left every section is skipped (and says why), and the files are still written."""
    code = textwrap.dedent(f"""
        import runpy, sys
        sys.argv = ["device_check.py", "--dry-run", "--out", {str(tmp_path)!r}, "--budget-s", "0"]
        runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
    """)
    proc = run_python(code, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "device_check.json").read_text())["rows"]
    sections = [r for r in rows if r["section"] != "total"]
    assert sections and all(r["status"] == "skipped" for r in sections)
    assert all("budget" in r["notes"] or "no model" in r["notes"] for r in sections)
    assert "| total | wall time |" in (tmp_path / "device_check.md").read_text()


def test_unknown_section_fails_before_any_work(tmp_path):
    proc = run_python(f"import runpy, sys; sys.argv = ['x', '--out', {str(tmp_path / 'o')!r}, '--dry-run', "
                      f"'--sections', 'decode_eager,nope']; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')", timeout=120)
    assert proc.returncode != 0 and "unknown section(s) ['nope']" in proc.stderr
    assert not (tmp_path / "o").exists()
