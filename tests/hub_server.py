"""A tiny stand-in for the Hugging Face Hub, for tests: real HTTP on 127.0.0.1, stdlib only.

Repos live on disk as ``<root>/<owner>/<name>/<revision>/<files>``; every revision directory is a
branch (or tag). A revision's commit id is a sha1 over its files, so it changes whenever the files
do, as huggingface_hub's cache (keyed by commit id) expects. Only the endpoints that
``hf_hub_download``, ``HfApi.create_repo``, ``HfApi.create_branch``, ``HfApi.repo_info`` and
``HfApi.upload_folder`` use are served:

* ``HEAD``/``GET /{repo}/resolve/{revision}/{file}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1),
  and for ``*.safetensors`` the ``X-Linked-Etag``/``X-Linked-Size`` of an LFS file;
* ``GET /api/models/{repo}[/revision/{revision}]``;
* ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{branch}``;
* ``POST /api/validate-yaml`` (upload_folder checks a README.md's metadata first): accepts anything;
* ``POST /api/models/{repo}/preupload/{revision}``: every file is ``"regular"``, so the commit
  carries contents inline (base64) and no LFS/Xet transfer is ever needed;
* ``POST /api/models/{repo}/commit/{revision}`` (ndjson): writes the files to the revision.

A repo listed in ``HubServer.private`` (repo id -> token) answers only requests carrying
``Authorization: Bearer <token>``; others get 401 ``RepoNotFound``, as from the real Hub.

Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) exactly
like the real Hub, which is what huggingface_hub turns into its exception types.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

# Files served as if stored with git LFS (X-Linked-* headers), as the Hub does for weights.
LFS_SUFFIXES = (".safetensors",)
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO = rf"(?P<repo>{_NAME}/{_NAME})"
_REV = r"(?P<rev>[^/]+)"
_ROUTES = {
    "resolve": re.compile(rf"^/{_REPO}/resolve/{_REV}/(?P<file>.+)$"),
    "info": re.compile(rf"^/api/models/{_REPO}(?:/revision/{_REV})?$"),
    "create": re.compile(r"^/api/repos/create$"),
    "validate_yaml": re.compile(r"^/api/validate-yaml$"),
    "branch": re.compile(rf"^/api/models/{_REPO}/branch/{_REV}$"),
    "preupload": re.compile(rf"^/api/models/{_REPO}/preupload/{_REV}$"),
    "commit": re.compile(rf"^/api/models/{_REPO}/commit/{_REV}$"),
}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which the Hub sends as a regular file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An HTTP error answer: status, Hub error code (or None), message and extra JSON fields."""

    def __init__(self, status: int, code: str | None, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class HubServer:
    """Serve a folder of repos over HTTP; use as a context manager or call start()/stop()."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # (method, path) of every request, so tests can check what the client did (or did not) ask.
        self.requests: list[tuple[str, str]] = []
        # Private repos: repo id -> the token that may read them.
        self.private: dict[str, str] = {}
        # Called with (method, path) after each answer is sent, e.g. to change a repo between requests.
        self.after_request: Callable[[str, str], None] | None = None
        # One request at a time: commits rewrite folders that concurrent downloads may be reading.
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The endpoint to put in ``HF_ENDPOINT``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ repo storage
    def revision_dir(self, repo_id: str, revision: str = "main") -> Path:
        """Folder holding the files of ``repo_id`` at branch ``revision`` (may not exist yet)."""
        return self.root / repo_id / revision

    def commit_id(self, repo_id: str, revision: str = "main") -> str:
        """The 40-hex commit id the server reports for a branch: a hash of its files."""
        digest = hashlib.sha1(repo_id.encode())
        folder = self.revision_dir(repo_id, revision)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
            digest.update(git_blob_sha1(path.read_bytes()).encode())
        return digest.hexdigest()

    def find_revision(self, repo_id: str, revision: str, authorization: str | None = None) -> Path:
        """Folder of ``revision`` (a branch name or a commit id), or a RepoNotFound/RevisionNotFound error.

        ``authorization``: the request's Authorization header, checked for private repos.
        """
        repo = self.root / repo_id
        if repo_id in self.private and authorization != f"Bearer {self.private[repo_id]}":
            raise HubError(401, "RepoNotFound", f"Repository {repo_id} not found")
        if not repo.is_dir():
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        if revision not in (".", "..") and (repo / revision).is_dir():
            return repo / revision
        for branch in repo.iterdir():
            if branch.is_dir() and self.commit_id(repo_id, branch.name) == revision:
                return branch
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the ``_<route>`` methods below; each returns a JSON-able answer."""

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean; HubServer.requests records the traffic

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        self.hub.requests.append((self.command, path))
        try:
            for name, pattern in _ROUTES.items():
                match = pattern.match(path)
                if match:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    with self.hub.lock:
                        answer = getattr(self, f"_{name}")(**args)
                    if answer is not None:
                        self._send(200, json.dumps(answer).encode(), {"Content-Type": "application/json"})
                    if self.hub.after_request is not None:
                        with self.hub.lock:
                            self.hub.after_request(self.command, path)
                    return
            raise HubError(404, None, f"no route for {self.command} {path}")
        except HubError as err:
            headers = {"X-Error-Message": err.message, "Content-Type": "application/json"}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, json.dumps({"error": err.message, **err.extra}).encode(), headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json_body(self) -> Any:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

    # ------------------------------------------------------------------ download
    def _resolve(self, repo: str, rev: str, file: str) -> None:
        if self.command not in ("GET", "HEAD"):
            raise HubError(405, None, "resolve is read-only")
        folder = self.hub.find_revision(repo, rev, self.headers.get("Authorization"))
        commit = self.hub.commit_id(repo, folder.name)
        path = folder / file
        if ".." in Path(file).parts or not path.is_file():
            # The real Hub names the commit even on a miss; huggingface_hub caches the absence by it.
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Error-Message", f"{file} does not exist on {rev}")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = path.read_bytes()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(data)}"'}
        headers["Content-Type"] = "application/octet-stream"
        if path.name.endswith(LFS_SUFFIXES):
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        self._send(200, data, headers)

    def _info(self, repo: str, rev: str = "main") -> dict[str, Any]:
        folder = self.hub.find_revision(repo, rev, self.headers.get("Authorization"))
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        return {
            "id": repo,
            "sha": self.hub.commit_id(repo, folder.name),
            "private": repo in self.hub.private,
            "siblings": [{"rfilename": f} for f in files],
        }

    # ------------------------------------------------------------------ upload
    def _create(self) -> dict[str, Any]:
        body = self._json_body()
        if body.get("type", "model") != "model" or not body.get("organization"):
            raise HubError(400, None, "this test server only hosts model repos named 'owner/name'")
        repo_id = f"{body['organization']}/{body['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if (self.hub.root / repo_id).exists():
            # create_repo(exist_ok=True) reads the url from this answer, as from a success.
            raise HubError(409, None, "You already created this model repo", url=url)
        self.hub.revision_dir(repo_id).mkdir(parents=True)
        return {"url": url}

    def _validate_yaml(self) -> dict[str, Any]:
        self._json_body()
        return {"errors": [], "warnings": []}

    def _branch(self, repo: str, rev: str) -> dict[str, Any]:
        source = self.hub.find_revision(repo, self._json_body().get("startingPoint", "main"))
        target = self.hub.revision_dir(repo, rev)
        if target.exists():
            raise HubError(409, None, f"Reference {rev} already exists")
        shutil.copytree(source, target)
        return {}

    def _preupload(self, repo: str, rev: str) -> dict[str, Any]:
        folder = self.hub.find_revision(repo, rev)
        answer = []
        for entry in self._json_body()["files"]:
            existing = folder / entry["path"]
            oid = git_blob_sha1(existing.read_bytes()) if existing.is_file() else None
            answer.append({"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return {"files": answer}

    def _commit(self, repo: str, rev: str) -> dict[str, Any]:
        folder = self.hub.find_revision(repo, rev)
        if len(rev) == 40 and folder.name != rev:
            raise HubError(400, None, "can only commit to a branch")
        body = self.rfile.read(int(self.headers["Content-Length"]))
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                continue
            target = folder / value["path"]
            if ".." in Path(value["path"]).parts:
                raise HubError(400, None, f"bad path {value['path']}")
            if key == "file":
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(value["content"]))
            elif key == "deletedFile":
                target.unlink()
            elif key == "deletedFolder":
                shutil.rmtree(target)
            else:  # lfsFile: never requested, since preupload answers "regular" for every file
                raise HubError(400, None, f"unsupported commit operation {key!r}")
        commit = self.hub.commit_id(repo, folder.name)
        return {"commitUrl": f"{self.hub.url}/{repo}/commit/{commit}", "commitOid": commit}
