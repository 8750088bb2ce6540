"""Build steps of Lumina-mGPT-nano (see recipes/nano/README.md for the whole sequence):

    python -m examples.nano.build data --target-size 64 --t2i 3000 --out runs/nano/data64
    python -m examples.nano.build init --vqgan runs/nano/vqgan --out runs/nano/init
    python -m examples.nano.build grow --model runs/nano/omni --out runs/nano/grown --layers 8
    python -m examples.nano.build export --model runs/nano/omni --out src/lumina_hf/nano/weights

`data` writes the raw items in the formats `lumina-hf tokenize` reads (a `datasets` folder of image +
caption for text-to-image, the original conversation JSON for the Omni tasks); `init` assembles the
untrained language model around the trained VQGAN with a compact tokenizer; `grow` deepens a trained model
without changing what it computes (new blocks start as identities); `export` writes the final
pipeline folder (safetensors) that ships with the package.
"""

import argparse
import json
import logging
import os
import shutil
import tempfile

import torch

from lumina_hf.unirep import image_code_token_name
from lumina_hf.image_processing_lumina_mgpt import LuminaMGPTImageProcessor
from lumina_hf.processing_lumina_mgpt import OMNI_TASK_PROMPTS, LuminaMGPTProcessor, text_to_image_prompt
from .shapes import COLORS, SHAPES, aspect_size, caption_for, make_item

logger = logging.getLogger(__name__)

NANO_LM = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=512)


def _atomic_dir(out: str):
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=".tmp-", dir=parent)


def _save_pipeline(model, processor, out: str, replace: bool = False, compact_json: bool = False) -> None:
    """Save a pipeline folder through a temporary sibling folder and a rename: nothing half-written is left at
    `out`. `replace` removes an existing `out` first (callers that must not overwrite check before any work).
    `compact_json` rewrites the JSON files without indentation (the shipped weights have a size budget, and the
    config's 8192-entry vocabulary map and the tokenizer are mostly indentation)."""
    from lumina_hf.pipeline_lumina_mgpt import LuminaMGPTPipeline

    tmp = _atomic_dir(out)
    try:
        LuminaMGPTPipeline(model=model.eval(), processor=processor).save_pretrained(tmp)
        if compact_json:
            for root, _, files in os.walk(tmp):
                for name in files:
                    if name.endswith(".json"):
                        path = os.path.join(root, name)
                        with open(path, encoding="utf-8") as fh:
                            data = json.load(fh)
                        with open(path, "w", encoding="utf-8") as fh:
                            json.dump(data, fh, ensure_ascii=False, separators=(",", ":"))
        if replace and os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_data(out: str, target_size: int, t2i: int, segmentation: int = 0, describe: int = 0, seed: int = 0) -> None:
    """Raw training items: `out/t2i` (a `datasets` folder with `image` and `text`) and, when asked,
    `out/omni.json` + `out/omni_images/` (conversation format) for segmentation and description."""
    import datasets

    if os.path.exists(out):
        raise ValueError(f"{out} exists: remove it or choose another folder.")
    tmp = _atomic_dir(out)
    try:
        items = [make_item(i, seed=seed, target_size=target_size) for i in range(t2i)]
        ds = datasets.Dataset.from_dict(
            {"image": [it.image for it in items], "text": [it.caption for it in items]},
            features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
        )
        ds.save_to_disk(os.path.join(tmp, "t2i"))
        if segmentation or describe:
            img_dir = os.path.join(tmp, "omni_images")
            os.makedirs(img_dir)
            convs = []
            for k in range(segmentation + describe):
                it = make_item(100_000 + k, seed=seed, target_size=target_size)
                src = f"omni_images/{k:06d}.png"
                it.image.save(os.path.join(tmp, src))
                if k < segmentation:
                    dst = f"omni_images/{k:06d}_mask.png"
                    it.mask.save(os.path.join(tmp, dst))
                    convs.append({
                        "conversations": [
                            {"from": "human", "value": OMNI_TASK_PROMPTS["segmentation"] + " <|image|>"},
                            {"from": "gpt", "value": "<|image|>"},
                        ],
                        "image": [src, dst],
                    })
                else:
                    convs.append({
                        "conversations": [
                            {"from": "human", "value": OMNI_TASK_PROMPTS["describe"] + " <|image|>"},
                            {"from": "gpt", "value": it.caption},
                        ],
                        "image": [src],
                    })
            with open(os.path.join(tmp, "omni.json"), "w", encoding="utf-8") as fh:
                json.dump(convs, fh)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def nano_corpus(target_sizes=(64, 96)) -> list[str]:
    """Every text the nano model sees: prompts at each size and aspect, captions, Omni instructions."""
    texts = []
    for shape in SHAPES:
        for color in COLORS:
            for bg in COLORS:
                if bg == color:
                    continue
                cap = caption_for(shape, color, bg)
                texts.append(cap)
                texts.append(text_to_image_prompt(cap))
                for t in target_sizes:
                    for aspect in ("1:1", "2:1", "1:2"):
                        w, h = aspect_size(aspect, t)
                        texts.append(text_to_image_prompt(cap, w, h))
    texts += [OMNI_TASK_PROMPTS["segmentation"], OMNI_TASK_PROMPTS["describe"]]
    return texts


def init_model(vqgan_dir: str, out: str, target_size: int = 64, seed: int = 0, **lm_overrides) -> None:
    """Untrained nano language model + the trained VQGAN + a compact tokenizer, saved as a pipeline folder."""
    from lumina_hf.configuration_lumina_mgpt import LuminaMGPTConfig
    from lumina_hf.modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration
    from lumina_hf.modeling_vqgan import LuminaMGPTVQGAN
    from lumina_hf.testing_utils import build_compact_tokenizer

    if os.path.exists(out):
        raise ValueError(f"{out} exists: remove it or choose another folder.")
    vq = LuminaMGPTVQGAN.from_pretrained(vqgan_dir)
    tokenizer = build_compact_tokenizer(nano_corpus(), text_vocab_size=512)
    vocab = tokenizer.get_vocab()
    vq_cfg = vq.config.to_dict()
    vq_cfg.pop("model_type", None)
    vocabulary_map = {image_code_token_name(c): vocab[image_code_token_name(c)] for c in range(8192)}
    vocabulary_map["<image>"] = vocab["<image>"]
    lm = dict(NANO_LM)
    lm.update(lm_overrides)
    config = LuminaMGPTConfig(vocab_size=len(tokenizer), vocabulary_map=vocabulary_map, vq_config=vq_cfg, **lm)
    torch.manual_seed(seed)
    model = LuminaMGPTForConditionalGeneration(config)
    model.model.vqmodel.load_state_dict(vq.state_dict(), strict=True)
    processor = LuminaMGPTProcessor(image_processor=LuminaMGPTImageProcessor(target_size=target_size), tokenizer=tokenizer)
    _save_pipeline(model, processor, out)


def _pipeline_parts(model_dir: str):
    """(model folder, processor folder) of a pipeline folder, or the folder itself for both."""
    src_model = os.path.join(model_dir, "model") if os.path.isdir(os.path.join(model_dir, "model")) else model_dir
    src_proc = os.path.join(model_dir, "processor") if os.path.isdir(os.path.join(model_dir, "processor")) else model_dir
    return src_model, src_proc


def grow_model(model_dir: str, out: str, num_hidden_layers: int, seed: int = 0) -> None:
    """Deepen a trained language model to `num_hidden_layers` decoder blocks, keeping its function.

    The trained blocks keep their order and are spread evenly; each new block is freshly initialised except
    its two residual-branch outputs (attention `o_proj`, MLP `down_proj`), which start at zero, so the new
    block adds nothing until training moves them (block expansion, as in LLaMA Pro). Embeddings, final norm,
    head and VQGAN are copied. This lets the nano model gain capacity without repeating its earlier stages."""
    from lumina_hf.modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration

    src_model, src_proc = _pipeline_parts(model_dir)
    config = LuminaMGPTForConditionalGeneration.config_class.from_pretrained(src_model)
    old = config.num_hidden_layers
    if num_hidden_layers <= old:
        raise ValueError(
            f"the model already has {old} decoder layers; ask for more than {old} (e.g. --layers {2 * old})."
        )
    if os.path.exists(out):
        raise ValueError(f"{out} exists: remove it or choose another folder.")
    src = LuminaMGPTForConditionalGeneration.from_pretrained(src_model, dtype=torch.float32)
    processor = LuminaMGPTProcessor.from_pretrained(src_proc)
    config.num_hidden_layers = num_hidden_layers
    torch.manual_seed(seed)
    grown = LuminaMGPTForConditionalGeneration(config)
    placed = {i * num_hidden_layers // old: i for i in range(old)}  # new index -> trained block
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("model.layers.")}
    for new_i, block in enumerate(grown.model.layers):
        if new_i in placed:
            block.load_state_dict(src.model.layers[placed[new_i]].state_dict(), strict=True)
        else:
            with torch.no_grad():
                block.self_attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
    missing, unexpected = grown.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("model.layers.") for k in missing):
        raise RuntimeError(f"grow: state dicts do not line up (missing {missing}, unexpected {unexpected}).")
    grown.generation_config = src.generation_config
    _save_pipeline(grown, processor, out)
    logger.info("grew %s from %d to %d layers (new blocks at %s) -> %s", model_dir, old, num_hidden_layers,
                sorted(set(range(num_hidden_layers)) - set(placed)), out)


def export(model_dir: str, out: str, target_size: int = 96, dtype: str = "float32",
           vq_decoder_dtype: str = "float32", **sampling) -> None:
    """Copy a trained model (pipeline folder or model folder + processor) into a clean pipeline folder.

    `dtype="bfloat16"` stores the language model in bf16 (half the size; the VQGAN stays fp32);
    `vq_decoder_dtype="bfloat16"` also stores the VQGAN's decoder side (`post_quant_conv` + `decoder`, the
    larger half) in bf16, while the encoder and codebook stay fp32 so images encode to the same codes.
    Loading upcasts the whole VQGAN to fp32 (`_keep_in_fp32_modules_strict`), so only the stored values are
    rounded. `load_nano_pipeline` computes in fp32 from it. `sampling` (guidance_scale, image_top_k, temperature,
    text_top_k, omni_image_top_k / omni_guidance_scale for the image-to-image tasks, and num_candidates for
    text-to-image candidate ranking) become the model's generation_config defaults, which the pipeline reads."""
    if vq_decoder_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"vq_decoder_dtype must be 'float32' or 'bfloat16', not {vq_decoder_dtype!r}.")
    known = {"guidance_scale", "image_top_k", "temperature", "text_top_k", "omni_image_top_k", "omni_guidance_scale",
             "num_candidates"}
    if set(sampling) - known:
        raise ValueError(f"unknown sampling defaults {sorted(set(sampling) - known)}; known: {sorted(known)}.")
    from lumina_hf.modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration

    src_model, src_proc = _pipeline_parts(model_dir)
    model = LuminaMGPTForConditionalGeneration.from_pretrained(src_model, dtype=getattr(torch, dtype))
    processor = LuminaMGPTProcessor.from_pretrained(src_proc)
    processor.image_processor.target_size = target_size
    model.config.dropout = 0.0
    # no local build paths in the shipped configs
    model.config._name_or_path = ""
    if getattr(model.config, "vq_config", None) is not None:
        model.config.vq_config._name_or_path = ""
    if vq_decoder_dtype == "bfloat16":
        vq = model.model.vqmodel
        if vq.missing_weights:
            raise ValueError(f"{model_dir} has no VQGAN weights: there is no decoder to store in bf16.")
        vq.post_quant_conv.to(torch.bfloat16)
        vq.decoder.to(torch.bfloat16)
    for key, value in sampling.items():
        if value is not None:
            setattr(model.generation_config, key, value)
    if sampling.get("temperature") is not None:
        # the defaults describe sampling; GenerationConfig refuses to save a temperature for greedy decoding
        model.generation_config.do_sample = True
    # a generation config marked as derived from the model config loses its extra keys (image_top_k, ...) on load
    model.generation_config._from_model_config = False
    _save_pipeline(model, processor, out, replace=True, compact_json=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.nano.build")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", required=True)
    d.add_argument("--target-size", type=int, required=True)
    d.add_argument("--t2i", type=int, default=3000)
    d.add_argument("--segmentation", type=int, default=0)
    d.add_argument("--describe", type=int, default=0)
    d.add_argument("--seed", type=int, default=0)
    i = sub.add_parser("init")
    i.add_argument("--vqgan", required=True)
    i.add_argument("--out", required=True)
    i.add_argument("--target-size", type=int, default=64)
    g = sub.add_parser("grow")
    g.add_argument("--model", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--layers", type=int, required=True)
    e = sub.add_parser("export")
    e.add_argument("--model", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--target-size", type=int, default=96)
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    e.add_argument("--vq-decoder-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="storage dtype of the VQGAN decoder side (encoder and codebook stay fp32)")
    e.add_argument("--guidance-scale", type=float, default=None)
    e.add_argument("--image-top-k", type=int, default=None)
    e.add_argument("--temperature", type=float, default=None)
    e.add_argument("--omni-image-top-k", type=int, default=None, help="image top-k of the image-to-image tasks")
    e.add_argument("--num-candidates", type=int, default=None,
                   help="text-to-image candidates per image, ranked by the model's own description likelihood")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        if args.cmd == "data":
            write_data(args.out, args.target_size, args.t2i, args.segmentation, args.describe, args.seed)
        elif args.cmd == "init":
            init_model(args.vqgan, args.out, args.target_size)
        elif args.cmd == "grow":
            grow_model(args.model, args.out, args.layers)
        else:
            export(args.model, args.out, args.target_size, args.dtype, args.vq_decoder_dtype,
                   guidance_scale=args.guidance_scale, image_top_k=args.image_top_k, temperature=args.temperature,
                   omni_image_top_k=args.omni_image_top_k, num_candidates=args.num_candidates)
    except ValueError as err:  # bad input: the message names the problem and the fix, no traceback
        raise SystemExit(f"error: {err}") from err
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
