"""`LuminaMGPTPipeline.from_pretrained(<hub id>)` against a loopback stand-in for the Hub's download
endpoints (no network): the component folders named in model_index.json are fetched and the pipeline loads."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from lumina_hf import LuminaMGPTPipeline
from lumina_hf.testing_utils import build_tiny_model, build_tiny_processor

SHA = "a" * 40


def serve_folder(root: Path, repo_id: str):
    files = sorted(str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*") if p.is_file())
    requested = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _file(self, head: bool):
            prefix = f"/{repo_id}/resolve/"
            rest = self.path.split("?")[0][len(prefix) :]
            _rev, _, name = rest.partition("/")
            path = root / name
            if name not in files:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.end_headers()
                return
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("X-Repo-Commit", SHA)
            self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                requested.append(name)
                self.wfile.write(data)

        def do_HEAD(self):
            self._file(head=True)

        def do_GET(self):
            if self.path.startswith(f"/api/models/{repo_id}/tree/"):
                entries = []
                for f in files:
                    data = (root / f).read_bytes()
                    entries.append({"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()})
                body = json.dumps(entries).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path.startswith(f"/api/models/{repo_id}"):
                body = json.dumps({"id": repo_id, "sha": SHA, "siblings": [{"rfilename": f} for f in files]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self._file(head=False)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    return server, requested


def test_pipeline_from_hub_id(tmp_path):
    repo = tmp_path / "repo"
    pipe = LuminaMGPTPipeline(model=build_tiny_model(), processor=build_tiny_processor(64))
    pipe.save_pretrained(repo)
    (repo / "unrelated").mkdir()
    (repo / "unrelated" / "big.bin").write_bytes(b"x" * 1000)  # not named in model_index.json: not fetched
    server, requested = serve_folder(repo, "org/tiny-lumina")
    try:
        script = textwrap.dedent(
            """
            import sys, torch
            from lumina_hf import LuminaMGPTPipeline
            pipe = LuminaMGPTPipeline.from_pretrained("org/tiny-lumina")
            pipe.set_progress_bar_config(disable=True)
            out = pipe("a red circle", height=64, width=64, generator=torch.Generator().manual_seed(3), output_type="pt")
            torch.save(out.images, sys.argv[1])
            """
        )
        out_file = tmp_path / "images.pt"
        env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", HF_HOME=str(tmp_path / "hf"),
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
        env.pop("HF_HUB_OFFLINE", None)
        proc = subprocess.run([sys.executable, "-c", script, str(out_file)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        server.shutdown()
    assert "model_index.json" in requested
    assert any(r.startswith("model/") for r in requested) and any(r.startswith("processor/") for r in requested)
    assert not any(r.startswith("unrelated/") for r in requested)
    pipe.set_progress_bar_config(disable=True)
    local = pipe("a red circle", height=64, width=64, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert torch.equal(torch.load(out_file, weights_only=True), local)
