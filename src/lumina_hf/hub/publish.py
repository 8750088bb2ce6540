"""Publishing a folder: plan the push (check, scrub, scan, render the card and samples), then upload it.

`prepare_push` does everything but the upload, without any network access, and raises `PublishInputError` on
any problem: the repo id, the folder (kind, weights complete, processor present, links out of it), the
adapter's base model, the card metadata, and every file to upload (the per-kind allow-list plus `include`
patterns), scrubbed of local paths and scanned for the push token and other secrets. `lumina-hf push --dry-run`
prints that plan: it fails on exactly the problems a real push fails on.

`upload_plan` asks the Hub to validate the card's metadata, creates the repo (`exist_ok=True`) and makes two
commits: the files (plus the optional `samples/grid.png`), then `README.md` last, so a failed upload never leaves
a card that describes weights that are not there. A failure raises `PushError`, which says which commits went
through and which files were not committed. With `create_pr=True` both commits go to one pull request.

A training recipe's `push_to_hub: true` publishes through the same path (`trainer_push`), once, after the
final save: the Trainer's own upload of `output_dir` is switched off.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

from .cards import LIBRARY_NAME, build_model_card, resolve_card_type
from .errors import PublishInputError, PushError
from .folders import FolderInfo, inspect_folder
from .options import PublishOptions, looks_like_hub_id, validate_hub_repo_id
from .samples import SampleGrid, generate_sample_grid, load_folder_pipeline
from .scrub import check_clean, folder_roots, local_roots, prepare_uploads

logger = logging.getLogger(__name__)


@dataclass
class CommitRecord:
    message: str
    oid: str | None
    url: str | None
    files: list[str]


@dataclass
class PushPlan:
    """Everything `push_to_hub_folder` uploads, prepared (and checked) without any network access."""

    repo_id: str
    info: FolderInfo
    card_type: str
    card: ModelCard
    uploads: list[tuple[str, bytes | str]]  # (path in repo, bytes or local file path), README.md excluded
    samples: SampleGrid | None = None
    scrubbed: tuple[str, ...] = ()  # paths whose content was scrubbed of local paths or secrets

    @property
    def files(self) -> list[str]:
        return [p for p, _ in self.uploads] + ["README.md"]

    def describe(self, limit: int = 200) -> str:
        """The plan as `lumina-hf push --dry-run` prints it: every file that would go up, then what is left out
        and why (paths inside the folder only), then the card."""
        lines = [f"{self.info.kind} folder, {self.card_type} card; would upload {len(self.files)} files:"]
        for path, content in self.uploads:
            size = len(content) if isinstance(content, bytes) else os.path.getsize(content)
            notes = []
            if path in self.scrubbed:
                notes.append("scrubbed")
            if path in self.info.included:
                notes.append("--include")
            if self.samples is not None and path == self.samples.path_in_repo:
                notes.append("generated now")
            lines.append(f"  {path}  ({_size(size)}{''.join(', ' + n for n in notes)})")
        lines.append("  README.md  (the model card below)")
        left = list(self.info.left_out.items())
        if left:
            lines.append(f"left out ({len(left)}):")
            lines += [f"  {path}  ({why})" for path, why in left[:limit]]
            if len(left) > limit:
                lines.append(f"  ... and {len(left) - limit} more")
        return "\n".join(lines) + "\n\n" + str(self.card)


@dataclass
class PushResult:
    repo_id: str
    kind: str
    card_type: str
    commits: list[CommitRecord]
    pr_url: str | None
    files: list[str]


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# ------------------------------------------------------------------------------------------ plan
def prepare_push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    options: PublishOptions | None = None,
    **kwargs: Any,
) -> PushPlan:
    """Check `folder`, choose, scrub and scan its files, render the card and the sample grid: everything but
    the upload. `options` (or its fields as keyword arguments: card_type, base_model, omni, license, datasets,
    tags, target_size, samples, seed, sample_size, device, include) says what to publish; `token` is scanned
    for. Raises `PublishInputError` (nothing has been sent anywhere)."""
    options = PublishOptions.build(options, **kwargs)
    validate_hub_repo_id(repo_id)
    info = inspect_folder(folder, include=options.include)
    resolved_base = options.base_model or info.base_model_hint or (info.training.base_model if info.training else None)
    if info.kind == "adapter" and resolved_base is None:
        raise PublishInputError(
            "the adapter's base model is a local folder or unknown: pass base_model= / --base-model ORG/NAME "
            "(the Hub id of the model it was trained on), so the card can say how to load it."
        )
    card_type = options.card_type or resolve_card_type(info)
    if info.left_out:
        logger.info("Leaving out %d path(s): %s", len(info.left_out), ", ".join(list(info.left_out)[:10]))
    roots = local_roots(info.folder, info.base_model_local)
    uploads = prepare_uploads(
        info.folder, info.files, set(info.weights), repo_id=repo_id,
        base_model=resolved_base if info.kind == "adapter" else None, token=token,
        roots=roots, vocab_roots=folder_roots(info.folder, info.base_model_local),
    )
    card = build_model_card(info, repo_id, options=options)  # fails fast, before any slow sampling
    grid = None
    if options.samples:
        if info.has_vqgan is False:
            raise PublishInputError("sample images need the VQGAN weights, which this model lacks.")
        logger.info("Generating %d sample image(s) (seed %d)", len(options.samples), options.seed)
        pipe = load_folder_pipeline(info, base_model=resolved_base, device=options.device)
        w, h = options.sample_size if options.sample_size else (None, None)
        grid = generate_sample_grid(pipe, list(options.samples), seed=options.seed, width=w, height=h)
        del pipe
        card = build_model_card(info, repo_id, options=options, samples=grid)
    check_clean(str(card), "the model card", roots, token, text=True)
    if info.has_vqgan is False:
        logger.warning("The model has no VQGAN weights: it cannot encode or decode images (the card says so).")
    pairs = [(u.path_in_repo, u.content) for u in uploads]
    if grid is not None:
        pairs = [p for p in pairs if p[0] != grid.path_in_repo] + [(grid.path_in_repo, grid.png)]
    return PushPlan(repo_id=repo_id, info=info, card_type=card_type, card=card, uploads=pairs, samples=grid,
                    scrubbed=tuple(u.path_in_repo for u in uploads if u.scrubbed))


def require_token(token: str | None) -> str:
    """The token to push with: `token`, else `HF_TOKEN` or the saved login. `PublishInputError` if none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PublishInputError(
            "no Hugging Face token: pass token=, set HF_TOKEN or run `hf auth login` (a token with write access)."
        )
    return token


def plan_push(folder: str | os.PathLike, repo_id: str, *, token: str | None = None,
              options: PublishOptions | None = None) -> tuple[PushPlan, str]:
    """(the plan, the token) of a push, with every check a push makes before its first request, in the same
    order: the repo id, the token (`token`, else `HF_TOKEN` or the saved login; the files are scanned for it),
    then `prepare_push`. What `push_to_hub_folder` and `lumina-hf push --dry-run` both run."""
    validate_hub_repo_id(repo_id)
    token = require_token(token)
    return prepare_push(folder, repo_id, token=token, options=options), token


# ------------------------------------------------------------------------------------------ upload
def validate_card_metadata(endpoint: str, card_text: str, token: str | None) -> None:
    """Ask the Hub whether a model card's YAML metadata is valid; `ValueError` with the Hub's reason if not.

    The same request `huggingface_hub.ModelCard.validate()` makes, sent to `endpoint` (that method always asks
    the default endpoint, so it cannot check a push to another Hub)."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    response = get_session().post(
        f"{endpoint}/api/validate-yaml",
        json={"content": card_text, "repoType": "model"},
        headers=build_hf_headers(token=token),
    )
    if response.status_code == 400:
        try:
            errors = [e.get("message", str(e)) for e in response.json().get("errors", [])]
        except ValueError:
            errors = []
        raise ValueError("; ".join(errors) or response.text)
    hf_raise_for_status(response)


def _short_error(err: BaseException, token: str | None) -> str:
    msg = " ".join(str(err).split()) or type(err).__name__
    if token:
        msg = msg.replace(token, "<token>")
    return msg[:600]


def _list(paths: list[str], limit: int = 40) -> str:
    return ", ".join(paths[:limit]) + (f" ... and {len(paths) - limit} more" if len(paths) > limit else "")



def push_to_hub_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
    options: PublishOptions | None = None,
    **kwargs: Any,
) -> PushResult:
    """Publish a lumina_hf pipeline, model or adapter folder to `repo_id` with a model card.

    Args:
        folder: the folder (kind detected: pipeline, model or PEFT adapter). It is not modified. Only the files
            its kind needs go up, plus those `include` patterns name; every one is scanned for secrets.
        repo_id: `namespace/name`. The repo is created if needed (`private` applies only then).
        token: a Hub token (default: `HF_TOKEN` or the saved login). Never logged or uploaded.
        revision: the branch to push to (created from main if missing); `create_pr`: open a pull request
            (against `revision` or main) holding both commits instead.
        commit_message: message of the files commit (the card commit says "Add model card").
        endpoint: Hub endpoint (default `HF_ENDPOINT`).
        options / kwargs: a `PublishOptions`, or its fields as keyword arguments:
            samples, seed, sample_size, device: prompts for a grid of sample images generated now with the
                model's own sampling defaults (generator seeded `seed + i`, default the target square) and stored
                as `samples/grid.png`;
            card_type: "base", "finetune" or "adapter" (default: from the folder);
            base_model: Hub id of the base (adapters: required when the adapter names a local base);
            omni: an Omni model (`pipeline_tag: any-to-any`); default: "omni" in the repo id, base model or folder name;
            license / license_name / license_link: default the Chameleon Research License (`license: other`);
            datasets, tags: extra card metadata; target_size: overrides the bucket family read from the processor;
            include: glob patterns of extra files to upload (scanned like the others).

    Returns a `PushResult`. Raises `PublishInputError` (nothing uploaded) or `PushError` (which commits went
    through and which files were not committed).
    """
    plan, token = plan_push(folder, repo_id, token=token, options=PublishOptions.build(options, **kwargs))
    return upload_plan(plan, token=token, private=private, revision=revision, commit_message=commit_message,
                       create_pr=create_pr, endpoint=endpoint)


def _open_repo(api: HfApi, plan: PushPlan, token: str, private: bool | None, revision: str | None, create_pr: bool) -> None:
    """The Hub's own check of the card's metadata, then the repo (and branch) created if missing."""
    try:
        validate_card_metadata(api.endpoint, str(plan.card), token)
    except ValueError as err:
        raise PublishInputError(f"the Hub rejected the card's metadata: {err}") from None
    except Exception as err:
        raise PushError(
            f"could not reach the Hub to validate the card ({_short_error(err, token)}). Nothing was uploaded.",
            committed=[], not_committed=plan.files,
        ) from None
    try:
        api.create_repo(plan.repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main" and not create_pr and not revision.startswith("refs/"):
            api.create_branch(plan.repo_id, branch=revision, exist_ok=True)
    except Exception as err:
        raise PushError(
            f"could not create or access the repository {plan.repo_id}"
            f"{f' (branch {revision})' if revision else ''}: {_short_error(err, token)}. Nothing was uploaded.",
            committed=[], not_committed=plan.files,
        ) from None


def _commit_failed(repo_id: str, step: int, steps: list, committed: list[CommitRecord], err: Exception, token: str) -> PushError:
    """The error of a failed commit: which commits went through, which files did not."""
    msg = steps[step][0]
    pending = [p for _, fs in steps[step:] for p, _ in fs]
    if committed:
        done = "; ".join(
            f"commit {j + 1} '{c.message}' ({(c.oid or '?')[:10]}): {_list(c.files)}" for j, c in enumerate(committed)
        )
        status = f"Committed (on the Hub now): {done}."
    else:
        status = (
            f"Nothing was committed: {repo_id} exists but holds none of these files (large files already sent "
            "to the Hub's storage are not part of any commit)."
        )
    return PushError(
        f"upload to {repo_id} failed at commit {step + 1} of {len(steps)} ('{msg}'): {_short_error(err, token)}. "
        f"{status} Not committed: {_list(pending)}. Run the same push again to finish it.",
        committed=committed,
        not_committed=pending,
    )


def upload_plan(
    plan: PushPlan,
    *,
    token: str,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
) -> PushResult:
    """Upload a prepared `PushPlan`: create the repo, commit the files, then commit the card."""
    from .. import __version__

    repo_id = plan.repo_id
    api = HfApi(endpoint=endpoint, token=token, library_name=LIBRARY_NAME, library_version=__version__)
    _open_repo(api, plan, token, private, revision, create_pr)
    message = commit_message or f"Upload {plan.info.kind} with lumina-hf {__version__}"
    steps = [
        (message, plan.uploads),
        (f"{commit_message} (model card)" if commit_message else "Add model card", [("README.md", str(plan.card).encode("utf-8"))]),
    ]
    committed: list[CommitRecord] = []
    target = revision
    pr_url = None
    logger.info("Publishing the %s folder to %s (%d files, then the card)", plan.info.kind, repo_id, len(plan.uploads))
    for i, (msg, files) in enumerate(steps):
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=src) for p, src in files]
        try:
            result = api.create_commit(
                repo_id,
                operations=ops,
                commit_message=msg,
                commit_description=f"Published with lumina-hf {__version__}.",
                revision=target,
                create_pr=create_pr and i == 0,
                repo_type="model",
            )
        except Exception as err:
            raise _commit_failed(repo_id, i, steps, committed, err, token) from None
        committed.append(CommitRecord(message=msg, oid=result.oid, url=result.commit_url, files=[p for p, _ in files]))
        logger.info("Committed %d file(s) to %s: %s", len(files), repo_id, result.commit_url)
        if create_pr and i == 0:
            pr_url = result.pr_url
            target = result.pr_revision
    if pr_url:
        logger.info("Opened pull request %s", pr_url)
    return PushResult(
        repo_id=repo_id, kind=plan.info.kind, card_type=plan.card_type, commits=committed, pr_url=pr_url, files=plan.files
    )


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainerPush:
    """Where a training run publishes its final folder (from the recipe's `push_to_hub`, `hub_model_id`,
    `hub_token`, `hub_private_repo`, `hub_revision`), checked before training starts."""

    repo_id: str
    token: str
    private: bool | None = None
    revision: str | None = None
    base_model: str | None = None

    def push(self, folder: str | os.PathLike) -> PushResult:
        """Publish `folder` (the run's pipeline folder, or its adapter) like `lumina-hf push` does. A failure
        says that the trained model is saved and how to publish it once the problem is fixed."""
        try:
            result = push_to_hub_folder(folder, self.repo_id, token=self.token, private=self.private,
                                        revision=self.revision, base_model=self.base_model)
        except (PublishInputError, PushError) as err:
            how = (f"Training finished and its output is saved; publishing it to {self.repo_id} failed: {err} Once "
                   f"fixed, run `lumina-hf push <output folder> --repo-id {self.repo_id}`.")
            if isinstance(err, PushError):
                raise PushError(how, committed=err.committed, not_committed=err.not_committed) from None
            raise PublishInputError(how) from None
        for commit in result.commits:
            logger.info("Published to the Hub: %s", commit.url)
        return result


def trainer_push(training_args: Any, base_model: str | None = None, adapter_only: bool = False) -> TrainerPush | None:
    """The push a recipe asks for (None without `push_to_hub: true`), checked now, before any work: the repo
    id, a token, and for an adapter pushed on its own a base model on the Hub. The Trainer's own upload (all of
    `output_dir`, at every save) is switched off (`push_to_hub` set to False on `training_args`): the run's final
    folder is published once, after training, through `push_to_hub_folder`. Raises `PublishInputError`."""
    if not getattr(training_args, "push_to_hub", False):
        return None
    repo_id = getattr(training_args, "hub_model_id", None)
    if not repo_id:
        raise PublishInputError("push_to_hub: true needs hub_model_id: ORG/NAME, the Hub repo to publish the trained model to.")
    validate_hub_repo_id(repo_id, "hub_model_id")
    token = require_token(getattr(training_args, "hub_token", None))
    base = base_model if looks_like_hub_id(base_model) else None
    if adapter_only and base is None:
        raise PublishInputError(
            "push_to_hub of a LoRA adapter needs its base model on the Hub (model_name_or_path is a local folder): "
            "set save_merged: true to publish the merged pipeline instead, or push the adapter later with "
            "`lumina-hf push OUTPUT_DIR/adapter --repo-id ORG/NAME --base-model ORG/BASE`."
        )
    strategy = str(getattr(getattr(training_args, "hub_strategy", None), "value", getattr(training_args, "hub_strategy", "")))
    if strategy not in ("", "every_save", "end"):
        logger.warning("hub_strategy %r: lumina-hf publishes the final folder once, after training; checkpoints are not uploaded.", strategy)
    training_args.push_to_hub = False
    return TrainerPush(repo_id=repo_id, token=token, private=getattr(training_args, "hub_private_repo", None),
                       revision=getattr(training_args, "hub_revision", None), base_model=base)


__all__ = [
    "CommitRecord",
    "PushPlan",
    "PushResult",
    "TrainerPush",
    "plan_push",
    "prepare_push",
    "push_to_hub_folder",
    "require_token",
    "trainer_push",
    "upload_plan",
    "validate_card_metadata",
]
