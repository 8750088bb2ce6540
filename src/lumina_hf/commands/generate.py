"""`lumina-hf generate`: images from a prompt, or an Omni task on an input image, with any pipeline folder."""

import logging
import os
import sys
import tempfile

from . import CommandError

logger = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"
NANO = "nano"
TASKS = ["depth", "segmentation", "normal", "pose", "detection", "editing", "condition", "describe"]


def register(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate images from a prompt (or run an Omni task on --image)")
    g.add_argument("prompt", nargs="?", default=None, help="caption (or instruction/object for Omni tasks)")
    g.add_argument(
        "--model",
        default=NANO,
        help=f"a lumina_hf pipeline folder or Hub id; '{NANO}' (default) is the small model shipped with the package "
        f"(recipes/nano); '{TINY_RANDOM}' builds a random tiny model (noise) to check the install",
    )
    g.add_argument("--height", type=int, default=None, help="image height in pixels, one of the model's buckets "
                   "(default: its square target size; for Omni tasks the input image's bucket)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels (give it with --height)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (default: the model's own, else 4.0; Omni tasks 1.0)")
    g.add_argument("--negative-prompt", default=None, help="text of the unconditional branch (default: the image alone)")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the model's, else 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="top-k inside images (default: the model's, else 2000; Omni 200)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image (then seed+1, ...)")
    g.add_argument("--num-images", type=int, default=1, help="images to generate (files get _0, _1, ... suffixes)")
    g.add_argument(
        "--num-candidates", type=int, default=None,
        help="text-to-image: sample this many candidates per image and keep the one the model itself describes "
        "best as the prompt (default: the model's own setting; 8 for the nano model, 1 otherwise)",
    )
    g.add_argument("--image", default=None, help="input image for --task")
    g.add_argument("--task", default=None, choices=TASKS)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    g.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                   help="torch.compile the decoding step; MODE: default, reduce-overhead (CUDA graphs), max-autotune, "
                   "max-autotune-no-cudagraphs")
    g.add_argument("-o", "--output", default=None,
                   help="image file (.png/.jpg/.jpeg/.webp; default out.png); for --task describe a .txt file "
                   "(default: the answer is printed)")
    g.set_defaults(func=run)


def load_pipeline(model: str, device: str, dtype: str | None):
    """The pipeline named on the command line: the shipped nano model, the random tiny model, or a folder/Hub id."""
    import torch

    from ..pipeline_lumina_mgpt import LuminaMGPTPipeline

    torch_dtype = getattr(torch, dtype) if dtype else None
    if model == NANO:
        from ..nano import load_nano_pipeline

        try:
            pipe = load_nano_pipeline(**({"torch_dtype": torch_dtype} if torch_dtype is not None else {}))
        except FileNotFoundError as err:
            raise CommandError(str(err)) from err
        return pipe.to(device)
    if model == TINY_RANDOM:
        from ..testing_utils import build_tiny_model, build_tiny_processor

        logger.warning(
            "Using a randomly initialised tiny model: the output is a well-formed image of noise, "
            "useful to check an installation. Pass --model PATH_OR_HUB_ID for a real model."
        )
        pipe = LuminaMGPTPipeline(model=build_tiny_model(), processor=build_tiny_processor(256))
    else:
        kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        pipe = LuminaMGPTPipeline.from_pretrained(model, **kwargs)
    return pipe.to(device)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _check_output(args) -> None:
    """Everything about the output, checked before the model is loaded."""
    if args.output is None:
        if args.task == "describe":
            return  # the answer goes to stdout
        args.output = "out.png"
    wanted = (".txt",) if args.task == "describe" else IMAGE_SUFFIXES
    if not args.output.lower().endswith(wanted):
        what = "--task describe writes text: -o must end in .txt (or leave -o out to print the answer)" \
            if args.task == "describe" else "--output must end in .png, .jpg, .jpeg or .webp"
        raise CommandError(f"{what}, got {args.output}.")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise CommandError(f"the folder of --output ({out_dir}) does not exist.")
    try:  # create and remove a file there: permission bits alone do not tell (root, read-only mounts)
        fd, probe = tempfile.mkstemp(prefix=".lumina-write-check-", dir=out_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise CommandError(f"cannot write to the folder of --output ({out_dir}): {err.strerror}; choose another -o.") from None


def _check_request(args) -> str:
    """The arguments that need no model, checked before loading one; returns the device to use."""
    import torch

    if args.num_images < 1:
        raise CommandError(f"--num-images must be >= 1, got {args.num_images}.")
    if not 0 <= args.seed <= 2**64 - args.num_images:
        raise CommandError(f"--seed must be between 0 and 2**64 - 1 (seeds seed..seed+num_images-1), got {args.seed}.")
    if args.task and not args.image:
        raise CommandError(f"--task {args.task} needs --image.")
    if args.image and not args.task:
        raise CommandError("--image needs --task (depth, segmentation, ..., describe): text-to-image takes no image.")
    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError:
        raise CommandError(f"--device {args.device!r} is not a device: use cpu, cuda or cuda:N.") from None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {args.device} asked for CUDA, but this machine has none: use --device cpu.")
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def _check_model_path(model: str) -> None:
    """A `--model` that is clearly a local path must exist (a Hub id is looked up on the Hub)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if model in (NANO, TINY_RANDOM) or os.path.isdir(model):
        return
    try:
        validate_repo_id(model)
        looks_local = model.startswith((".", "~", os.sep)) or model.count("/") > 1
    except HFValidationError:
        looks_local = True
    if looks_local:
        raise CommandError(f"--model {model}: no such folder (give a lumina_hf pipeline folder or a Hub id org/name).")


def _write_text(text: str, path: str) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".txt", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_images(images, output: str) -> None:
    stem, ext = os.path.splitext(output)
    paths = [output] if len(images) == 1 else [f"{stem}_{i}{ext}" for i in range(len(images))]
    for img, path in zip(images, paths):
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


def run(args) -> int:
    import torch

    device = _check_request(args)
    _check_output(args)
    _check_model_path(args.model)
    image = None
    if args.image:
        from ..image_processing_lumina_mgpt import to_pil

        image = to_pil(args.image)  # read before the model is loaded: an unreadable file fails fast
    pipe = load_pipeline(args.model, device, args.dtype)
    gen_device = "cuda" if device.startswith("cuda") else "cpu"
    generators = [torch.Generator(gen_device).manual_seed(args.seed + i) for i in range(args.num_images)]
    result = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        guidance_scale=args.guidance_scale,
        num_images_per_prompt=args.num_images,
        generator=generators,
        temperature=args.temperature,
        top_k=args.top_k,
        image=image,
        task=args.task,
        compile=args.compile,
        num_candidates=args.num_candidates,
    )
    if result.text is not None:
        if args.output is None:
            for t in result.text:
                sys.stdout.write(t + "\n")
        else:
            _write_text("\n".join(result.text) + "\n", args.output)
            sys.stdout.write(f"{args.output} (the answer)\n")
        return 0
    _save_images(result.images, args.output)
    return 0
