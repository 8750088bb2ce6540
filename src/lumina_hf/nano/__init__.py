"""Lumina-mGPT-nano: a small model trained with this project's recipes on synthetic shapes, shipped with the
package as the default model (`lumina-hf generate` without `--model`, `load_nano_pipeline()`).

What it knows: one circle, square or triangle, colored red, green, blue, yellow, black or white, on a
background of another of those colors ("a red circle on a blue background"), at 96x96, 128x64 and 64x128
(also 64x64, 64x32, 32x64 from its first stage); segmentation masks ("Segmentic segmentation." with an
image) and descriptions ("Describe the image in detail."). Other prompts still give well-formed images of
those sizes, but of shapes it knows.
"""

import os

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
# a few ground-truth shapes of the kind the nano model knows (the demo's clickable examples)
EXAMPLES_DIR = os.path.join(os.path.dirname(__file__), "examples")


def nano_path() -> str:
    """Folder of the shipped nano pipeline (model/, processor/, model_index.json)."""
    if not os.path.isfile(os.path.join(WEIGHTS_DIR, "model_index.json")):
        raise FileNotFoundError(
            f"the nano model is not in this installation ({WEIGHTS_DIR} has no model_index.json); build it with "
            "the commands in recipes/nano/README.md or pass a model folder."
        )
    return WEIGHTS_DIR


def load_nano_pipeline(**kwargs):
    """`LuminaMGPTPipeline` of the shipped nano model on CPU. The language model is stored in bf16 to keep the
    package small; it computes in float32 unless `dtype` is given."""
    import torch

    from ..pipeline_lumina_mgpt import LuminaMGPTPipeline

    if "torch_dtype" not in kwargs:
        kwargs.setdefault("dtype", torch.float32)
    return LuminaMGPTPipeline.from_pretrained(nano_path(), **kwargs)


__all__ = ["EXAMPLES_DIR", "WEIGHTS_DIR", "load_nano_pipeline", "nano_path"]
