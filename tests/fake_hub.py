"""A minimal Hugging Face hub for tests: a real HTTP server on 127.0.0.1 that serves model repositories
from local folders, and records every request, so a test can assert what a download fetched.

It answers just what `huggingface_hub` (2.4) asks for in `snapshot_download`, `hf_hub_download` and
`model_info` (which diffusers' `DiffusionPipeline.download` uses):

- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{rev}`: the repo's info, with its commit
  `sha` and its files (`siblings`);
- `GET /api/models/{repo}/tree/{rev}?recursive=...`: every file with its size and ids, in one page;
- `HEAD` and `GET /{repo}/resolve/{rev}/{path}`: a file, with `X-Repo-Commit`, `ETag` and
  `Content-Length` (no redirect, no `X-Xet-*` header, so the client never takes the Xet path).

An unknown repo answers 404 with `X-Error-Code: RepoNotFound`, an unknown file 404 with `EntryNotFound`
and the commit, as the hub does; the client turns those into its usual errors. Every revision name
resolves to the folder's one commit.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # unquoted, without the query


@dataclass
class _Repo:
    folder: Path
    commit: str
    files: dict[str, Path]  # path in the repo -> file


def _commit_of(files: dict[str, Path]) -> str:
    """A 40-hex commit id that changes when any file's name, size or modification time does (reading no
    file: a repo may hold big dummy files)."""
    digest = hashlib.sha1()
    for name, file in sorted(files.items()):
        stat = file.stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _etag_of(name: str, commit: str) -> str:
    """A git-blob-like id (40 hex, so the client does not take it for an LFS sha256 to check the bytes
    against)."""
    return hashlib.sha1(f"{commit}\0{name}".encode()).hexdigest()


@dataclass
class FakeHub:
    """`add_repo` a folder under a hub id, point the client at `url` (`HF_ENDPOINT`), read `requests`."""

    repos: dict[str, _Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    def add_repo(self, repo_id: str, folder: Path) -> None:
        folder = Path(folder)
        files = {file.relative_to(folder).as_posix(): file for file in sorted(folder.rglob("*"))
                 if file.is_file() and ".cache" not in file.relative_to(folder).parts}
        self.repos[repo_id] = _Repo(folder, _commit_of(files), files)

    @property
    def url(self) -> str:
        assert self._server is not None, "start the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def downloaded(self, repo_id: str) -> list[str]:
        """The files of `repo_id` whose bytes were fetched (GET on resolve), in order."""
        prefix = f"/{repo_id}/resolve/"
        with self._lock:
            return [request.path[len(prefix):].split("/", 1)[1] for request in self.requests
                    if request.method == "GET" and request.path.startswith(prefix)]

    def forget_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def requested(self, repo_id: str) -> list[Request]:
        """Every request about `repo_id` (API and files)."""
        with self._lock:
            return [request for request in self.requests
                    if request.path.startswith((f"/{repo_id}/", f"/api/models/{repo_id}"))]

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub._answer(self, send_body=True)

            def do_HEAD(self):
                hub._answer(self, send_body=False)

            def log_message(self, *args):  # quiet: the requests are recorded instead
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- answering ------------------------------------------------------------------------------------

    def _answer(self, handler: BaseHTTPRequestHandler, send_body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        with self._lock:
            self.requests.append(Request(handler.command, path))
        if path.startswith("/api/models/"):
            self._answer_api(handler, path[len("/api/models/"):], send_body)
        elif "/resolve/" in path:
            repo_id, rest = path[1:].split("/resolve/", 1)
            revision, _, name = rest.partition("/")
            self._answer_file(handler, repo_id, name, send_body)
        else:
            self._send(handler, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, send_body)

    def _find_repo(self, handler, rest: str, send_body: bool) -> tuple[_Repo | None, str, str]:
        """(repo, what follows the repo id, repo id) for `owner/name/...`; answers 404 for an unknown repo."""
        owner, _, rest = rest.partition("/")
        name, _, tail = rest.partition("/")
        repo_id = f"{owner}/{name}"
        repo = self.repos.get(repo_id)
        if repo is None:
            self._send(handler, 404, json.dumps({"error": "Repository not found"}).encode(),
                       {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, send_body)
        return repo, tail, repo_id

    def _answer_api(self, handler, rest: str, send_body: bool) -> None:
        repo, tail, repo_id = self._find_repo(handler, rest, send_body)
        if repo is None:
            return
        if tail == "" or tail.startswith("revision/"):
            info = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False, "gated": False,
                    "disabled": False, "tags": [], "library_name": "diffusers",
                    "siblings": [{"rfilename": name, "size": file.stat().st_size} for name, file in repo.files.items()]}
            self._send(handler, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, send_body)
        elif tail.startswith("tree/"):
            tree = [{"type": "file", "path": name, "size": file.stat().st_size,
                     "oid": _etag_of(name, repo.commit)} for name, file in repo.files.items()]
            self._send(handler, 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, send_body)
        else:
            self._send(handler, 404, b"{}", {"X-Error-Code": "EntryNotFound"}, send_body)

    def _answer_file(self, handler, repo_id: str, name: str, send_body: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._send(handler, 404, b"{}", {"X-Error-Code": "RepoNotFound",
                                            "X-Error-Message": "Repository not found"}, send_body)
            return
        file = repo.files.get(name)
        if file is None:
            self._send(handler, 404, b"{}", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit,
                                            "X-Error-Message": "Entry not found"}, send_body)
            return
        body = file.read_bytes() if send_body else b""
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{_etag_of(name, repo.commit)}"',
                   "Content-Type": "application/octet-stream"}
        self._send(handler, 200, body, headers, send_body, length=file.stat().st_size)

    @staticmethod
    def _send(handler, status: int, body: bytes, headers: dict[str, str], send_body: bool,
              length: int | None = None) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        if send_body:
            handler.wfile.write(body)


def point_huggingface_hub_at(url: str, hf_home: Path, monkeypatch) -> None:
    """Make this process's `huggingface_hub` (already imported, so its settings are read) and every process
    it starts talk to the hub at `url` only, online, with an empty cache under `hf_home`.

    `huggingface_hub` reads `HF_ENDPOINT`, `HF_HUB_OFFLINE` and `HF_HOME` once, at import, into its
    `constants` (which its functions read at each call: the endpoint, its file URL template, the cache) and into the module-level `HfApi` behind
    `huggingface_hub.model_info` (which diffusers calls); those are set here, and the environment for
    child processes."""
    from huggingface_hub import constants, hf_api

    cache = Path(hf_home) / "hub"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hf_api.api, "endpoint", url)
