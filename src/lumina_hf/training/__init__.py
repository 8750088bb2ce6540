"""Training: raw data -> tokenized `datasets` (images VQ-encoded once, offline), trainer, recipes."""

from .data import (
    OUTPUT_COLUMNS,
    SKIP_REASONS,
    TokenizeResult,
    VQImageEncoder,
    load_vq_model,
    minimum_max_length,
    output_features,
    tokenize_dataset,
)
from .arguments import (
    DataArguments,
    LoraArguments,
    LuminaTrainingArguments,
    ModelArguments,
    Recipe,
    parse_recipe,
    recipe_keys,
)
from .collator import LuminaMGPTDataCollator
from .mixture import build_datasets, synthetic_dataset
from .runner import TrainingResult, build_peft_config, build_trainer, run_recipe
from .trainer import LuminaSFTTrainer, chunked_lm_loss

__all__ = [
    "OUTPUT_COLUMNS",
    "SKIP_REASONS",
    "TokenizeResult",
    "VQImageEncoder",
    "load_vq_model",
    "minimum_max_length",
    "output_features",
    "tokenize_dataset",
    "DataArguments",
    "LoraArguments",
    "LuminaMGPTDataCollator",
    "LuminaSFTTrainer",
    "LuminaTrainingArguments",
    "ModelArguments",
    "Recipe",
    "TrainingResult",
    "build_datasets",
    "build_peft_config",
    "build_trainer",
    "chunked_lm_loss",
    "parse_recipe",
    "recipe_keys",
    "run_recipe",
    "synthetic_dataset",
]
