"""A local, in-memory fake of the Hub endpoints that hf_cellmae's sharing flow uses.

The Hub cannot be reached from test machines and there is no self-hostable Hub that accepts
uploads, so this small HTTP server answers exactly what huggingface_hub and transformers call for
"create a repo, commit a folder, validate a card, download the files back":

- ``POST /api/repos/create``                          create a model repo (409 if it exists)
- ``GET  /api/models/{repo}[/revision/{rev}]``        repo info (sha, private, siblings)
- ``POST /api/models/{repo}/branch/{branch}``         create a branch from main
- ``POST /api/models/{repo}/preupload/{rev}``         every file is ``uploadMode: "regular"``
- ``POST /api/models/{repo}/commit/{rev}``            ndjson commit (base64 files, deletions)
- ``POST /api/validate-yaml``                         parse the card's YAML header, check licence and model-index
- ``GET  /api/models/{repo}/tree/{rev}``             file listing (used by ``delete_patterns``)
- ``HEAD/GET /{repo}/resolve/{rev}/{path}``           file download with ``X-Repo-Commit`` / ``ETag``

Write endpoints require a bearer token (like the Hub); every token seen is kept in
``FakeHub.tokens_seen`` so tests can check where it went. It listens on 127.0.0.1 only.

    with FakeHub() as hub:            # starts on a free port
        env = {"HF_ENDPOINT": hub.url, ...}
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

from tests.helpers.data_fixtures import SHARED_DATA

# Licence identifiers the fake accepts in card metadata (a subset of the Hub's list).
KNOWN_LICENSES = {"apache-2.0", "mit", "bsd-3-clause", "cc-by-4.0", "cc-by-nc-4.0", "cc0-1.0", "other", "unknown"}


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a file, which the Hub uses as the ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class FakeRepo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    messages: dict[str, str] = field(default_factory=dict)  # sha -> commit title

    def new_commit(self, branch: str, files: dict[str, bytes], message: str) -> str:
        sha = hashlib.sha1(
            f"{len(self.commits)}:{branch}:{message}".encode() + repr(sorted(files)).encode()
        ).hexdigest()
        self.commits[sha], self.messages[sha], self.branches[branch] = files, message, sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class FakeHub:
    """The server plus its state; use as a context manager or call ``start()`` / ``stop()``."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.tokens_seen: set[str] = set()
        self.requests: list[str] = []  # "METHOD /path" of every request, for debugging tests
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision (test helper)."""
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]


class _Handler(BaseHTTPRequestHandler):
    state: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # -- helpers -------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _json_list(self, items: list) -> None:
        self._send(200, json.dumps(items).encode())

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        if token:
            self.state.tokens_seen.add(token)
        return token

    def _repo(self, repo_id: str, need_write: bool = False) -> FakeRepo | None:
        repo = self.state.repos.get(repo_id)
        token = self._token()
        if repo is None or (repo.private and token is None):
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        if need_write and token is None:
            self._error(401, "", "Invalid credentials in Authorization header")
            return None
        return repo

    @staticmethod
    def _split_api(path: str) -> tuple[str, str, str]:
        """'/api/models/org/name/commit/main' -> ('org/name', 'commit', 'main')."""
        parts = path[len("/api/models/") :].split("/")
        repo_id, action, rest = "/".join(parts[:2]), (parts[2] if len(parts) > 2 else ""), "/".join(parts[3:])
        return repo_id, action, unquote(rest)

    # -- verbs ---------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        self.state.requests.append(f"{self.command} {path}")
        with self.state.lock:
            if path.startswith("/api/models/"):
                repo_id, action, revision = self._split_api(path)
                if action == "tree":
                    return self._tree(repo_id, revision)
                return self._repo_info(repo_id, action, revision)
            if "/resolve/" in path:
                return self._resolve(path)
        self._error(404, "", f"fake hub does not implement {self.command} {path}")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        self.state.requests.append(f"POST {path}")
        body = self._body()
        with self.state.lock:
            if path == "/api/repos/create":
                return self._create_repo(json.loads(body))
            if path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body))
            if path.startswith("/api/models/"):
                repo_id, action, revision = self._split_api(path)
                if action == "preupload":
                    return self._preupload(repo_id, revision, json.loads(body))
                if action == "commit":
                    return self._commit(repo_id, revision, body)
                if action == "branch":
                    return self._create_branch(repo_id, revision)
        self._error(404, "", f"fake hub does not implement POST {path}")

    # -- endpoints -----------------------------------------------------------------------------
    def _create_repo(self, payload: dict) -> None:
        if self._token() is None:
            return self._error(401, "", "Invalid credentials in Authorization header")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.state.repos:
            return self._json(
                409, {"error": "You already created this model repo", "url": f"{self.state.url}/{repo_id}"}
            )
        private = payload.get("private", payload.get("visibility") == "private")
        repo = self.state.repos[repo_id] = FakeRepo(private=bool(private))
        repo.new_commit(
            "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial commit"
        )
        self._json(200, {"url": f"{self.state.url}/{repo_id}", "name": repo_id})

    def _repo_info(self, repo_id: str, action: str, revision: str) -> None:
        if (repo := self._repo(repo_id)) is None:
            return
        sha = repo.resolve(revision if action == "revision" else "main")
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        siblings = [{"rfilename": name} for name in sorted(repo.commits[sha])]
        self._json(
            200,
            {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "siblings": siblings, "tags": []},
        )

    def _tree(self, repo_id: str, revision: str) -> None:
        if (repo := self._repo(repo_id)) is None:
            return
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = repo.commits[sha]
        self._json_list(
            [{"type": "file", "path": p, "size": len(c), "oid": git_blob_sha1(c)} for p, c in sorted(files.items())]
        )

    def _create_branch(self, repo_id: str, branch: str) -> None:
        if (repo := self._repo(repo_id, need_write=True)) is None:
            return
        if branch in repo.branches:
            return self._error(409, "", f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = repo.branches["main"]
        self._json(200, {})

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> None:
        if (repo := self._repo(repo_id, need_write=True)) is None:
            return
        existing = repo.commits.get(repo.resolve(revision) or "", {})
        files = [
            {
                "path": item["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha1(existing[item["path"]]) if item["path"] in existing else None,
            }
            for item in payload["files"]
        ]
        self._json(200, {"files": files, "commitOid": repo.resolve(revision)})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        if (repo := self._repo(repo_id, need_write=True)) is None:
            return
        parent = repo.resolve(revision)
        if parent is None or revision not in repo.branches:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files, title = dict(repo.commits[parent]), ""
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                title = value.get("summary", "")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:  # lfsFile never happens: preupload answers "regular" for every file
                return self._error(400, "", f"fake hub does not support commit operation {key!r}")
        sha = repo.new_commit(revision, files, title)
        self._json(200, {"commitUrl": f"{self.state.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True})

    def _validate_yaml(self, payload: dict) -> None:
        content = payload["content"]
        errors = []
        if not content.startswith("---"):
            return self._json(200, {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        try:
            metadata = yaml.safe_load(content.split("---")[1])
        except yaml.YAMLError as err:
            return self._json(400, {"errors": [{"message": f"YAML does not parse: {err}"}]})
        if not isinstance(metadata, dict):
            errors.append("metadata must be a mapping")
        else:
            if "license" in metadata and metadata["license"] not in KNOWN_LICENSES:
                errors.append(f'"license" must be one of {sorted(KNOWN_LICENSES)}, got {metadata.get("license")!r}')
            if metadata.get("license") == "other" and not metadata.get("license_name"):
                errors.append('"license_name" is required when "license" is "other"')
            for entry in metadata.get("model-index", []) or []:
                for result in entry.get("results", []):
                    for metric in result.get("metrics", []):
                        if not isinstance(metric.get("value"), (int, float)):
                            errors.append(f"model-index metric value must be a number, got {metric.get('value')!r}")
        if errors:
            return self._json(400, {"errors": [{"message": e} for e in errors]})
        self._json(200, {"warnings": []})

    def _resolve(self, path: str) -> None:
        repo_part, rest = path.lstrip("/").split("/resolve/", 1)
        if (repo := self._repo(unquote(repo_part))) is None:
            return
        revision, _, filename = rest.partition("/")
        sha = repo.resolve(unquote(revision))
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}")
        content = repo.commits[sha].get(unquote(filename))
        if content is None:
            return self._error(404, "EntryNotFound", f"{unquote(filename)} does not exist at {sha}")
        etag = f'"{git_blob_sha1(content)}"'
        self._send(200, content, {"X-Repo-Commit": sha, "ETag": etag}, "application/octet-stream")


# -- a trained tiny model folder, as training and evaluation write it (for the hub tests) ------------

CHANNELS = ["AGP", "DNA", "ER", "Mito", "RNA"]  # the JUMP crops in ../shared/data, w1..w5


def real_image_or_none():
    """One real 5-channel uint16 JUMP Cell Painting site (5, 384, 384), or None when ../shared/data is absent."""
    folder = SHARED_DATA / "cellpainting_jump_rab30" / "BR00123947"
    files = [folder / f"G01_s1_w{c}.png" for c in range(1, 6)]
    if not all(f.is_file() for f in files):
        return None
    import numpy as np
    from PIL import Image

    return np.stack([np.asarray(Image.open(f)) for f in files])


def make_trained_model_folder(folder: Path, steps: int = 2, seed: int = 0) -> Path:
    """Pre-train the "tiny" preset for a few steps on random uint16 images and save a complete model folder.

    Writes what the contracts say a trained folder holds: ``save_pretrained`` output (weights, config,
    model code), the processor, ``training_args.json``, ``trainer_state.json`` (with this run's real
    losses), ``eval_results.json`` and its recall plot. Evaluation numbers are made up but distinct,
    so a test can trace each one to the card.
    """
    import time

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from hf_cellmae import CellMAEConfig, CellMAEForPreTraining
    from hf_cellmae.image_processing_cellmae import CellMAEImageProcessor

    torch.manual_seed(seed)
    config = CellMAEConfig.from_preset("tiny", channel_names=CHANNELS)
    model = CellMAEForPreTraining(config)
    processor = CellMAEImageProcessor(image_size=config.image_size, channel_names=CHANNELS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    start, history, batch_size = time.perf_counter(), [], 1
    for step in range(1, steps + 1):
        images = rng.integers(0, 65535, size=(batch_size, len(CHANNELS), 80, 80), dtype=np.uint16)
        output = model(pixel_values=processor(list(images), return_tensors="pt")["pixel_values"])
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({"step": step, "loss": output.loss.item(), "mse_loss": output.mse_loss.item()})
    runtime = time.perf_counter() - start
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "training_args.json").write_text(
        json.dumps(
            {
                "preset": "tiny",
                "learning_rate": 1e-3,
                "per_device_batch_size": batch_size,
                "max_steps": steps,
                "optimizer": "adamw",
                "data_path": "random uint16 images",
                "seed": seed,
                "hub_token": None,
            },
            indent=2,
        )
    )
    (folder / "trainer_state.json").write_text(
        json.dumps(
            {
                "global_step": steps,
                "images_seen": steps * batch_size,
                "train_runtime_s": runtime,
                "hardware": {"device": "cpu", "num_processes": 1, "mixed_precision": "no"},
                "final_losses": {
                    "loss": output.loss.item(),
                    "mse_loss": output.mse_loss.item(),
                    "fourier_loss": output.fourier_loss.item(),
                },
                "dataset": {
                    "name": "random-uint16",
                    "path": "(generated in memory)",
                    "num_fields": steps * batch_size,
                    "channels": CHANNELS,
                    "dtype": "uint16",
                },
                "log_history": history,
            },
            indent=2,
        )
    )
    sources = {
        "CORUM": {"recall_0.05_0.95": 0.3171, "recall_0.10_0.90": 0.4243, "null_size": 5000, "query_size": 812},
        "StringDB": {"recall_0.05_0.95": 0.1357, "recall_0.10_0.90": 0.2468, "null_size": 5000, "query_size": 1931},
    }
    (folder / "plots").mkdir()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.bar(list(sources), [v["recall_0.05_0.95"] for v in sources.values()])
    fig.savefig(folder / "plots" / "recall.png")
    plt.close(fig)
    (folder / "eval_results.json").write_text(
        json.dumps(
            {
                "dataset": "synthetic-plate",
                "alignment": "tvn",
                "aggregation": "mean",
                "n_perturbations": 48,
                "embedding_dim": config.hidden_size,
                "sources": sources,
                "chance": {"recall_0.05_0.95": 0.10, "recall_0.10_0.90": 0.20},
                "baselines": {
                    "random_init": {
                        "sources": {
                            "CORUM": {
                                "recall_0.05_0.95": 0.1111,
                                "recall_0.10_0.90": 0.2121,
                                "null_size": 5000,
                                "query_size": 812,
                            },
                            "StringDB": {
                                "recall_0.05_0.95": 0.0999,
                                "recall_0.10_0.90": 0.1989,
                                "null_size": 5000,
                                "query_size": 1931,
                            },
                        }
                    }
                },
                "plots": {"recall": "plots/recall.png"},
            },
            indent=2,
        )
    )
    return folder


if __name__ == "__main__":  # manual use: python tests/helpers/fake_hub.py
    with FakeHub() as hub:
        print(f"fake hub at {hub.url} (Ctrl-C to stop)", flush=True)
        threading.Event().wait()
