"""A loopback stand-in for the Hugging Face Hub's upload endpoints, for offline tests of publishing.

It answers what `huggingface_hub.HfApi` (2.4) calls for `create_repo`, `create_branch` and `create_commit`
with xet disabled (`huggingface_hub.constants.HF_HUB_DISABLE_XET = True`, or env `HF_HUB_DISABLE_XET=1`
before import), read from `hf_api.py`, `_commit_api.py` and `lfs.py`:

- ``POST /api/repos/create``                          -> `{"url": ...}` (409 when it exists)
- ``POST /api/validate-yaml``                         -> YAML of the card's front matter parsed, 400 if invalid
- ``POST /api/models/{repo}/branch/{branch}``          -> 200 (409 when it exists)
- ``POST /api/models/{repo}/preupload/{rev}``          -> `uploadMode` "lfs" for binaries / large files, else "regular"
- ``POST /{repo}.git/info/lfs/objects/batch``          -> a "basic" upload action per object not stored yet
- ``PUT  /lfs-upload/{oid}``                           -> stores the object after checking its sha256
- ``POST /api/models/{repo}/commit/{rev}``             -> applies the ndjson commit (files base64, LFS by oid)

State per repo: branches -> {path: bytes}; `create_pr=1` makes `refs/pr/N` from the base branch and answers a
`pullRequestUrl`. Every request is recorded (method, path, query, auth header ok or not, body) so tests can
check what was sent. Failures can be injected: `fail_commits={n: status}` answers the n-th commit (1-based)
with that status. Bounded: `with FakeHub() as hub:` stops the server on exit, and a watchdog stops it after
`lifetime` seconds whatever happens; request sockets time out after 10 s.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".png", ".jpg", ".jpeg", ".webp", ".ckpt", ".npz", ".zip")
LFS_MIN_SIZE = 10 * 1024 * 1024


@dataclass
class Request:
    method: str
    path: str
    query: dict
    auth_ok: bool
    body: bytes


class FakeHub:
    def __init__(self, token: str, fail_commits: dict[int, int] | None = None, lifetime: float = 120.0):
        self.token = token
        self.fail_commits = dict(fail_commits or {})
        self.lifetime = lifetime
        self.requests: list[Request] = []
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}, "commits": [...]}
        self.lfs: dict[str, bytes] = {}
        self.commit_count = 0
        self.pr_count = 0
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._watchdog: threading.Timer | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def log_message(self, *args):  # keep test output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                parts = urlsplit(self.path)
                body = self._body()
                auth = self.headers.get("Authorization", "")
                req = Request(self.command, parts.path, parse_qs(parts.query), auth == f"Bearer {hub.token}", body)
                with hub.lock:
                    hub.requests.append(req)
                try:
                    status, payload, headers = hub.route(req)
                except Exception as err:  # a bug in the stand-in must not hang the client
                    status, payload, headers = 500, {"error": f"fake hub error: {err!r}"}, {}
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._watchdog = threading.Timer(self.lifetime, self._server.shutdown)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        self._watchdog.cancel()
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ routing
    def route(self, req: Request):
        if not req.auth_ok and not req.path.startswith("/lfs-upload/"):  # presigned-style upload URL: no auth
            return 401, {"error": "Invalid credentials in Authorization header"}, {"X-Error-Code": "InvalidCredentials"}
        p = req.path
        if req.method == "POST" and p == "/api/repos/create":
            return self._create_repo(json.loads(req.body))
        if req.method == "POST" and p == "/api/validate-yaml":
            return self._validate_yaml(json.loads(req.body))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", p)
        if m and req.method == "POST":
            repo_id, action, rev = m.group(1), m.group(2), unquote(m.group(3))
            if repo_id not in self.repos:
                return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            return getattr(self, f"_{action}")(repo_id, rev, req)
        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", p)
        if m and req.method == "POST":
            return self._lfs_batch(m.group(1), json.loads(req.body))
        m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", p)
        if m and req.method == "PUT":
            if hashlib.sha256(req.body).hexdigest() != m.group(1):
                return 400, {"error": "sha256 mismatch"}, {}
            with self.lock:
                self.lfs[m.group(1)] = req.body
            return 200, {}, {}
        return 404, {"error": f"fake hub: no route for {req.method} {p}"}, {}

    def _create_repo(self, payload):
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        with self.lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo"}, {}
            self.repos[repo_id] = {"private": payload.get("visibility") == "private", "branches": {"main": {}}, "commits": []}
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}

    def _validate_yaml(self, payload):
        content = payload.get("content", "")
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else None
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": str(err)}]}, {}
        if not isinstance(meta, dict):
            return 400, {"errors": [{"message": "no YAML metadata"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _branch(self, repo_id, branch, req):
        branches = self.repos[repo_id]["branches"]
        if branch in branches:
            return 409, {"error": "Reference already exists"}, {}
        start = (json.loads(req.body or b"{}") or {}).get("startingPoint") or "main"
        branches[branch] = dict(branches.get(start, {}))
        return 200, {}, {}

    def _preupload(self, repo_id, rev, req):
        files = []
        for f in json.loads(req.body)["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or b"\x00" in sample
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": None})
        return 200, {"files": files, "commitOid": "0" * 40}, {}

    def _lfs_batch(self, repo_id, payload):
        objects = []
        for o in payload["objects"]:
            entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.lfs:
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}", "header": {}}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def _commit(self, repo_id, rev, req):
        with self.lock:
            self.commit_count += 1
            n = self.commit_count
        if n in self.fail_commits:
            return self.fail_commits[n], {"error": f"Internal Error - injected failure of commit {n}"}, {}
        repo = self.repos[repo_id]
        lines = [json.loads(line) for line in req.body.decode().splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        changes: dict[str, bytes] = {}
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.lfs:
                    return 422, {"error": f"LFS object {value['oid']} was never uploaded"}, {}
                changes[value["path"]] = self.lfs[value["oid"]]
            elif key != "header":
                return 400, {"error": f"fake hub: unsupported commit item {key}"}, {}
        branch, pr_url = rev, None
        if req.query.get("create_pr") == ["1"]:
            with self.lock:
                self.pr_count += 1
                num = self.pr_count
            branch = f"refs/pr/{num}"
            repo["branches"][branch] = dict(repo["branches"].get(rev, {}))
            pr_url = f"{self.url}/{repo_id}/discussions/{num}"
        if branch not in repo["branches"]:
            return 404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"}
        repo["branches"][branch].update(changes)
        oid = hashlib.sha1(req.body).hexdigest()
        repo["commits"].append({"branch": branch, "summary": header["summary"], "files": sorted(changes), "oid": oid})
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr_url}, {}

    # ------------------------------------------------------------------ test helpers
    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][branch]

    def write_repo(self, repo_id: str, dest, branch: str = "main") -> None:
        """Write the files of a branch into folder `dest` (to load them back)."""
        from pathlib import Path

        for path, data in self.files(repo_id, branch).items():
            target = Path(dest) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
