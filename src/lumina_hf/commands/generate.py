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
    g.add_argument("--speculative-window", type=int, default=None, metavar="N",
                   help="lossless speculative Jacobi decoding of the image: N tokens per forward pass, the same "
                   "distribution as token-by-token decoding in fewer forwards (0: token by token; default: the "
                   "model's own setting, else token by token)")
    add_memory_arguments(g)
    g.add_argument("--max-memory", default=None, metavar="DEVICE=SIZE,...",
                   help="memory budget per device, e.g. '0=20GiB,cpu=64GiB' (GPU indices, cpu, disk): the plan is "
                   "checked against it before loading, and the weights are spread over those devices (device_map='auto')")
    g.add_argument("--dry-run", action="store_true",
                   help="print the memory plan (weights, KV cache, activations, VQGAN, predicted peak) and exit "
                   "without loading any weights")
    g.add_argument("-o", "--output", default=None,
                   help="image file (.png/.jpg/.jpeg/.webp; default out.png); for --task describe a .txt file "
                   "(default: the answer is printed)")
    g.set_defaults(func=run)


QUANTIZE_CHOICES = ["int8", "int4"]


def add_memory_arguments(parser) -> None:
    """`--quantize`, shared by the commands that load a model (generate, demo)."""
    parser.add_argument(
        "--quantize", default=None, choices=QUANTIZE_CHOICES,
        help="weight-only quantization of the decoder layers with torchao (pip install \"lumina-hf[quantization]\"): "
        "int8 runs on CPU and CUDA, int4 on CUDA only; the embeddings, LM head and VQGAN keep their precision",
    )


def check_quantize(quantize: str | None, device: str) -> None:
    """Refuse, before any weight is read, a --quantize that cannot run here (torchao missing, int4 without CUDA)."""
    if quantize is None:
        return
    from ..quantization import check_kind

    try:
        check_kind(quantize, "torchao", device)
    except (ImportError, ValueError) as err:
        raise CommandError(f"--quantize {quantize}: {err}") from None


def parse_max_memory(text: str | None) -> dict | None:
    """'0=20GiB,cpu=64GiB' -> {0: bytes, 'cpu': bytes} (CommandError when malformed)."""
    if not text:
        return None
    from ..memory import normalize_max_memory

    budget = {}
    for part in text.split(","):
        device, sep, size = part.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise CommandError(f"--max-memory {text!r}: write DEVICE=SIZE pairs separated by commas, e.g. 0=20GiB,cpu=64GiB.")
        budget[device.strip()] = size.strip()
    try:
        return normalize_max_memory(budget)
    except ValueError as err:
        raise CommandError(f"--max-memory: {err}") from None


def load_pipeline(model: str, device: str, dtype: str | None, quantize: str | None = None, max_memory: dict | None = None):
    """The pipeline named on the command line: the shipped nano model, the random tiny model, or a folder/Hub id.

    With `quantize` ("int8"/"int4") the language model is loaded through transformers' `TorchAoConfig`
    (`lumina_hf.quantization.torchao_config`: decoder layers quantized, embeddings, LM head and VQGAN kept), onto
    `device` directly. With `max_memory` the model is spread over its devices with `device_map="auto"`."""
    import torch

    from ..pipeline_lumina_mgpt import LuminaMGPTPipeline

    check_quantize(quantize, device)
    torch_dtype = getattr(torch, dtype) if dtype else None
    if model == TINY_RANDOM:
        from ..testing_utils import build_tiny_model, build_tiny_processor

        logger.warning(
            "Using a randomly initialised tiny model: the output is a well-formed image of noise, "
            "useful to check an installation. Pass --model PATH_OR_HUB_ID for a real model."
        )
        net = build_tiny_model()
        if torch_dtype is not None:
            net = net.to(torch_dtype)
        if quantize:
            from ..quantization import quantize_in_place

            net = quantize_in_place(net.to(device), quantize)
        if max_memory:
            raise CommandError("--max-memory needs a model loaded from a folder; the random tiny model is built in memory.")
        return LuminaMGPTPipeline(model=net, processor=build_tiny_processor(256)).to(device)
    if model == NANO:
        from ..nano import load_nano_pipeline, nano_path

        try:
            source = nano_path()
        except FileNotFoundError as err:
            raise CommandError(str(err)) from err
        # the nano model is stored in bf16 and computes in float32 unless asked otherwise
        torch_dtype = torch.float32 if torch_dtype is None else torch_dtype
    else:
        source = model
    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    if quantize or max_memory:
        from ..modeling_lumina_mgpt import LuminaMGPTForConditionalGeneration

        model_kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        if quantize:
            from ..quantization import torchao_config

            model_kwargs["quantization_config"] = torchao_config(quantize)
        if max_memory:
            model_kwargs.update(device_map="auto", max_memory=max_memory)
        elif device != "cpu":
            model_kwargs["device_map"] = device  # quantize on the device the weights will run on
        kwargs["model"] = LuminaMGPTForConditionalGeneration.from_pretrained(source, subfolder="model", **model_kwargs)
    if model == NANO:
        pipe = load_nano_pipeline(**kwargs)
    else:
        pipe = LuminaMGPTPipeline.from_pretrained(source, **kwargs)
    if max_memory:
        return pipe  # placed by device_map
    return pipe.to(device)


def memory_plan(args, device: str):
    """The memory estimate of this command line, from the model's config and processor only (no weights)."""
    import torch
    from transformers import GenerationConfig

    from ..configuration_lumina_mgpt import LuminaMGPTConfig
    from ..memory import memory_estimate
    from ..processing_lumina_mgpt import LuminaMGPTProcessor, text_to_image_prompt

    if args.model == TINY_RANDOM:
        from ..testing_utils import build_tiny_processor, tiny_config

        config, processor, gen = tiny_config(), build_tiny_processor(256), None
        dtype = torch.float32
    else:
        if args.model == NANO:
            from ..nano import nano_path

            try:
                source = nano_path()
            except FileNotFoundError as err:
                raise CommandError(str(err)) from err
        else:
            source = args.model
        config = LuminaMGPTConfig.from_pretrained(source, subfolder="model")
        processor = LuminaMGPTProcessor.from_pretrained(source, subfolder="processor")
        try:
            gen = GenerationConfig.from_pretrained(source, subfolder="model")
        except OSError:
            gen = None
        dtype = torch.float32 if args.model == NANO else (getattr(config, "dtype", None) or torch.float32)
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    side = processor.image_processor.target_size
    height, width = args.height or side, args.width or side
    if args.task:
        text = f"{args.prompt or ''} <|image|>"
        prompt_length = len(processor.tokenizer(text)["input_ids"]) + config.unirep.span_length(height, width)
        guidance_scale = args.guidance_scale if args.guidance_scale is not None else getattr(gen, "omni_guidance_scale", None) or 1.0
        candidates = 1
    else:
        ids = processor(text=text_to_image_prompt(args.prompt or "", width, height), return_tensors=None)["input_ids"][0]
        prompt_length = len(ids)
        default_g = getattr(gen, "guidance_scale", None) if gen is not None else None
        guidance_scale = args.guidance_scale if args.guidance_scale is not None else (4.0 if default_g is None else default_g)
        candidates = args.num_candidates or (getattr(gen, "num_candidates", None) if gen is not None else None) or 1
    return memory_estimate(
        config, height, width, batch_size=args.num_images, dtype=dtype, quantization=args.quantize,
        guidance=guidance_scale != 1.0, num_candidates=candidates, prompt_length=prompt_length,
    ), config


def _check_memory(args, device: str) -> None:
    """--dry-run prints the plan and exits; --max-memory is checked against the plan before loading."""
    max_memory = parse_max_memory(args.max_memory)
    args.max_memory_budget = max_memory
    if not (args.dry_run or max_memory):
        return
    from ..memory import check_max_memory, format_bytes

    estimate, config = memory_plan(args, device)
    if args.dry_run:
        sys.stdout.write(estimate.table() + "\n")
    if max_memory:
        s = estimate.settings
        check_max_memory(config, max_memory, s["height"], s["width"], s["batch_size"], s["dtype"], s["quantization"],
                         guidance=s["guidance"], num_candidates=s["num_candidates"], prompt_length=s["prompt_length"])
        if args.dry_run:
            budget = ", ".join(f"{d}: {format_bytes(v)}" for d, v in max_memory.items())
            sys.stdout.write(f"fits max_memory ({budget})\n")


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
    if args.speculative_window is not None and args.speculative_window < 0:
        raise CommandError(f"--speculative-window must be >= 0 (0: token by token), got {args.speculative_window}.")
    if args.speculative_window and args.task == "describe":
        raise CommandError("--speculative-window is for image outputs; --task describe answers in text: leave it out.")
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
    check_quantize(args.quantize, device)
    _check_model_path(args.model)
    _check_memory(args, device)
    if args.dry_run:
        return 0
    _check_output(args)
    image = None
    if args.image:
        from ..image_processing_lumina_mgpt import to_pil

        image = to_pil(args.image)  # read before the model is loaded: an unreadable file fails fast
    pipe = load_pipeline(args.model, device, args.dtype, args.quantize, args.max_memory_budget)
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
        speculative_window=args.speculative_window,
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
