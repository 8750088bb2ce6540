"""Convert a published Lumina-mGPT checkpoint plus Meta's Chameleon VQGAN into one self-contained folder.

Inputs, exactly as published:
- the Alpha-VLLM checkpoint folder (or Hub id): `config.json` (`model_type: "chameleon"`, the fork's keys),
  sharded safetensors with `model.safetensors.index.json` (or one `model.safetensors`), q/k-norm weights
  grouped as `[model_parallel_size, head_dim]`;
- Meta's `tokenizer/` folder: `vqgan.yaml` (taming-transformers config) and `vqgan.ckpt` (a torch pickle
  with a `state_dict`, read with `weights_only=True`);
- a tokenizer: the HF `tokenizer.json` (shipped by the 768 repo) or Meta's `text_tokenizer.json`.

Output: a diffusers pipeline folder that `LuminaMGPTPipeline.from_pretrained` loads:
```
output/
  model_index.json
  model/      config.json (LuminaMGPTConfig), generation_config.json, safetensors shards (+ index)
  processor/  tokenizer + image processor (the checkpoint's bucket target size)
  README.md   model card
```
The conversion streams: each input shard is read tensor by tensor with `safe_open` and output shards are
written as soon as they are full, so memory stays around one output shard (`max_shard_size`), never the
whole model. Everything is validated before the first byte is written, and written into a temporary folder
next to `output` that is renamed into place at the end: an error leaves no output behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Callable

import torch

from .conversion.output import (
    LOCK_FILE,
    current_umask,
    generation_config_for,
    install_output,
    interrupt_on_termination,
    is_lumina_output,
    is_within,
    model_index,
    remove_stale_temp_folders,
    temp_prefix,
    write_weights,
)
from .conversion.plan import build_config, check_and_plan, expected_state_shapes, split_shards
from .conversion.sources import (
    PUBLISHED_TARGET_SIZES,
    dtype_name,
    index_checkpoint_tensors,
    infer_target_size,
    load_tokenizer,
    load_vqgan_state_dict,
    looks_like_hub_id,
    parse_size,
    read_published_config,
    read_vqgan_yaml,
    resolve_checkpoint,
    resolve_dtype,
    tokenizer_json_candidates,
)

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ public API
def convert_checkpoint(
    checkpoint: str | os.PathLike,
    vqgan: str | os.PathLike,
    output: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    target_size: int | None = None,
    dtype: str | torch.dtype | None = "bfloat16",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    revision: str | None = None,
    progress: bool = True,
) -> str:
    """Convert a published Lumina-mGPT checkpoint and Meta's Chameleon VQGAN into one lumina_hf folder.

    Args:
        checkpoint: the Alpha-VLLM checkpoint folder (`config.json` + safetensors), or a Hub id such as
            `Alpha-VLLM/Lumina-mGPT-7B-768` (downloaded with `huggingface_hub.snapshot_download`).
        vqgan: Meta's Chameleon `tokenizer/` folder with `vqgan.yaml` and `vqgan.ckpt`.
        output: the folder to create (a diffusers pipeline folder: `model/`, `processor/`, `model_index.json`).
        tokenizer: a `tokenizer.json` / `text_tokenizer.json` (or a folder holding one). Default: the
            checkpoint's `tokenizer.json`, else `text_tokenizer.json` in `vqgan`.
        target_size: the image-bucket target size of the checkpoint (512, 768, 1024; any multiple of 32).
            Default: read from the checkpoint's name (`...-768...`).
        dtype: dtype of the language-model weights ("bfloat16", "float16", "float32", or "auto"/None to keep
            the checkpoint's). The VQGAN is always float32.
        max_shard_size: largest output shard (`"5GB"` or bytes); it also bounds the conversion's memory.
        overwrite: replace an existing `output`.
        revision: Hub revision when `checkpoint` is a Hub id.
        progress: show a progress bar over tensors.

    Returns: the absolute path of `output`.

    Raises `ValueError` for bad input (missing files, another architecture, shape mismatches, a vqgan.ckpt
    with non-tensor content, an existing output): always before anything is written.
    """
    output = _checked_output(output, overwrite)
    out_dtype = resolve_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    vqgan_dir, ckpt_dir = _checked_sources(checkpoint, vqgan, output, revision)

    # ---- read and validate everything (nothing is written before this block ends)
    published = read_published_config(ckpt_dir)
    tensors = index_checkpoint_tensors(ckpt_dir)
    vq_config, vq_state = _read_vqgan(vqgan_dir)
    tok = load_tokenizer(_tokenizer_path(tokenizer, ckpt_dir, vqgan_dir))
    config = build_config(published, tensors, vq_config, tok, out_dtype)
    plan = check_and_plan(expected_state_shapes(config), tensors, vq_state, out_dtype)
    target_size = _resolve_target_size(target_size, checkpoint, published)
    processor = _build_processor(tok, target_size)
    _check_special_token_ids(config, processor)
    shards = split_shards(plan, max_bytes)
    card_options = _card_options(checkpoint, published, target_size)

    # ---- write into a temporary folder next to the output, then move it into place
    def fill(tmp: str) -> None:
        _write_model(os.path.join(tmp, "model"), plan, shards, vq_state, config, out_dtype, progress)
        processor.save_pretrained(os.path.join(tmp, "processor"))
        _write_model_index(tmp)
        _write_card(tmp, os.path.basename(output), card_options)

    _write_atomically(output, overwrite, fill)
    logger.info("converted %s -> %s", os.fspath(checkpoint), output)
    return output


# ------------------------------------------------------------------------- checks before any work
def _checked_output(output: str | os.PathLike, overwrite: bool) -> str:
    """The absolute output path; refuses an existing one unless `overwrite`, and never replaces a foreign folder."""
    output = os.path.abspath(os.path.expanduser(os.fspath(output)))
    if os.path.lexists(output) and not overwrite:
        raise ValueError(f"output {output} already exists: pass --overwrite (overwrite=True) to replace it.")
    if os.path.lexists(output) and not is_lumina_output(output):
        raise ValueError(
            f"refusing to overwrite {output}: it is not a lumina_hf pipeline folder (no model_index.json naming "
            "LuminaMGPTPipeline). Remove it yourself or choose another --output."
        )
    return output


def _checked_sources(
    checkpoint: str | os.PathLike, vqgan: str | os.PathLike, output: str, revision: str | None
) -> tuple[str, str]:
    """`(vqgan_dir, ckpt_dir)`: the VQGAN folder must exist, the checkpoint resolves, neither overlaps `output`."""
    vqgan_dir = os.path.abspath(os.path.expanduser(os.fspath(vqgan)))
    if not os.path.isdir(vqgan_dir):
        raise ValueError(f"--vqgan {vqgan_dir} is not a folder (give Meta's Chameleon `tokenizer/` folder with vqgan.yaml and vqgan.ckpt).")
    ckpt_dir = resolve_checkpoint(checkpoint, revision)
    for name, folder in (("--checkpoint", ckpt_dir), ("--vqgan", vqgan_dir)):
        if is_within(folder, output) or is_within(output, folder):
            raise ValueError(f"output {output} overlaps the {name} folder {folder}: write the conversion elsewhere.")
    return vqgan_dir, ckpt_dir


# ------------------------------------------------------------------------------ reading the inputs
def _read_vqgan(vqgan_dir: str) -> tuple[dict, dict]:
    """`(vq_config, vq_state)` from `vqgan.yaml` and `vqgan.ckpt` (non-VQ tensors are dropped and logged)."""
    vq_config = read_vqgan_yaml(os.path.join(vqgan_dir, "vqgan.yaml"))
    vq_state, vq_ignored = load_vqgan_state_dict(os.path.join(vqgan_dir, "vqgan.ckpt"))
    if vq_ignored:
        logger.info("vqgan.ckpt: ignoring %d non-VQ tensors (training losses): %s", len(vq_ignored), ", ".join(vq_ignored))
    return vq_config, vq_state


def _tokenizer_path(tokenizer: str | os.PathLike | None, ckpt_dir: str, vqgan_dir: str) -> str:
    """The tokenizer file to read: the given one, else the first default candidate that exists."""
    if tokenizer is None:
        candidates = tokenizer_json_candidates(ckpt_dir, vqgan_dir)
        found = [c for c in candidates if os.path.isfile(c)]
        if not found:
            raise ValueError(f"no tokenizer found (looked for {', '.join(candidates)}): pass --tokenizer tokenizer.json.")
        tokenizer = found[0]
    tokenizer_path = os.path.abspath(os.path.expanduser(os.fspath(tokenizer)))
    if not os.path.exists(tokenizer_path):
        raise ValueError(f"tokenizer file not found: {tokenizer_path}")
    return tokenizer_path


def _resolve_target_size(target_size: int | None, checkpoint: str | os.PathLike, published: dict) -> int:
    """The given image target size, else the one in the checkpoint's name (refused when there is none)."""
    if target_size is None:
        target_size = infer_target_size(checkpoint, published)
        if target_size is None:
            raise ValueError(
                f"cannot tell the image target size of {checkpoint} from its name: pass --target-size "
                f"({', '.join(map(str, PUBLISHED_TARGET_SIZES))}, the number in the checkpoint's name)."
            )
        logger.info("target size %d (from the checkpoint's name)", target_size)
    return target_size


def _build_processor(tok, target_size: int):
    """The output's `LuminaMGPTProcessor`: the tokenizer plus an image processor for `target_size`."""
    from .image_processing_lumina_mgpt import LuminaMGPTImageProcessor
    from .processing_lumina_mgpt import LuminaMGPTProcessor

    return LuminaMGPTProcessor(image_processor=LuminaMGPTImageProcessor(target_size=int(target_size)), tokenizer=tok)


def _check_special_token_ids(config, processor) -> None:
    """Refuse a config whose image/separator token ids differ from the tokenizer's."""
    for field, pid in (
        ("image_start_token_id", processor.image_start_token_id),
        ("image_end_token_id", processor.image_end_token_id),
        ("image_row_end_token_id", processor.row_end_token_id),
        ("separator_token_id", processor.separator_token_id),
        ("image_placeholder_token_id", processor.image_placeholder_token_id),
    ):
        if getattr(config, field) != pid:
            raise ValueError(f"the config's {field}={getattr(config, field)} differs from the tokenizer's id {pid}.")


def _card_options(checkpoint: str | os.PathLike, published: dict, target_size: int):
    """The model card's `PublishOptions`, checked before anything is written.

    The card is rendered by lumina_hf.hub (the templates `lumina-hf push` uses); `base_model` is the Hub id the
    checkpoint came from (the argument, else the published `_name_or_path`), dropped when the Hub would not
    accept it as a repo id.
    """
    source = os.fspath(checkpoint)
    base_model = source if (not os.path.isdir(os.path.expanduser(source)) and looks_like_hub_id(source)) else None
    if base_model is None and looks_like_hub_id(str(published.get("_name_or_path", ""))):
        base_model = str(published["_name_or_path"])
    from .hub import PublishInputError, PublishOptions

    try:
        return PublishOptions(base_model=base_model, target_size=int(target_size))
    except PublishInputError:
        return PublishOptions(target_size=int(target_size))


# ---------------------------------------------------------------------------------- writing the folder
def _write_atomically(output: str, overwrite: bool, fill: Callable[[str], None]) -> None:
    """Run `fill` on a locked temporary folder next to `output`, then move it into place; on any error
    (or a termination signal) the temporary folder is removed and nothing is left behind."""
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temp_folders(output)
    tmp = tempfile.mkdtemp(prefix=temp_prefix(output), dir=parent)
    with open(os.path.join(tmp, LOCK_FILE), "w", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()}\n")
    restore_signals = interrupt_on_termination()
    try:
        fill(tmp)
        os.remove(os.path.join(tmp, LOCK_FILE))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the output gets normal permissions
        install_output(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        restore_signals()


def _write_model(model_dir: str, plan, shards, vq_state: dict, config, out_dtype, progress: bool) -> None:
    """`model/`: the weight shards (+ index), `config.json` and `generation_config.json`."""
    os.makedirs(model_dir)
    logger.info(
        "converting %d tensors into %d shard(s) (%s language model, float32 VQGAN)",
        len(plan), len(shards), dtype_name(out_dtype) if out_dtype else "source-dtype",
    )
    write_weights(model_dir, shards, vq_state, progress)
    config.save_pretrained(model_dir)
    generation_config_for(config).save_pretrained(model_dir)


def _write_model_index(folder: str) -> None:
    """`model_index.json`, the file that makes `folder` a diffusers pipeline folder."""
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(model_index(), f, indent=2, sort_keys=True)
        f.write("\n")


def _write_card(folder: str, name: str, card_options) -> None:
    """`README.md`: the model card rendered from the folder's own files."""
    from .hub import render_local_card

    card = render_local_card(folder, name, options=card_options)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)

__all__ = ["convert_checkpoint"]

