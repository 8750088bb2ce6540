"""Writing the converted folder: shards streamed into a temporary folder next to the output, renamed into place at
the end; temporary folders of killed runs cleaned up; only a lumina_hf folder may be overwritten."""


from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
import uuid
from typing import Any

import torch

from ..configuration_lumina_mgpt import LuminaMGPTConfig
from .plan import PlanEntry
from .sources import GENERATION_DEFAULTS, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ writing
def _write_shard(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write one output shard (a seam for tests that simulate a failure)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})


def write_weights(
    model_dir: str, shards: list[list[PlanEntry]], vq_state: dict[str, torch.Tensor], progress: bool
) -> None:
    """Write the planned output shards one by one (+ the index when there are several).

    `safe_open` maps an input file and `get_tensor` returns views of that mapping, so every page a written
    tensor touched stays resident while the file is open: the input files are opened per output shard and
    closed once it is written, which bounds memory by about one output shard, not one input file."""
    from contextlib import ExitStack

    from safetensors import safe_open
    from tqdm.auto import tqdm

    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    total = 0
    with tqdm(total=sum(len(s) for s in shards), desc="Converting tensors", unit="tensor", disable=not progress) as bar:
        for shard, name in zip(shards, names):
            out: dict[str, torch.Tensor] = {}
            with ExitStack() as stack:
                handles: dict[str, Any] = {}
                for e in shard:
                    if e.source is None:
                        t = vq_state[e.src_key].to(torch.float32)
                    else:
                        if e.source not in handles:
                            handles[e.source] = stack.enter_context(safe_open(e.source, framework="pt"))
                        t = handles[e.source].get_tensor(e.src_key).to(e.dtype)
                    out[e.out_key] = t.contiguous()
                    weight_map[e.out_key] = name
                    total += e.nbytes
                    bar.update(1)
                _write_shard(os.path.join(model_dir, name), out)
                del out, t
            logger.info("wrote %s (%d tensors)", name, len(shard))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(model_dir, WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")


def generation_config_for(config: LuminaMGPTConfig):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.separator_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=True,
        **GENERATION_DEFAULTS,
    )


def model_index() -> dict[str, Any]:
    """What `LuminaMGPTPipeline(model, processor).save_pretrained` writes as model_index.json."""
    import diffusers

    from ..modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration
    from ..pipeline_lumina_mgpt import LuminaMGPTPipeline
    from ..processing_lumina_mgpt import LuminaMGPTProcessor

    return {
        "_class_name": LuminaMGPTPipeline.__name__,
        "_diffusers_version": diffusers.__version__,
        "model": [LuminaMGPTForConditionalGeneration.__module__, LuminaMGPTForConditionalGeneration.__name__],
        "processor": [LuminaMGPTProcessor.__module__, LuminaMGPTProcessor.__name__],
    }


LOCK_FILE = ".lumina-convert.pid"  # in a conversion's temporary folder: the PID of the process writing it


def temp_prefix(output: str) -> str:
    return f".{os.path.basename(output)}.converting-"


def is_lumina_output(folder: str) -> bool:
    """Whether `folder` is a pipeline folder that lumina_hf wrote (what `--overwrite` may replace)."""
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as fh:
            return json.load(fh).get("_class_name") == "LuminaMGPTPipeline"
    except (OSError, ValueError, AttributeError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temp_folders(output: str) -> list[str]:
    """Remove the temporary folders that killed conversions to `output` left behind (their process is gone);
    returns what was removed. A folder whose process still runs is left alone."""
    parent, prefix = os.path.dirname(output), temp_prefix(output)
    removed = []
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        folder = os.path.join(parent, name)
        if not (name.startswith(prefix) and os.path.isdir(folder)):
            continue
        try:
            with open(os.path.join(folder, LOCK_FILE), encoding="utf-8") as fh:
                pid = int(fh.read().strip())
        except (OSError, ValueError):
            pid = None  # killed before it wrote its PID (or not ours to judge): stale once it is an hour old
            if time.time() - os.path.getmtime(folder) < 3600:
                continue
        if pid is not None and _pid_alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        logger.warning("removed %s, left behind by an interrupted conversion", folder)
    return removed


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def interrupt_on_termination():
    """While converting, SIGTERM (and SIGHUP) interrupt like Ctrl-C, so the temporary folder is removed on the way
    out. Returns a function that restores the previous handlers (a no-op outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    wanted = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {sig: signal.signal(sig, interrupt) for sig in wanted}

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def install_output(tmp: str, output: str, overwrite: bool) -> None:
    """Move the finished `tmp` folder to `output` (replacing it with `overwrite`)."""
    old = None
    if os.path.lexists(output):
        if not overwrite:
            raise ValueError(f"output {output} appeared during the conversion; pass overwrite=True to replace it.")
        old = f"{output}.old-{uuid.uuid4().hex[:8]}"
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def is_within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)

