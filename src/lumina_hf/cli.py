"""`lumina-hf` command line: `lumina-hf generate ...`."""

import argparse
import importlib
import logging
import os
import sys
import tempfile

logger = logging.getLogger("lumina_hf")

TINY_RANDOM = "tiny-random"
NANO = "nano"

# Modules that add a subcommand: each defines `add_cli(subparsers)`, which adds its parser and sets
# `func` (called with the parsed args, returns an exit code).
SUBCOMMAND_MODULES: list[str] = [
    "lumina_hf.training.vqgan",
    "lumina_hf.training.tokenize_cli",
    "lumina_hf.training.train_cli",
    "lumina_hf.convert_lumina_mgpt",
    "lumina_hf.hub",
]


def _load_pipeline(model: str, device: str, dtype: str | None):
    import torch

    from .pipeline_lumina_mgpt import LuminaMGPTPipeline

    torch_dtype = getattr(torch, dtype) if dtype else None
    if model == NANO:
        from .nano import load_nano_pipeline

        try:
            pipe = load_nano_pipeline(**({"torch_dtype": torch_dtype} if torch_dtype is not None else {}))
        except FileNotFoundError as err:
            raise SystemExit(f"error: {err}") from err
        return pipe.to(device)
    if model == TINY_RANDOM:
        from .tiny import build_tiny_model, build_tiny_processor

        logger.warning(
            "Using a randomly initialised tiny model: the output is a well-formed image of noise, "
            "useful to check an installation. Pass --model PATH_OR_HUB_ID for a real model."
        )
        pipe = LuminaMGPTPipeline(model=build_tiny_model(), processor=build_tiny_processor(256))
    else:
        kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        pipe = LuminaMGPTPipeline.from_pretrained(model, **kwargs)
    return pipe.to(device)


def _generate(args) -> int:
    import torch

    out = args.output
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise SystemExit(f"error: the folder of --output ({out_dir}) does not exist.")
    if not out.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
        raise SystemExit("error: --output must end in .png, .jpg, .jpeg or .webp.")
    if args.num_images < 1:
        raise SystemExit(f"error: --num-images must be >= 1, got {args.num_images}.")
    if args.task and not args.image:
        raise SystemExit(f"error: --task {args.task} needs --image.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = _load_pipeline(args.model, device, args.dtype)
    image = None
    if args.image:
        from .image_processing_lumina_mgpt import to_pil

        image = to_pil(args.image)
    gen_device = "cuda" if device.startswith("cuda") else "cpu"
    n = args.num_images
    generators = [torch.Generator(gen_device).manual_seed(args.seed + i) for i in range(n)]
    try:
        result = pipe(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            guidance_scale=args.guidance_scale,
            num_images_per_prompt=n,
            generator=generators,
            temperature=args.temperature,
            top_k=args.top_k,
            image=image,
            task=args.task,
            compile=args.compile,
            num_candidates=args.num_candidates,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    if result.text is not None:
        for t in result.text:
            sys.stdout.write(t + "\n")
        return 0
    stem, ext = os.path.splitext(out)
    paths = [out] if n == 1 else [f"{stem}_{i}{ext}" for i in range(n)]
    for img, path in zip(result.images, paths):
        # write to a temporary file next to the target, then rename: no half-written image on failure
        fd, tmp = tempfile.mkstemp(suffix=ext, dir=os.path.dirname(os.path.abspath(path)))
        os.close(fd)
        try:
            img.save(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        sys.stdout.write(f"{path} ({img.size[0]}x{img.size[1]})\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lumina-hf", description="Lumina-mGPT in the Hugging Face ecosystem.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a prompt (or run an Omni task on --image)")
    g.add_argument("prompt", nargs="?", default=None, help="caption (or instruction/object for Omni tasks)")
    g.add_argument(
        "--model",
        default=NANO,
        help=f"a lumina_hf pipeline folder or Hub id; '{NANO}' (default) is the small model shipped with the package "
        f"(recipes/nano); '{TINY_RANDOM}' builds a random tiny model (noise) to check the install",
    )
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--guidance-scale", type=float, default=None)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument(
        "--num-candidates", type=int, default=None,
        help="text-to-image: sample this many candidates per image and keep the one the model itself describes "
        "best as the prompt (default: the model's own setting; 8 for the nano model, 1 otherwise)",
    )
    g.add_argument("--image", default=None, help="input image for --task")
    g.add_argument(
        "--task",
        default=None,
        choices=["depth", "segmentation", "normal", "pose", "detection", "editing", "condition", "describe"],
    )
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    g.add_argument("--compile", action="store_true", help="torch.compile the decoding step")
    g.add_argument("-o", "--output", default="out.png")
    g.set_defaults(func=_generate)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
