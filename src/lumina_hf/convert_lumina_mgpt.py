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
    output = os.path.abspath(os.path.expanduser(os.fspath(output)))
    if os.path.lexists(output) and not overwrite:
        raise ValueError(f"output {output} already exists: pass --overwrite (overwrite=True) to replace it.")
    if os.path.lexists(output) and not is_lumina_output(output):
        raise ValueError(
            f"refusing to overwrite {output}: it is not a lumina_hf pipeline folder (no model_index.json naming "
            "LuminaMGPTPipeline). Remove it yourself or choose another --output."
        )
    out_dtype = resolve_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    vqgan_dir = os.path.abspath(os.path.expanduser(os.fspath(vqgan)))
    if not os.path.isdir(vqgan_dir):
        raise ValueError(f"--vqgan {vqgan_dir} is not a folder (give Meta's Chameleon `tokenizer/` folder with vqgan.yaml and vqgan.ckpt).")
    ckpt_dir = resolve_checkpoint(checkpoint, revision)
    for name, folder in (("--checkpoint", ckpt_dir), ("--vqgan", vqgan_dir)):
        if is_within(folder, output) or is_within(output, folder):
            raise ValueError(f"output {output} overlaps the {name} folder {folder}: write the conversion elsewhere.")

    # ---- read and validate everything (nothing is written before this block ends)
    published = read_published_config(ckpt_dir)
    tensors = index_checkpoint_tensors(ckpt_dir)
    vq_config = read_vqgan_yaml(os.path.join(vqgan_dir, "vqgan.yaml"))
    vq_state, vq_ignored = load_vqgan_state_dict(os.path.join(vqgan_dir, "vqgan.ckpt"))
    if vq_ignored:
        logger.info("vqgan.ckpt: ignoring %d non-VQ tensors (training losses): %s", len(vq_ignored), ", ".join(vq_ignored))
    if tokenizer is None:
        candidates = tokenizer_json_candidates(ckpt_dir, vqgan_dir)
        found = [c for c in candidates if os.path.isfile(c)]
        if not found:
            raise ValueError(f"no tokenizer found (looked for {', '.join(candidates)}): pass --tokenizer tokenizer.json.")
        tokenizer = found[0]
    tokenizer_path = os.path.abspath(os.path.expanduser(os.fspath(tokenizer)))
    if not os.path.exists(tokenizer_path):
        raise ValueError(f"tokenizer file not found: {tokenizer_path}")
    tok = load_tokenizer(tokenizer_path)
    config = build_config(published, tensors, vq_config, tok, out_dtype)
    plan = check_and_plan(expected_state_shapes(config), tensors, vq_state, out_dtype)

    if target_size is None:
        target_size = infer_target_size(checkpoint, published)
        if target_size is None:
            raise ValueError(
                f"cannot tell the image target size of {checkpoint} from its name: pass --target-size "
                f"({', '.join(map(str, PUBLISHED_TARGET_SIZES))}, the number in the checkpoint's name)."
            )
        logger.info("target size %d (from the checkpoint's name)", target_size)
    from .image_processing_lumina_mgpt import LuminaMGPTImageProcessor
    from .processing_lumina_mgpt import LuminaMGPTProcessor

    processor = LuminaMGPTProcessor(image_processor=LuminaMGPTImageProcessor(target_size=int(target_size)), tokenizer=tok)
    for field, pid in (
        ("image_start_token_id", processor.image_start_token_id),
        ("image_end_token_id", processor.image_end_token_id),
        ("image_row_end_token_id", processor.row_end_token_id),
        ("separator_token_id", processor.separator_token_id),
        ("image_placeholder_token_id", processor.image_placeholder_token_id),
    ):
        if getattr(config, field) != pid:
            raise ValueError(f"the config's {field}={getattr(config, field)} differs from the tokenizer's id {pid}.")
    shards = split_shards(plan, max_bytes)
    source = os.fspath(checkpoint)
    base_model = source if (not os.path.isdir(os.path.expanduser(source)) and looks_like_hub_id(source)) else None
    if base_model is None and looks_like_hub_id(str(published.get("_name_or_path", ""))):
        base_model = str(published["_name_or_path"])
    # the card is rendered by lumina_hf.hub (the templates `lumina-hf push` uses); its options are checked now,
    # before anything is written (a name the Hub would not accept as a repo id is no base_model)
    from .hub import PublishInputError, PublishOptions, render_local_card

    try:
        card_options = PublishOptions(base_model=base_model, target_size=int(target_size))
    except PublishInputError:
        card_options = PublishOptions(target_size=int(target_size))

    # ---- write into a temporary folder next to the output, then move it into place
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temp_folders(output)
    tmp = tempfile.mkdtemp(prefix=temp_prefix(output), dir=parent)
    with open(os.path.join(tmp, LOCK_FILE), "w", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()}\n")
    restore_signals = interrupt_on_termination()
    try:
        model_dir = os.path.join(tmp, "model")
        os.makedirs(model_dir)
        logger.info(
            "converting %d tensors into %d shard(s) (%s language model, float32 VQGAN)",
            len(plan), len(shards), dtype_name(out_dtype) if out_dtype else "source-dtype",
        )
        write_weights(model_dir, shards, vq_state, progress)
        config.save_pretrained(model_dir)
        generation_config_for(config).save_pretrained(model_dir)
        processor.save_pretrained(os.path.join(tmp, "processor"))
        with open(os.path.join(tmp, "model_index.json"), "w", encoding="utf-8") as f:
            json.dump(model_index(), f, indent=2, sort_keys=True)
            f.write("\n")
        card = render_local_card(tmp, os.path.basename(output), options=card_options)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
        os.remove(os.path.join(tmp, LOCK_FILE))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the output gets normal permissions
        install_output(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        restore_signals()
    logger.info("converted %s -> %s", source, output)
    return output


__all__ = ["convert_checkpoint"]

