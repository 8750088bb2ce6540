"""lumina_hf: Lumina-mGPT native in the Hugging Face ecosystem.

Importing the package registers the model, config, processor and image processor with the transformers
Auto classes, so `AutoModel.from_pretrained(folder)` works without `trust_remote_code`.

The import needs torch and transformers only: the diffusers pipeline (`LuminaMGPTPipeline`,
`LuminaMGPTPipelineOutput`) and the checkpoint conversion (`convert_checkpoint`) are imported on first use,
so the model and the generation loop run where diffusers, TRL or datasets are not installed.
"""

import importlib

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_lumina_mgpt import LuminaMGPTConfig, LuminaMGPTVQConfig
from .image_processing_lumina_mgpt import LuminaMGPTImageProcessor
from .memory import MemoryEstimate, memory_estimate
from .modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration, LuminaMGPTModel, LuminaMGPTPreTrainedModel
from .modeling_vqgan import LuminaMGPTVQGAN
from .processing_lumina_mgpt import LuminaMGPTProcessor, text_to_image_prompt

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register(LuminaMGPTConfig.model_type, LuminaMGPTConfig, exist_ok=True)
    AutoConfig.register(LuminaMGPTVQConfig.model_type, LuminaMGPTVQConfig, exist_ok=True)
    AutoModel.register(LuminaMGPTConfig, LuminaMGPTModel, exist_ok=True)
    AutoModelForImageTextToText.register(LuminaMGPTConfig, LuminaMGPTForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(LuminaMGPTConfig, LuminaMGPTForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(LuminaMGPTConfig, image_processor_classes={"pil": LuminaMGPTImageProcessor}, exist_ok=True)
    AutoProcessor.register(LuminaMGPTConfig, LuminaMGPTProcessor, exist_ok=True)


_register()

# public names whose modules import optional libraries: loaded on first access (`from lumina_hf import X` works)
_LAZY = {
    "LuminaMGPTPipeline": ".pipeline_lumina_mgpt",
    "LuminaMGPTPipelineOutput": ".pipeline_lumina_mgpt",
    "convert_checkpoint": ".convert_lumina_mgpt",
}


def __getattr__(name: str):
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name], __name__)
        except ModuleNotFoundError as err:
            missing = err.name or "a dependency"
            raise ImportError(
                f"lumina_hf.{name} needs {missing}, which is not installed: `pip install {missing}` (the model, the "
                "processor and generate_image_tokens work without it)."
            ) from err
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "LuminaMGPTConfig",
    "LuminaMGPTVQConfig",
    "LuminaMGPTForConditionalGeneration",
    "LuminaMGPTImageProcessor",
    "LuminaMGPTModel",
    "LuminaMGPTPreTrainedModel",
    "LuminaMGPTVQGAN",
    "LuminaMGPTProcessor",
    "text_to_image_prompt",
    "LuminaMGPTPipeline",
    "LuminaMGPTPipelineOutput",
    "convert_checkpoint",
    "memory_estimate",
    "MemoryEstimate",
]
