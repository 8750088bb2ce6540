"""Keeps secrets and local paths out of what is published: scrubs configs, then scans every uploaded file.

Two steps, applied to every file of a push (see `prepare_uploads`):

- scrubbing (configs only): in JSON/YAML files, values under secret keys (`hub_token`, `token`, ...) become
  null, strings naming a local path become their base name, and keys such as `_name_or_path` get the repo id;
  in other text files, local folder prefixes become `<local>`. Vocabulary files are never edited.
- scanning (every file, whatever its name): the token of the push and strings shaped like a known kind of
  secret (`hf_` + 30 or more letters and digits, GitHub, OpenAI, AWS, Slack and Google keys, private-key
  blocks) are refused with the file and line; the secret itself is shown masked. Safetensors weights are
  scanned in their header (tensor names and metadata), other files in full: text-like files (no NUL byte in
  their first 8 KB and valid UTF-8) by line, anything else by byte offset. A local path that survived
  scrubbing is refused the same way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import PublishInputError

logger = logging.getLogger(__name__)

# Keys whose string value is a secret: scrubbed to null wherever they appear in a JSON/YAML file.
SECRET_KEYS = frozenset(
    {"hub_token", "push_to_hub_token", "token", "hf_token", "api_key", "wandb_api_key", "use_auth_token"}
)
# Vocabulary files: their strings are tokens of the model's vocabulary, never edited (only scanned).
VOCAB_FILES = frozenset({"tokenizer.json", "vocab.json", "merges.txt", "text_tokenizer.json"})
SCRUBBED_SUFFIXES = (".json", ".yaml", ".yml")
# (what it looks like, pattern). Each requires a long run of key characters after a fixed prefix, so that
# identifiers such as `hf_hub_download` or `sk-learn` do not match.
SECRET_PATTERNS: tuple[tuple[str, re.Pattern[bytes]], ...] = tuple(
    (label, re.compile(pattern.encode()))
    for label, pattern in (
        ("Hugging Face token", r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}"),
        ("Hugging Face organization token", r"(?<![A-Za-z0-9])api_org_[A-Za-z0-9]{30,}"),
        ("GitHub token", r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{50,})"),
        ("OpenAI-style API key", r"(?<![A-Za-z0-9])sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{32,}"),
        ("AWS access key id", r"(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])"),
        ("Slack token", r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9\-]{10,}"),
        ("Google API key", r"(?<![A-Za-z0-9])AIza[0-9A-Za-z_\-]{35}"),
        ("private key", r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
    )
)
TEXT_SNIFF_BYTES = 8192
MIN_TOKEN_LENGTH = 8  # shorter "tokens" would match everywhere; real Hub tokens are over 30 characters


# ------------------------------------------------------------------------------------------ local paths
def looks_local(value: str, roots: tuple[str, ...] = ()) -> bool:
    """A string that names a file on this machine: an absolute POSIX path with at least two parts, a Windows
    drive path, `~/...`, or anything under one of `roots`."""
    if not value or "://" in value or any(c.isspace() for c in value):
        return False
    if any(value == r or value.startswith(r.rstrip("/\\") + sep) for r in roots for sep in ("/", "\\")):
        return True
    if value.startswith("~/") or re.match(r"^[A-Za-z]:[\\/]", value):
        return True
    return value.startswith("/") and value.count("/") >= 2 and len(value) > 3


def local_basename(value: str) -> str:
    name = re.split(r"[\\/]", value.rstrip("/\\"))[-1]
    return name or "."


def local_roots(*paths: Path | None) -> tuple[str, ...]:
    """Specific local prefixes that must not appear in anything published: the given folders (absolute and
    resolved) and their parents, the working directory and the home folder (when at least two levels deep)."""
    roots = set()
    for p in paths:
        if p is None:
            continue
        for q in (Path(os.path.abspath(p)), Path(os.path.realpath(p))):
            roots.add(str(q))
            roots.update(str(parent) for parent in q.parents if len(parent.parts) >= 3)  # "/a/b" and deeper
    for p in (os.getcwd(), os.path.expanduser("~"), tempfile.gettempdir()):
        for q in (os.path.abspath(p), os.path.realpath(p)):
            if len([s for s in re.split(r"[\\/]", q) if s]) >= 2:
                roots.add(q)
    return tuple(sorted((r for r in roots if r not in ("/", "")), key=len, reverse=True))


def folder_roots(*paths: Path | None) -> tuple[str, ...]:
    """Only the given folders themselves (absolute and resolved): what a vocabulary file is checked for."""
    found = [p for p in paths if p is not None]
    return tuple({os.path.abspath(p) for p in found} | {os.path.realpath(p) for p in found})


def scrub(obj: Any, roots: tuple[str, ...], key_values: dict[str, Any]) -> tuple[Any, bool]:
    """Replace local paths (by their base name) and secrets in a JSON/YAML value; `key_values` forces the
    value of some keys (e.g. `_name_or_path` -> the repo id). Returns (new value, changed)."""
    if isinstance(obj, dict):
        changed, out = False, {}
        for k, v in obj.items():
            if k in key_values:
                new, c = key_values[k], v != key_values[k]
            elif isinstance(k, str) and k.lower() in SECRET_KEYS and isinstance(v, str) and v:
                new, c = None, True
            else:
                new, c = scrub(v, roots, key_values)
            if isinstance(k, str):  # keys can be paths too (a dataset mixer: {path: weight})
                k2, ck = scrub(k, roots, {})
                k, c = k2, c or ck
            out[k] = new
            changed |= c
        return out, changed
    if isinstance(obj, list):
        pairs = [scrub(v, roots, key_values) for v in obj]
        return [p[0] for p in pairs], any(p[1] for p in pairs)
    if isinstance(obj, str):
        new = obj  # a secret-shaped string outside the secret keys is refused by the scan, not edited
        if looks_local(new, roots):
            new = local_basename(new)
        else:
            for r in roots:
                new = new.replace(r, "<local>")
        return new, new != obj
    return obj, False


# ------------------------------------------------------------------------------------------ scanning
def mask(secret: str) -> str:
    """A secret as it may be shown: its first four characters and its length."""
    return f"{secret[:4]}... ({len(secret)} characters)"


def is_text_like(data: bytes) -> bool:
    """No NUL byte in the first 8 KB and valid UTF-8 throughout."""
    if b"\x00" in data[:TEXT_SNIFF_BYTES]:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _where(data: bytes, offset: int, text: bool) -> str:
    if not text:
        return f"byte {offset}"
    line = data.count(b"\n", 0, offset) + 1
    return f"line {line}"


def _first_problem(raw: bytes, roots: tuple[str, ...], token: str | None) -> tuple[int, str, str] | None:
    """(offset, what it is, the offending string) of the first secret or local path in `raw`, or None."""
    if token and len(token) >= MIN_TOKEN_LENGTH:
        pos = raw.find(token.encode("utf-8"))
        if pos >= 0:
            return pos, "the Hub token used for this push", token
    for label, pattern in SECRET_PATTERNS:
        m = pattern.search(raw)
        if m:
            return m.start(), f"what looks like a {label}", m.group(0).decode("utf-8", errors="replace")
    for r in roots:
        pos = raw.find(r.encode("utf-8"))
        if pos >= 0:
            return pos, "local path", r
    return None


def check_clean(data: bytes | str, what: str, roots: tuple[str, ...], token: str | None, text: bool | None = None,
                original: bytes | None = None) -> None:
    """Refuse (`PublishInputError`) content that holds the push token, a secret-shaped string or one of the
    local `roots`, naming `what` and the line (text) or byte offset (binary). Secrets are shown masked. When
    `data` is the scrubbed form of `original`, the line is counted in `original` (the file as the user sees it)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    text = is_text_like(raw) if text is None else text
    problem = _first_problem(raw, roots, token)
    if problem is None:
        return
    pos, kind, found = problem
    if original is not None and found.encode("utf-8") in original:
        raw, pos = original, original.find(found.encode("utf-8"))
    where = f"{what}, {_where(raw, pos, text)}"
    if kind == "local path":
        raise PublishInputError(
            f"{where}: names a local path that scrubbing could not remove: edit it, or leave the file out, before publishing."
        )
    raise PublishInputError(f"{where}: holds {kind} ({mask(found)}): remove it, or leave the file out, before publishing.")


# ------------------------------------------------------------------------------------------ uploads
@dataclass
class Upload:
    """One file of a push: its path in the repo and its content (bytes, or a local file for weights)."""

    path_in_repo: str
    content: bytes | str
    scrubbed: bool = False
    size: int = 0


def _scrub_text(rel: str, text: str, roots: tuple[str, ...], key_values: dict[str, Any]) -> str:
    suffix = os.path.splitext(rel)[1].lower()
    data, fmt = None, None
    if suffix == ".json":
        try:
            data, fmt = json.loads(text), "json"
        except ValueError:
            pass
    elif suffix in (".yaml", ".yml"):
        try:
            data, fmt = yaml.safe_load(text), "yaml"
        except yaml.YAMLError:
            pass
    if fmt is None:
        for r in roots:
            text = text.replace(r, "<local>")
        return text
    scrubbed, changed = scrub(data, roots, key_values)
    if not changed:
        return text
    if fmt == "json":
        return json.dumps(scrubbed, indent=2, ensure_ascii=False) + "\n"
    return yaml.safe_dump(scrubbed, sort_keys=False, allow_unicode=True)


def prepare_uploads(
    folder: Path,
    files: list[str],
    weights: set[str],
    *,
    repo_id: str,
    base_model: str | None,
    token: str | None,
    roots: tuple[str, ...],
    vocab_roots: tuple[str, ...],
) -> list[Upload]:
    """The content of every file to upload, scrubbed and scanned. `weights` are the safetensors files whose
    header alone is scanned (they go up from disk); every other file is read, scrubbed if it is a config, scanned
    in full and uploaded from memory (the bytes that were scanned). Raises `PublishInputError`."""
    from .folders import read_safetensors_header

    key_values = {"_name_or_path": repo_id, "name_or_path": repo_id, "base_model_name_or_path": base_model}
    uploads: list[Upload] = []
    for rel in files:
        src = Path(os.path.realpath(folder / rel))  # inside the folder: checked when the files were listed
        if rel in weights:
            header = read_safetensors_header(src)
            check_clean(json.dumps(header), f"{rel} (safetensors header)", roots, token, text=True)
            uploads.append(Upload(rel, str(src), size=src.stat().st_size))
            continue
        raw = src.read_bytes()
        name = os.path.basename(rel)
        if not is_text_like(raw):
            check_clean(raw, rel, roots, token, text=False)
            uploads.append(Upload(rel, raw, size=len(raw)))
            continue
        text = raw.decode("utf-8")
        new_text = text if name in VOCAB_FILES else _scrub_text(rel, text, roots, key_values)
        check_clean(new_text, rel, vocab_roots if name in VOCAB_FILES else roots, token, text=True, original=raw)
        if new_text != text:
            logger.info("Scrubbed local paths / secrets from %s", rel)
            raw = new_text.encode("utf-8")
        uploads.append(Upload(rel, raw, scrubbed=new_text != text, size=len(raw)))
    return uploads


__all__ = [
    "SECRET_KEYS",
    "SECRET_PATTERNS",
    "Upload",
    "check_clean",
    "folder_roots",
    "is_text_like",
    "local_basename",
    "local_roots",
    "looks_local",
    "mask",
    "prepare_uploads",
    "scrub",
]
