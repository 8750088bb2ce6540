"""`lumina-hf push`: publish a pipeline, model or LoRA adapter folder to the Hub with a model card."""

import argparse
import re
import sys

from ..hub import CARD_TYPES, PublishInputError, PublishOptions, PushError, plan_push, push_to_hub_folder
from . import CommandError


def _parse_size(value: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
    if not m:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {value!r}")
    return int(m.group(1)), int(m.group(2))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "push",
        help="publish a lumina_hf pipeline, model or LoRA adapter folder to the Hub with a model card",
        description=(
            "Publish a lumina_hf folder (pipeline, model or PEFT adapter, detected) to the Hugging Face Hub: "
            "checks it, uploads only the files its kind needs (plus --include), scrubbed of local paths and scanned "
            "for secrets, then a model card. The token comes from HF_TOKEN or `hf auth login`; the endpoint from "
            "HF_ENDPOINT."
        ),
    )
    p.add_argument("folder", metavar="DIR", help="the folder to publish (not modified)")
    p.add_argument("--repo-id", required=True, metavar="ORG/NAME")
    p.add_argument("--private", action="store_true", default=None, help="create the repo private (if it is new)")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of pushing to the branch")
    p.add_argument("--samples", nargs="+", metavar="PROMPT", default=None,
                   help="prompts of sample images generated now and shown in the card (samples/grid.png)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample (then seed+1, ...)")
    p.add_argument("--sample-size", type=_parse_size, default=None, metavar="WxH", help="sample size (default: target square)")
    p.add_argument("--card-type", choices=CARD_TYPES, default=None, help="default: from the folder")
    p.add_argument("--base-model", default=None, metavar="ORG/NAME", help="Hub id of the base model")
    p.add_argument("--omni", action=argparse.BooleanOptionalAction, default=None,
                   help="an Omni model (any-to-any); default: 'omni' in the repo id, base model or folder name")
    p.add_argument("--license", default=None, help="default: other (Chameleon Research License)")
    p.add_argument("--dataset", dest="datasets", action="append", default=None, metavar="ORG/NAME")
    p.add_argument("--tag", dest="tags", action="append", default=None)
    p.add_argument("--target-size", type=int, default=None, help="bucket family when the folder does not say")
    p.add_argument("--device", default=None, help="device for the sample images (default: cuda when available)")
    p.add_argument("--include", dest="include", action="append", default=None, metavar="PATTERN",
                   help="also upload the files this glob names (path inside the folder, e.g. 'notes/*.txt'; "
                   "repeatable); they are scanned for secrets like every other file")
    p.add_argument("--dry-run", action="store_true",
                   help="run every check of a push and print what would go up, what is left out and the card; upload nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        options = PublishOptions(
            card_type=args.card_type, base_model=args.base_model, omni=args.omni, license=args.license,
            datasets=args.datasets, tags=args.tags, target_size=args.target_size, samples=args.samples,
            seed=args.seed, sample_size=args.sample_size, device=args.device, include=args.include,
        )
        if args.dry_run:
            # the same checks as a push, the token included (the files are scanned for it), up to the network
            plan, _ = plan_push(args.folder, args.repo_id, options=options)
            sys.stdout.write(plan.describe())
            return 0
        result = push_to_hub_folder(
            args.folder, args.repo_id, private=args.private, revision=args.revision,
            commit_message=args.commit_message, create_pr=args.create_pr, options=options,
        )
    except (PublishInputError, PushError) as err:
        raise CommandError(str(err)) from None
    for c in result.commits:
        sys.stdout.write(f"{c.url}\n")
    if result.pr_url:
        sys.stdout.write(f"pull request: {result.pr_url}\n")
    return 0
