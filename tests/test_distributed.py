"""A real two-process data-parallel launch (torch.distributed over gloo on CPU) of the training entry point.

DDP averages the ranks' gradients; the trainer's loss is normalised by the token count of *all* ranks and scaled
by the process count (`LuminaSFTTrainer.compute_loss`). If that bookkeeping is right, two processes with two items
each train exactly like one process with two accumulated micro-batches of two items: same losses, same gradient
norms (Adam hides a gradient scale error in the weights, the logged norm does not), same weights."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "tiny", "config_full.yaml")
COMMON = [
    "--config", RECIPE, "--max_steps", "3", "--per_device_train_batch_size", "2", "--dropout", "0.0",
    "--group_by_length", "false", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3",
    "--activation_checkpointing", "false", "--use_cpu", "true", "--lr_scheduler_type", "constant",
    "--warmup_ratio", "0", "--report_to", "none",
]


def _launch(cmd: list[str], out: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd + ["--output_dir", out], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(out, "checkpoint-3", "trainer_state.json"), encoding="utf-8") as fh:
        state = json.load(fh)
    return {"stdout": proc.stdout, "logs": [h for h in state["log_history"] if "loss" in h]}


def test_two_process_ddp_equals_gradient_accumulation(tmp_path):
    ddp = _launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lumina_hf.train",
         *COMMON],
        str(tmp_path / "ddp"),
    )
    one = _launch(
        [sys.executable, "-m", "lumina_hf.train", *COMMON, "--gradient_accumulation_steps", "2"],
        str(tmp_path / "ga"),
    )
    # the launch really ran two ranks: each step covered 4 of the 16 items (one process alone would cover 2)
    assert [h["epoch"] for h in ddp["logs"]] == pytest.approx([0.25, 0.5, 0.75])
    assert [h["num_tokens"] for h in ddp["logs"]] == [h["num_tokens"] for h in one["logs"]]
    for a, b in zip(ddp["logs"], one["logs"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert ddp["logs"][-1]["loss"] < ddp["logs"][0]["loss"]
    a = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "ga" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # one summary line per launch, not one per rank
    assert ddp["stdout"].count("trained ") == 1
