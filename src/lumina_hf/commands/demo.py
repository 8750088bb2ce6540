"""`lumina-hf demo`: serve the Gradio web app (text to image, Omni tasks, chat) for a model.

Gradio is an optional extra (`pip install "lumina-hf[demo]"`); without it the command says so in one line.
"""

import argparse
import logging
import os

from . import CommandError
from .generate import NANO, TINY_RANDOM, add_memory_arguments, check_quantize, load_pipeline

logger = logging.getLogger(__name__)

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
    add_memory_arguments(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    if not 0 < args.port < 65536:
        raise CommandError(f"--port must be between 1 and 65535, got {args.port}.")
    # a quantization that cannot run here is refused before the app and the model load
    check_quantize(args.quantize, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CommandError(INSTALL_HINT) from None
    from ..demo import build_demo, exposure_notice, launch

    # Gradio's usage statistics would be sent to its servers; leave them off unless the user turned them on
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipe = load_pipeline(args.model, device, args.dtype, args.quantize)
    except (OSError, ValueError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CommandError(f"could not load the model {args.model!r}: {first_line}") from None
    notice = exposure_notice(args.host, args.share)
    demo = build_demo(pipe, notice=notice)
    try:
        launch(demo, host=args.host, port=args.port, share=args.share)
    except OSError as err:  # e.g. the port is taken
        first_line = str(err).splitlines()[0] if str(err) else repr(err)
        raise CommandError(f"could not serve on {args.host}:{args.port}: {first_line}") from None
    except KeyboardInterrupt:
        pass
    finally:
        demo.lumina_engine.close()
    return 0


__all__ = ["register", "run"]
