"""`lumina-hf`: the command-line dispatcher. Each verb lives in `lumina_hf.commands.<verb>`."""

import argparse
import importlib
import logging
import sys

from huggingface_hub.errors import StrictDataclassError

from .commands import VERBS, CommandError

# errors that are the user's to fix: one line, exit status 2 (anything else is a bug and keeps its traceback);
# StrictDataclassError: a config.json field of the wrong type
USER_ERRORS = (CommandError, ValueError, OSError, StrictDataclassError)


class CommandFailed(SystemExit):
    """Exit status 2 (130 when interrupted) after the one-line message was written to stderr; `str()` is that line."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="lumina-hf", description="Lumina-mGPT in the Hugging Face ecosystem.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"lumina-hf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in VERBS:
        importlib.import_module(f"lumina_hf.commands.{name}").register(sub)
    return parser


def run_command(func, args) -> int:
    """Run a verb's `func(args)`; a user error becomes `error: <message>` on stderr and exit status 2."""
    try:
        return func(args)
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        sys.stderr.write("error: interrupted\n")
        raise CommandFailed("error: interrupted", code=130) from None
    except USER_ERRORS as err:
        if getattr(args, "debug", False):
            raise
        message = f"error: {err}"
        sys.stderr.write(message + "\n")
        raise CommandFailed(message) from None


def launcher_main(verb, argv: list[str] | None = None) -> int:
    """`main` of a `python -m lumina_hf.<verb>` module, which launchers (accelerate, torchrun) start once per
    process: the verb's own parser (`verb.build_parser()`), INFO logging with `--verbose`, errors as one line."""
    args = verb.build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return run_command(verb.run, args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
