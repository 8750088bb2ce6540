"""`lumina-hf demo`: serve the Gradio web app (text to image, Omni tasks, chat) for a model.

Gradio is an optional extra (`pip install "lumina-hf[demo]"`); without it the command says so in one line.
"""

import argparse
import logging
import os
import sys

logger = logging.getLogger(__name__)

NANO = "nano"
TINY_RANDOM = "tiny-random"
INSTALL_HINT = 'the demo needs Gradio: pip install "lumina-hf[demo]"'


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="serve a web app (text to image, Omni tasks, chat) for a model",
        description="Serve the Gradio web app for a model. It binds to 127.0.0.1 (this machine only) unless "
        "--host or --share say otherwise.",
    )
    p.add_argument(
        "--model",
        default=NANO,
        help=f"a lumina_hf pipeline folder or Hub id; '{NANO}' (default) is the small model shipped with the package; "
        f"'{TINY_RANDOM}' builds a random tiny model (noise) to check the install",
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 opens it to other machines)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action=argparse.BooleanOptionalAction, default=False,
                   help="also publish the app through a public Gradio link (--no-share, the default, does not)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="quantized weights (not available yet)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    sys.stderr.write(f"error: {message}\n")
    return 2


def load_pipeline(model: str, device: str | None = None, dtype: str | None = None):
    """The pipeline named on the command line: the nano model, the random tiny model, or a folder / Hub id."""
    import torch

    from ..pipeline_lumina_mgpt import LuminaMGPTPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {"torch_dtype": getattr(torch, dtype)} if dtype else {}
    if model == NANO:
        from ..nano import load_nano_pipeline

        pipe = load_nano_pipeline(**kwargs)
    elif model == TINY_RANDOM:
        from ..tiny import build_tiny_model, build_tiny_processor

        logger.warning("Using a randomly initialised tiny model: its images are noise. Pass --model for a real model.")
        pipe = LuminaMGPTPipeline(model=build_tiny_model(), processor=build_tiny_processor(256))
    else:
        pipe = LuminaMGPTPipeline.from_pretrained(model, **kwargs)
    return pipe.to(device)


def run(args) -> int:
    if args.quantize:
        return _fail(f"--quantize {args.quantize} is not available yet; run without --quantize.")
    if not 0 < args.port < 65536:
        return _fail(f"--port must be between 1 and 65535, got {args.port}.")
    try:
        import gradio  # noqa: F401
    except ImportError:
        return _fail(INSTALL_HINT)
    from ..demo import build_demo, exposure_notice, launch

    # Gradio's usage statistics would be sent to its servers; leave them off unless the user turned them on
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        pipe = load_pipeline(args.model, args.device, args.dtype)
    except (OSError, ValueError) as err:
        return _fail(f"could not load the model {args.model!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    notice = exposure_notice(args.host, args.share)
    demo = build_demo(pipe, notice=notice)
    try:
        launch(demo, host=args.host, port=args.port, share=args.share)
    except OSError as err:  # e.g. the port is taken
        return _fail(f"could not serve on {args.host}:{args.port}: {str(err).splitlines()[0] if str(err) else err!r}")
    except KeyboardInterrupt:
        pass
    finally:
        demo.lumina_engine.close()
    return 0


__all__ = ["register", "run", "load_pipeline"]
