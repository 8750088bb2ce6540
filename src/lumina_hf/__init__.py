"""lumina_hf: Lumina-mGPT native in the Hugging Face ecosystem.

Importing the package registers the model, config, processor and image processor with the transformers
Auto classes, so `AutoModel.from_pretrained(folder)` works without `trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_lumina_mgpt import LuminaMGPTConfig, LuminaMGPTVQConfig
from .convert_lumina_mgpt import convert_checkpoint
from .image_processing_lumina_mgpt import LuminaMGPTImageProcessor
from .memory import MemoryEstimate, memory_estimate
from .modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration, LuminaMGPTModel, LuminaMGPTPreTrainedModel
from .modeling_vqgan import LuminaMGPTVQGAN
from .pipeline_lumina_mgpt import LuminaMGPTPipeline, LuminaMGPTPipelineOutput
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
