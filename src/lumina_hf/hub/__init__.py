"""Publishing lumina_hf folders to the Hugging Face Hub with a model card (`lumina-hf push`).

- `folders`: which files of a pipeline, model or adapter folder go up (kind, completeness, per-kind allow-list,
  `include` patterns, no links out of the folder);
- `scrub`: configs scrubbed of local paths and secrets, every uploaded file scanned for the push token and
  other secrets;
- `records`: the training records a card reads (trainer state, results, recipe copy);
- `cards`: the card, rendered from the one template set in `lumina_hf/model_cards/` (also used by `convert`);
- `samples`: sample images generated with the model's own sampling defaults;
- `publish`: the plan (`prepare_push`, also what `--dry-run` prints) and the upload (`push_to_hub_folder`,
  `upload_plan`), and the push of a training recipe's `push_to_hub: true` (`trainer_push`);
- `options`: `PublishOptions`, the one dataclass of a push's choices (the functions also take its fields as
  keyword arguments); `errors`: `PublishInputError` (nothing uploaded) and `PushError` (an upload stopped).
"""

from .cards import (  # noqa: F401  (_tokens_per_image: kept importable from lumina_hf.hub for its users)
    BASE_TAGS,
    CHAMELEON_LICENSE,
    CHAMELEON_VQGAN,
    EXAMPLE_PROMPT,
    LIBRARY_NAME,
    OMNI_SAMPLING,
    TEMPLATE_FILES,
    TEXT_TO_IMAGE_SAMPLING,
    _tokens_per_image,
    build_model_card,
    load_template,
    render_local_card,
    resolve_card_type,
    sampling_settings,
    vqgan_facts,
)
from .errors import PublishInputError, PushError
from .folders import KINDS, PROCESSOR_FILES, FolderInfo, detect_folder_kind, inspect_folder, read_safetensors_header
from .options import CARD_TYPES, PublishOptions, validate_hub_repo_id
from .publish import (
    CommitRecord,
    PushPlan,
    PushResult,
    TrainerPush,
    plan_push,
    prepare_push,
    push_to_hub_folder,
    trainer_push,
    upload_plan,
    validate_card_metadata,
)
from .records import TrainingDetails, read_training_details
from .samples import GRID_PATH, SampleGrid, generate_sample_grid, load_folder_pipeline

__all__ = [
    "BASE_TAGS",
    "CARD_TYPES",
    "CHAMELEON_LICENSE",
    "CHAMELEON_VQGAN",
    "EXAMPLE_PROMPT",
    "GRID_PATH",
    "KINDS",
    "LIBRARY_NAME",
    "OMNI_SAMPLING",
    "PROCESSOR_FILES",
    "TEMPLATE_FILES",
    "TEXT_TO_IMAGE_SAMPLING",
    "CommitRecord",
    "FolderInfo",
    "PublishInputError",
    "PublishOptions",
    "PushError",
    "PushPlan",
    "PushResult",
    "SampleGrid",
    "TrainerPush",
    "TrainingDetails",
    "build_model_card",
    "detect_folder_kind",
    "generate_sample_grid",
    "inspect_folder",
    "load_folder_pipeline",
    "load_template",
    "plan_push",
    "prepare_push",
    "push_to_hub_folder",
    "read_safetensors_header",
    "read_training_details",
    "render_local_card",
    "resolve_card_type",
    "sampling_settings",
    "trainer_push",
    "upload_plan",
    "validate_card_metadata",
    "validate_hub_repo_id",
    "vqgan_facts",
]
