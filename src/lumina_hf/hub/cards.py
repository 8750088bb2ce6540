"""Model cards: rendered from the one template set in `lumina_hf/model_cards/`, for `push` and for `convert`.

The templates are Markdown + Jinja, shipped as package data, rendered with huggingface_hub's
`ModelCard.from_template` / `ModelCardData`. Three card types: ``"base"`` (a converted published checkpoint),
``"finetune"`` (a pipeline or model folder with training records: a full fine-tune or a merged LoRA) and
``"adapter"``. A card states what is true of its folder: the image tokenizer it carries (Meta's Chameleon VQGAN
only when the folder's VQGAN has that architecture, another VQGAN described as the model's own), and the
sampling settings the pipeline will use for it (the model's `generation_config.json` defaults, the reference's
values where it sets none).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

from ..unirep import UniRepLayout
from .errors import PublishInputError
from .folders import FolderInfo, inspect_folder
from .options import CARD_TYPES, PublishOptions, validate_hub_repo_id
from .scrub import check_clean, local_roots

if TYPE_CHECKING:
    from .samples import SampleGrid

logger = logging.getLogger(__name__)

# `lumina-hf`, not `diffusers` or `transformers`: neither library loads these folders without `import
# lumina_hf` (the pipeline class and the model classes live here), so the Hub's generated "use this model"
# snippet for those libraries would be wrong; the card's own snippet is the reference. Same name for the
# three kinds (the adapter's relation to its base is given by `base_model` + `adapter_config.json`).
LIBRARY_NAME = "lumina-hf"
CHAMELEON_LICENSE = {
    "license": "other",
    "license_name": "chameleon-research-license",
    "license_link": "https://ai.meta.com/resources/models-and-libraries/chameleon-license/",
}
# The reference's sampling values (Lumina-mGPT's published inference settings), which the pipeline uses where
# a model's generation_config sets none; kept equal to the pipeline's fallbacks (a test checks it).
TEXT_TO_IMAGE_SAMPLING = {"guidance_scale": 4.0, "top_k": 2000, "temperature": 1.0, "num_candidates": 1}
OMNI_SAMPLING = {"guidance_scale": 1.0, "top_k": 200, "temperature": 1.0}
# Meta's Chameleon VQGAN (`vqgan.yaml` of the Chameleon release): 8192 codes of dimension 256, base channels
# 128, five levels (factor 16). A VQGAN of another architecture is not Meta's.
CHAMELEON_VQGAN = {
    "num_embeddings": 8192, "embed_dim": 256, "base_channels": 128, "channel_multiplier": [1, 1, 2, 2, 4],
    "latent_channels": 256, "num_res_blocks": 2,
}
BASE_TAGS = ["lumina-mgpt", "lumina-hf", "chameleon", "autoregressive", "text-to-image"]
TEMPLATE_FILES = {"base": "base.md", "finetune": "finetune.md", "adapter": "adapter.md"}
EXAMPLE_PROMPT = "a photo of a red fox sitting in the snow, golden hour"


def load_template(card_type: str) -> str:
    """The Markdown + Jinja template of a card type, read from the installed package data."""
    if card_type not in TEMPLATE_FILES:
        raise PublishInputError(f"card type {card_type!r} is not one of {', '.join(CARD_TYPES)}.")
    return resources.files("lumina_hf").joinpath("model_cards", TEMPLATE_FILES[card_type]).read_text(encoding="utf-8")


def resolve_card_type(info: FolderInfo) -> str:
    """"adapter" for adapters; "finetune" when the folder holds training records; else "base" (a converted
    published checkpoint). Pass `card_type=` to choose."""
    if info.kind == "adapter":
        return "adapter"
    return "finetune" if info.training is not None else "base"


# ------------------------------------------------------------------------------------------ facts
def sampling_settings(generation_config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(text-to-image, Omni image-task) sampling values the pipeline uses for a model with this
    `generation_config` (a `GenerationConfig` or its dict; None: the reference's values): `guidance_scale`,
    `image_top_k`, `temperature` and `num_candidates` where it sets them, `omni_guidance_scale` /
    `omni_image_top_k` for the image tasks (which share the temperature and use one candidate)."""

    def value(key: str, fallback: Any) -> Any:
        if generation_config is None:
            return fallback
        found = generation_config.get(key) if isinstance(generation_config, dict) else getattr(generation_config, key, None)
        return fallback if found is None else found

    t2i = {
        "guidance_scale": value("guidance_scale", TEXT_TO_IMAGE_SAMPLING["guidance_scale"]),
        "top_k": value("image_top_k", TEXT_TO_IMAGE_SAMPLING["top_k"]),
        "temperature": value("temperature", TEXT_TO_IMAGE_SAMPLING["temperature"]),
        "num_candidates": value("num_candidates", TEXT_TO_IMAGE_SAMPLING["num_candidates"]),
    }
    omni = {
        "guidance_scale": value("omni_guidance_scale", OMNI_SAMPLING["guidance_scale"]),
        "top_k": value("omni_image_top_k", OMNI_SAMPLING["top_k"]),
        "temperature": t2i["temperature"],
    }
    return t2i, omni


def vqgan_facts(info: FolderInfo) -> tuple[bool, str]:
    """(is Meta's Chameleon VQGAN, the card's sentence about the image tokenizer). Meta's when the weights hold
    a VQGAN whose config has Meta's architecture and whose codebook has Meta's shape."""
    if not info.has_vqgan:
        return False, "**not included** (see Limitations)"
    from ..configuration_lumina_mgpt import LuminaMGPTVQConfig

    stored = info.model_config.get("vq_config")
    vq = LuminaMGPTVQConfig().to_dict()  # what transformers fills in for keys a saved config leaves out
    vq.update(stored if isinstance(stored, dict) else {})
    codebook = info.codebook_shape or [vq.get("num_embeddings"), vq.get("embed_dim")]
    is_meta = all(vq.get(k) == v for k, v in CHAMELEON_VQGAN.items()) and list(codebook) == [8192, 256]
    if is_meta:
        return True, "Meta's Chameleon VQGAN (encoder and decoder, float32) is included"
    mult = vq.get("channel_multiplier") or []
    factor = f", downsampling factor {2 ** (len(mult) - 1)}" if mult else ""
    return False, (
        f"a VQGAN of its own ({codebook[0]} codes of dimension {codebook[1]}{factor}; not Meta's Chameleon VQGAN) "
        "is included"
    )


def _is_omni(omni: bool | None, *names: Any, config: dict[str, Any] | None = None) -> bool:
    if omni is not None:
        return bool(omni)
    if config and isinstance(config.get("omni"), bool):
        return config["omni"]
    return any(isinstance(n, str) and "omni" in n.lower() for n in names)


def _format_params(n: int | None) -> str | None:
    if not n:
        return None
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _tokens_per_image(width: int, height: int) -> int:
    """Decoding steps of one image: its UniRep span (tests check it against the processor and training)."""
    return UniRepLayout().span_length(height, width)


def _target_from_name(*names: Any) -> int | None:
    for n in names:
        if isinstance(n, str):
            m = re.search(r"(?<!\d)(512|768|1024)(?!\d)", n)
            if m:
                return int(m.group(1))
    return None


# ------------------------------------------------------------------------------------------ rendering
def _license(options: PublishOptions) -> dict[str, Any]:
    if options.license is None or (options.license == "other" and options.license_name in (None, CHAMELEON_LICENSE["license_name"])):
        return dict(CHAMELEON_LICENSE, **({"license_link": options.license_link} if options.license_link else {}))
    logger.warning(
        "License %s: the card carries no Chameleon Research License notice. Only correct for weights that are "
        "not derived from Chameleon (every published Lumina-mGPT checkpoint is).", options.license_name or options.license,
    )
    return {"license": options.license, "license_name": options.license_name, "license_link": options.license_link}


def _card_metadata(info: FolderInfo, card_type: str, base_model: str | None, is_omni: bool, options: PublishOptions,
                   lic: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML metadata (`ModelCardData` keyword arguments)."""
    tag_list = list(BASE_TAGS)
    if is_omni:
        tag_list += ["any-to-any", "image-to-image", "omni"]
    if card_type == "adapter":
        tag_list += ["lora", "peft"]
    tag_list += [t for t in dict.fromkeys(options.tags or []) if t not in tag_list]
    datasets = list(dict.fromkeys([*(options.datasets or []), *(info.training.datasets if info.training else [])]))
    for d in datasets:
        validate_hub_repo_id(d, "dataset id")
    meta: dict[str, Any] = {
        "library_name": LIBRARY_NAME,
        "pipeline_tag": "any-to-any" if is_omni else "text-to-image",
        "tags": tag_list,
        "license": lic["license"],
    }
    for key in ("license_name", "license_link"):
        if lic.get(key):
            meta[key] = lic[key]
    if base_model:
        meta["base_model"] = base_model
        if card_type in ("adapter", "finetune"):
            meta["base_model_relation"] = "adapter" if card_type == "adapter" else "finetune"
    if datasets:
        meta["datasets"] = datasets
    return meta


def _card_context(info: FolderInfo, card_type: str, load_id: str, model_name: str, base_model: str | None,
                  is_omni: bool, target_size: int | None, lic: dict[str, Any], samples: SampleGrid | None) -> dict[str, Any]:
    """The template variables besides the metadata."""
    from .. import __version__
    from ..image_processing_lumina_mgpt import generate_buckets

    size = target_size or 512
    cfg = info.model_config or {}
    adapter = info.adapter_config or {}
    processor_source, processor_subfolder, base_subfolder = load_id, None, None
    if card_type == "adapter":
        base_subfolder = "model" if info.base_layout == "pipeline" else None
        if not info.has_processor:
            processor_source = base_model
            processor_subfolder = "processor" if info.base_layout == "pipeline" else None
    training = info.training
    if training is not None and not training.method:
        training = dataclasses.replace(training, method="LoRA" if card_type == "adapter" else "full fine-tuning")
    elif training is not None and training.method == "LoRA" and card_type != "adapter":
        training = dataclasses.replace(training, method="LoRA, merged into the weights")
    if samples is not None:  # what the samples were generated with is what the card recommends
        sampling, omni_sampling = samples.sampling, samples.omni_sampling
    else:
        sampling, omni_sampling = sampling_settings(info.generation_config)
    meta_vqgan, vqgan_text = vqgan_facts(info)
    targets = adapter.get("target_modules")
    return {
        "repo_id": load_id,
        "model_name": model_name,
        "card_type": card_type,
        "layout": info.kind,
        "base_model": base_model,
        "base_subfolder": base_subfolder,
        "processor_source": processor_source,
        "processor_subfolder": processor_subfolder,
        "omni": is_omni,
        "target_size": target_size,
        "buckets": [f"{w}x{h}" for w, h in (generate_buckets(target_size) if target_size else [])],
        "width": size,
        "height": size,
        "tokens_per_image": _tokens_per_image(size, size),
        "sampling": sampling,
        "omni_sampling": omni_sampling,
        "sampling_from_model": info.generation_config is not None or samples is not None,
        "example_prompt": EXAMPLE_PROMPT,
        "params": _format_params(info.num_parameters),
        "dtypes": ", ".join(info.weight_dtypes),
        "layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "heads": cfg.get("num_attention_heads"),
        "vocab_size": cfg.get("vocab_size"),
        "has_vqgan": info.has_vqgan,
        "meta_vqgan": meta_vqgan,
        "vqgan_text": vqgan_text,
        "training_rows": training.rows() if training else [],
        "method": training.method if training else None,
        "recipe_yaml": training.recipe_yaml if training else None,
        "lora": {
            "r": adapter.get("r"),
            "alpha": adapter.get("lora_alpha"),
            "dropout": adapter.get("lora_dropout"),
            "targets": ", ".join(f"`{m}`" for m in sorted(targets)) if isinstance(targets, list) else targets,
        },
        "chameleon": lic.get("license_name") == CHAMELEON_LICENSE["license_name"],
        "license_label": lic.get("license_name") or lic["license"],
        "license_link": lic.get("license_link"),
        "samples": samples,
        "lumina_hf_version": __version__,
    }


def build_model_card(
    info: FolderInfo,
    repo_id: str | None,
    *,
    options: PublishOptions | None = None,
    samples: SampleGrid | None = None,
    model_name: str | None = None,
    **kwargs: Any,
) -> ModelCard:
    """Render the card of `info` for `repo_id` from the packaged template of its card type.

    `options` (or its fields as keyword arguments: card_type, base_model, omni, license, ...) says what the
    caller chose; `samples` adds the sample grid. `repo_id=None` renders a card for a local folder (what
    `lumina-hf convert` writes): the usage snippet then loads `model_name`, the folder's name."""
    options = PublishOptions.build(options, **kwargs)
    if repo_id is not None:
        validate_hub_repo_id(repo_id)
    elif not model_name:
        raise PublishInputError("a card without a repo id needs model_name (the folder's name).")
    card_type = options.card_type or resolve_card_type(info)
    if card_type == "adapter" and info.kind != "adapter":
        raise PublishInputError(f"card type 'adapter' needs an adapter folder, this is a {info.kind} folder.")
    if card_type != "adapter" and info.kind == "adapter":
        raise PublishInputError(f"an adapter folder gets the 'adapter' card, not {card_type!r}.")
    base_model = options.base_model or info.base_model_hint or (info.training.base_model if info.training else None)
    if base_model is not None:
        validate_hub_repo_id(base_model, "base model")
    if card_type == "adapter" and base_model is None:
        raise PublishInputError(
            "the adapter's base model is not a Hub id (it is a local folder or unknown): pass base_model= / "
            "--base-model ORG/NAME, the Hub id of the model the adapter was trained on."
        )
    name = model_name or repo_id.split("/")[-1]
    target_size = options.target_size or info.target_size or _target_from_name(base_model, repo_id, name, info.folder.name)
    is_omni = _is_omni(options.omni, repo_id, base_model, name, info.folder.name, config=info.model_config)
    lic = _license(options)
    meta = _card_metadata(info, card_type, base_model, is_omni, options, lic)
    context = _card_context(info, card_type, repo_id or name, name, base_model, is_omni, target_size, lic, samples)
    card = ModelCard.from_template(ModelCardData(**meta), template_str=load_template(card_type), **context)
    card.text = "\n" + re.sub(r"\n{3,}", "\n\n", card.text).strip() + "\n"
    card = ModelCard(str(card))  # the text as it will be parsed on the Hub
    data = card.data.to_dict()
    for key, value in meta.items():
        if data.get(key) != value:
            raise PublishInputError(f"the rendered card's metadata has {key}={data.get(key)!r}, expected {value!r}.")
    return card


def render_local_card(folder: str | os.PathLike, model_name: str, *, options: PublishOptions | None = None,
                      token: str | None = None, **kwargs: Any) -> str:
    """The card text of a local folder (no repo yet), e.g. the README.md that `lumina-hf convert` writes:
    the same templates, metadata and checks as a push. `options` or its fields as keyword arguments."""
    info = inspect_folder(folder)
    text = str(build_model_card(info, None, options=PublishOptions.build(options, **kwargs), model_name=model_name))
    check_clean(text, "the model card", local_roots(Path(folder), info.base_model_local), token, text=True)
    return text


__all__ = [
    "CHAMELEON_LICENSE",
    "CHAMELEON_VQGAN",
    "EXAMPLE_PROMPT",
    "LIBRARY_NAME",
    "OMNI_SAMPLING",
    "TEMPLATE_FILES",
    "TEXT_TO_IMAGE_SAMPLING",
    "build_model_card",
    "load_template",
    "render_local_card",
    "resolve_card_type",
    "sampling_settings",
    "vqgan_facts",
]
