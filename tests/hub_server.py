"""A loopback Hugging Face Hub for tests: the endpoints huggingface_hub 2.4 uses to push and download a model repo.

Implements, for model repos, exactly what `create_repo`, `create_branch`, `upload_folder` / `create_commit`
(and so `PreTrainedModel.push_to_hub`), `repo_info`, `list_repo_tree`, `hf_hub_download` and `snapshot_download`
send. Files are stored in memory, every commit is kept (so a branch and `main` can differ), and every request is
logged so tests can check what reached the server (visibility, revision, the bearer token).

Preupload always answers `uploadMode: "regular"`, so file contents arrive inline (base64) in the NDJSON commit and
no LFS/Xet storage is needed. Write endpoints require an `Authorization: Bearer ...` header; private repos are only
visible with one. Bound to 127.0.0.1 on a free port.

    with LoopbackHub() as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test"}  # or HfApi(endpoint=hub.url, token=...)
"""

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

NAMESPACE = "test-user"  # the "logged-in user" that owns repos created without an organization
_REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_oid(content: bytes) -> str:
    """The git blob sha1 the Hub reports as a regular file's `oid` / ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> {path: content}
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit oid
    messages: dict[str, str] = field(default_factory=dict)  # commit oid -> summary

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None

    def files(self, revision: str = "main") -> dict[str, bytes]:
        """The files at a branch or commit (KeyError if it does not exist)."""
        return self.commits[self.resolve(revision)]


@dataclass
class Request:
    method: str
    path: str
    query: dict
    authorization: str | None
    json: object = None


class LoopbackHub:
    """Start with `start()` (or as a context manager); `url` is the endpoint; `repos` and `requests` are the state."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> "LoopbackHub":
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- state helpers -------------------------------------------------------------------------------------------
    def _commit(self, repo: Repo, branch: str, files: dict[str, bytes], summary: str) -> str:
        seed = f"{repo.repo_id}\0{branch}\0{len(repo.commits)}\0{time.time_ns()}\0{summary}".encode()
        oid = hashlib.sha1(seed).hexdigest()
        repo.commits[oid] = files
        repo.messages[oid] = summary
        repo.branches[branch] = oid
        return oid

    def create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private)
        self._commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "init")
        self.repos[repo_id] = repo
        return repo


class _Handler(BaseHTTPRequestHandler):
    state: LoopbackHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output quiet
        pass

    # -- plumbing --------------------------------------------------------------------------------------------------
    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None):
        self._reply(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None):
        headers = dict(headers or {})
        if code:
            headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message
        self._json(status, {"error": message}, headers)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authorized(self) -> bool:
        return (self.headers.get("Authorization") or "").startswith("Bearer ")

    def _dispatch(self):
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        body = self._body() if self.command == "POST" else b""
        parsed = None
        if body and "ndjson" not in (self.headers.get("Content-Type") or ""):
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        with self.state._lock:
            auth = self.headers.get("Authorization")
            self.state.requests.append(Request(self.command, unquote(path), query, auth, parsed))
            for method, pattern, handler in ROUTES:
                match = re.fullmatch(pattern, path)  # on the quoted path: a quoted revision may contain "/"
                if match and method == self.command:
                    groups = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    return handler(self, body=body, parsed=parsed, query=query, **groups)
            if self.command == "HEAD" or self.command == "GET":
                return self._error(404, None, f"no route for {self.command} {path}")
            return self._error(405, None, f"no route for {self.command} {path}")

    do_GET = do_HEAD = do_POST = _dispatch

    def _repo_or_error(self, repo_id: str) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(404 if repo is None else 401, "RepoNotFound", "Repository not found")
            return None
        return repo

    def _revision_or_error(self, repo: Repo, revision: str) -> str | None:
        oid = repo.resolve(revision)
        if oid is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return oid

    # -- write side ------------------------------------------------------------------------------------------------
    def create_repo(self, parsed, **_):
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        if (parsed or {}).get("type", "model") != "model":
            return self._error(400, None, "only model repos are served here")
        repo_id = f"{parsed.get('organization') or NAMESPACE}/{parsed['name']}"
        if repo_id in self.state.repos:
            return self._error(409, None, "You already created this model repo")
        self.state.create_repo(repo_id, private=parsed.get("visibility") == "private")
        self._json(200, {"url": f"{self.state.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def create_branch(self, repo, branch, parsed, **_):
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        repo = self._repo_or_error(repo)
        if repo is None:
            return
        if branch in repo.branches:
            return self._error(409, None, f"Reference refs/heads/{branch} already exists")
        start = self._revision_or_error(repo, (parsed or {}).get("startingPoint") or "main")
        if start is not None:
            repo.branches[branch] = start
            self._json(200, {})

    def preupload(self, repo, revision, parsed, **_):
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        repo = self._repo_or_error(repo)
        if repo is None or self._revision_or_error(repo, revision) is None:
            return
        current = repo.files(revision)
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_oid(current[f["path"]]) if f["path"] in current else None,
            }
            for f in parsed["files"]
        ]
        self._json(200, {"files": files, "commitOid": repo.resolve(revision)})

    def commit(self, repo, revision, body, query, **_):
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        repo = self._repo_or_error(repo)
        if repo is None or self._revision_or_error(repo, revision) is None:
            return
        if revision not in repo.branches:
            return self._error(400, None, f"can only commit to a branch, not {revision}")
        files = dict(repo.files(revision))
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, None, "commit payload must start with a header line")
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, None, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:  # lfsFile / copies: never requested, since preupload answers "regular"
                return self._error(400, None, f"unsupported commit operation {key!r}")
        oid = self.state._commit(repo, revision, files, lines[0]["value"].get("summary", ""))
        self.state.requests[-1].json = {
            "header": lines[0]["value"],
            "paths": [line["value"]["path"] for line in lines[1:]],
        }
        self._json(
            200,
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self.state.url}/{repo.repo_id}/commit/{oid}",
                "pullRequestUrl": None,
            },
        )

    def validate_yaml(self, parsed, **_):
        content = (parsed or {}).get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        if match is None:
            return self._json(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as error:
            return self._json(400, {"errors": [{"message": f"invalid YAML: {error}"}]})
        if not isinstance(metadata, dict):
            return self._json(400, {"errors": [{"message": "YAML metadata must be a mapping"}]})
        self._json(200, {"errors": [], "warnings": []})

    # -- read side -------------------------------------------------------------------------------------------------
    def whoami(self, **_):
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        self._json(200, {"type": "user", "name": NAMESPACE, "auth": {"accessToken": {"role": "write"}}})

    def model_info(self, repo, revision="main", **_):
        repo = self._repo_or_error(repo)
        if repo is None:
            return
        oid = self._revision_or_error(repo, revision)
        if oid is None:
            return
        files = repo.commits[oid]
        self._json(
            200,
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": oid,
                "private": repo.private,
                "siblings": [{"rfilename": path} for path in sorted(files)],
                "tags": [],
                "downloads": 0,
                "likes": 0,
            },
        )

    def tree(self, repo, revision, subpath="", query=None, **_):
        repo = self._repo_or_error(repo)
        if repo is None:
            return
        oid = self._revision_or_error(repo, revision)
        if oid is None:
            return
        recursive = (query or {}).get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = subpath.strip("/") + "/" if subpath.strip("/") else ""
        entries, folders = [], set()
        for path, content in sorted(repo.commits[oid].items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append(
                        {"type": "directory", "path": folder, "oid": git_blob_oid(folder.encode()), "size": 0}
                    )
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "path": path, "size": len(content), "oid": git_blob_oid(content)})
        self._json(200, entries)

    def resolve(self, repo, revision, filename, **_):
        repo = self._repo_or_error(repo)
        if repo is None:
            return
        oid = self._revision_or_error(repo, revision)
        if oid is None:
            return
        files = repo.commits[oid]
        if filename not in files:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", {"X-Repo-Commit": oid})
        content = files[filename]
        headers = {"X-Repo-Commit": oid, "ETag": f'"{git_blob_oid(content)}"', "Accept-Ranges": "none"}
        self._reply(200, content, headers, content_type="application/octet-stream")


ROUTES = [
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("GET", r"/api/whoami-v2", _Handler.whoami),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", _Handler.create_branch),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", _Handler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", _Handler.commit),
    ("GET", rf"/api/models/{_REPO}", _Handler.model_info),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<revision>[^/]+)", _Handler.model_info),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<revision>[^/]+)(?P<subpath>/.*)?", _Handler.tree),
    ("GET", rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<filename>.+)", _Handler.resolve),
    ("HEAD", rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<filename>.+)", _Handler.resolve),
]
