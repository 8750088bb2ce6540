"""Sample images generated at publish time, with the model's own sampling defaults, tiled into one grid PNG."""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from .cards import OMNI_SAMPLING, TEXT_TO_IMAGE_SAMPLING, sampling_settings
from .errors import PublishInputError
from .folders import FolderInfo

logger = logging.getLogger(__name__)

GRID_PATH = "samples/grid.png"


@dataclass
class SampleGrid:
    """Sample images generated at publish time, and the settings they were generated with."""

    png: bytes
    prompts: list[str]
    seed: int
    width: int
    height: int
    guidance_scale: float
    path_in_repo: str = GRID_PATH
    sampling: dict[str, Any] = field(default_factory=dict)  # text-to-image: guidance_scale, top_k, temperature, num_candidates
    omni_sampling: dict[str, Any] = field(default_factory=dict)  # the Omni image tasks' values for the same model

    def __post_init__(self) -> None:
        # a grid built by hand without its settings: the reference's values with the given guidance
        self.sampling = self.sampling or dict(TEXT_TO_IMAGE_SAMPLING, guidance_scale=self.guidance_scale)
        self.omni_sampling = self.omni_sampling or dict(OMNI_SAMPLING)


def load_folder_pipeline(info: FolderInfo, base_model: str | None = None, device: str | None = None, dtype=None):
    """A `LuminaMGPTPipeline` from a published-to-be folder (adapters are merged into their base)."""
    import torch

    from ..modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration
    from ..pipeline_lumina_mgpt import LuminaMGPTPipeline
    from ..processing_lumina_mgpt import LuminaMGPTProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    folder = str(info.folder)
    if info.kind == "pipeline":
        pipe = LuminaMGPTPipeline.from_pretrained(folder, dtype=dtype)
    elif info.kind == "model":
        model = LuminaMGPTForConditionalGeneration.from_pretrained(folder, dtype=dtype)
        pipe = LuminaMGPTPipeline(model=model, processor=LuminaMGPTProcessor.from_pretrained(folder))
    else:
        from peft import PeftModel

        base = str(info.base_model_local) if info.base_model_local is not None else base_model
        if base is None:
            raise PublishInputError("sample images of an adapter need its base model: pass base_model=.")
        sub = {"subfolder": "model"} if info.base_layout == "pipeline" else {}
        model = LuminaMGPTForConditionalGeneration.from_pretrained(base, dtype=dtype, **sub)
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
        if info.has_processor:
            processor = LuminaMGPTProcessor.from_pretrained(folder)
        else:
            psub = {"subfolder": "processor"} if info.base_layout == "pipeline" else {}
            processor = LuminaMGPTProcessor.from_pretrained(base, **psub)
        pipe = LuminaMGPTPipeline(model=model.eval(), processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate_sample_grid(
    pipe,
    prompts: list[str],
    *,
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    guidance_scale: float | None = None,
    columns: int | None = None,
    batch_size: int = 4,
) -> SampleGrid:
    """One image per prompt (generator seeded `seed + i`), tiled into a grid PNG, sampled with the model's own
    defaults (`generation_config`: guidance scale, image top-k, temperature, number of ranked candidates; the
    reference's values where it sets none), exactly as `pipe(prompt)` would. `guidance_scale` overrides the
    model's. Prompts are generated `batch_size` at a time (each image depends only on its prompt and its
    generator, not on the batch); one at a time when candidates are ranked (see below)."""
    import PIL.Image
    import torch

    if not prompts:
        raise PublishInputError("give at least one sample prompt.")
    size = pipe.processor.image_processor.target_size
    width, height = width or size, height or size
    sampling, omni_sampling = sampling_settings(getattr(pipe.model, "generation_config", None))
    if guidance_scale is not None:
        sampling = dict(sampling, guidance_scale=guidance_scale)
    # With ranked candidates the pipeline seeds the candidates of an image from its generator when generators are
    # given per image (a list), and uses a single generator as is: the card's snippet passes one generator, so
    # each prompt is then generated alone with its own single generator, which the snippet reproduces.
    one_by_one = sampling["num_candidates"] > 1
    batch_size = 1 if one_by_one else max(1, batch_size)
    gen_device = "cuda" if str(pipe.device).startswith("cuda") else "cpu"
    generators = [torch.Generator(gen_device).manual_seed(seed + i) for i in range(len(prompts))]
    images = []
    try:
        for start in range(0, len(prompts), batch_size):
            stop = start + batch_size
            images += pipe(
                prompts[start] if one_by_one else list(prompts[start:stop]),
                height=height,
                width=width,
                guidance_scale=sampling["guidance_scale"],
                top_k=sampling["top_k"],
                temperature=sampling["temperature"],
                num_candidates=sampling["num_candidates"],
                generator=generators[start] if one_by_one else generators[start:stop],
            ).images
    except ValueError as err:
        raise PublishInputError(f"could not generate the sample images: {err}") from None
    cols = columns or min(len(images), 4)
    rows = math.ceil(len(images) / cols)
    grid = PIL.Image.new("RGB", (cols * width, rows * height), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * width, (i // cols) * height))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return SampleGrid(
        png=buf.getvalue(), prompts=list(prompts), seed=seed, width=width, height=height,
        guidance_scale=sampling["guidance_scale"], sampling=sampling, omni_sampling=omni_sampling,
    )


__all__ = ["GRID_PATH", "SampleGrid", "generate_sample_grid", "load_folder_pipeline"]
