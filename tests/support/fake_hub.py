"""A small in-process stand-in for the Hugging Face Hub, for tests.

The real Hub cannot be reached from CI, so tests point the *official* clients
(``huggingface_hub`` and ``datasets``) at this server through ``HF_ENDPOINT`` and
then inspect what arrived.  Only the standard library is used for the server
(``http.server.ThreadingHTTPServer`` in a daemon thread); ``yaml`` (a dependency
of ``huggingface_hub``) is used, if importable, to parse README front matter.

Quick use::

    from tests.support.fake_hub import FakeHub, subprocess_env

    with FakeHub(token="hf_test_write") as hub:
        # os.environ + HF_ENDPOINT/HF_TOKEN/HF_HOME/HF_HUB_DISABLE_XET=1..., minus HF_HUB_OFFLINE
        env = subprocess_env(hub.url, hf_home=tmp_path / "hf_home", token=hub.token)
        subprocess.run([sys.executable, "push.py"], env=env, check=True)
        assert hub.repos["me/prefs"]["private"] is True
        assert "data/train-00000-of-00001.parquet" in hub.repos["me/prefs"]["files"]

In-process use (``huggingface_hub`` / ``datasets`` already imported): use the
``fake_hub`` + ``hub_clients`` pytest fixtures below, or call
:func:`patch_hub_clients` with a ``monkeypatch``; see its docstring for why
setting the environment variable alone is *not* enough once the clients are
imported.

Endpoints implemented (paths as sent by huggingface_hub 2.x / datasets 5.x;
``{t}`` is ``models``/``datasets``/``spaces``, ``{p}`` the URL prefix
``""``/``datasets/``/``spaces/``):

* ``GET  /api/whoami-v2``
* ``POST /api/repos/create``, ``POST /api/repos/delete``
* ``PUT  /api/{t}/{repo}/settings`` (visibility / private)
* ``POST /api/validate-yaml``
* ``GET  /api/{t}/{repo}`` and ``GET /api/{t}/{repo}/revision/{rev}`` (repo info)
* ``POST /api/{t}/{repo}/preupload/{rev}`` (upload mode: regular vs lfs)
* ``POST /api/{t}/{repo}/commit/{rev}`` (NDJSON: header, file, lfsFile,
  deletedFile, deletedFolder; ``parentCommit`` -> 412 on mismatch; ``create_pr``)
* ``GET  /api/{t}/{repo}/tree/{rev}[/{path}]`` (``recursive``, ``expand``)
* ``POST /api/{t}/{repo}/paths-info/{rev}``
* ``GET  /api/{t}/{repo}/refs``, ``GET /api/{t}/{repo}/commits/{rev}``
* ``POST /api/{t}/{repo}/branch/{branch}``
* ``POST /{p}{repo}.git/info/lfs/objects/batch`` (LFS "basic" transfer only)
* ``PUT  /_fakehub/lfs-upload/{upload_id}`` (the upload href handed out by the batch
  call: like an S3 pre-signed URL it carries no Authorization header)
* ``POST /{p}{repo}.git/info/lfs/objects/verify``
* ``HEAD|GET /{p}{repo}/resolve/{rev}/{path}`` (ETag, X-Repo-Commit, X-Linked-Etag,
  X-Linked-Size, Content-Length, Accept-Ranges; Range requests -> 206)
* ``/api/{t}/{repo}/xet-{read,write}-token/...`` -> 400 with a clear message: Xet is
  not emulated; clients must run with ``HF_HUB_DISABLE_XET=1`` (recorded in
  :attr:`FakeHub.problems`).

Anything else gets a 404 and is recorded in :attr:`FakeHub.unhandled`.

Failures on purpose: ``hub.fail("lfs-upload", 403, "Request has expired")`` makes every request to that route
(the names in :attr:`RecordedRequest.route`: "create-repo", "commit", "lfs-upload", "delete-repo", ...) answer
that error until :meth:`FakeHub.clear_failures`; each one is recorded in :attr:`FakeHub.injected`. Pick a status
the client does not retry (not 408/429/5xx) unless the test wants to sit through its backoff.
"""

from __future__ import annotations

import base64
import datetime as _dt
import fnmatch
import hashlib
import itertools
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = [
    "FakeHub",
    "RecordedRequest",
    "client_env",
    "subprocess_env",
    "patch_hub_clients",
    "fake_hub",
    "hub_clients",
    "FAKE_HUB_TOKEN",
]

FAKE_HUB_TOKEN = "hf_test_fakehub_write_token_0123456789"

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
API_PLURAL = {v: k for k, v in REPO_TYPES.items()}

DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub's limit for "regular" (non-LFS) files

# A subset of the .gitattributes the Hub writes in every new repo: these patterns are stored with LFS.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.lz4", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet",
        "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*",
        "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
        "*.mds", "*.mp3", "*.ogg", "*.wav", "*.flac", "*.jpg", "*.jpeg", "*.png", "*.webp", "*.gif",
        "*.mp4", "*.webm",
    )
)

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


# --------------------------------------------------------------------------------------------------
# storage model
# --------------------------------------------------------------------------------------------------


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso(ts: float | None = None) -> str:
    ts = time.time() if ts is None else ts
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + "000Z"


@dataclass(frozen=True)
class Blob:
    content: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    @property
    def git_oid(self) -> str:
        """OID git would store: the blob itself, or the LFS pointer file for LFS blobs."""
        return git_blob_sha1(self.pointer if self.lfs else self.content)

    @property
    def etag(self) -> str:
        """The Hub serves LFS files with their sha256 as (linked) ETag, regular files with the git oid."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Commit:
    oid: str
    parents: list[str]
    title: str
    description: str
    timestamp: float
    files: dict[str, Blob]
    authors: list[str] = field(default_factory=list)


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    created: float
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # "main" / "refs/pr/1" -> commit oid
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content (uploaded via LFS)
    pr_count: int = 0

    @property
    def head(self) -> Commit:
        return self.commits[self.refs["main"]]

    def resolve(self, revision: str) -> Commit | None:
        revision = revision or "main"
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if revision.startswith("refs/heads/") and revision[len("refs/heads/") :] in self.refs:
            return self.commits[self.refs[revision[len("refs/heads/") :]]]
        if re.fullmatch(r"[0-9a-f]{5,40}", revision):
            matches = [c for oid, c in self.commits.items() if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None


@dataclass
class RecordedRequest:
    """One request as the server saw it. The Authorization header value is never stored."""

    method: str
    path: str  # URL path, still percent-encoded
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names; "authorization" is replaced by "<redacted>"
    auth: str  # "valid" (write token), "read" (read-only token), "invalid", or "missing"
    body_size: int
    status: int = 0
    route: str = ""

    @property
    def token_matched(self) -> bool:
        return self.auth in ("valid", "read")


class HubError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None, body: dict | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body or {}


# --------------------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------------------


class FakeHub:
    """In-memory stand-in for the Hub API used by ``huggingface_hub`` / ``datasets``.

    Args:
        token: the write token the server accepts (sent by clients as ``Authorization: Bearer <token>``).
        read_tokens: extra tokens accepted for reads only (write endpoints answer 403 to them).
        user: the user name the token belongs to (``whoami``; namespace for repo ids without one).
        orgs: organisations the user may create repos in (any namespace is accepted if ``None``).
        lfs_threshold: files at least this large are sent through LFS (the Hub uses 10 MB); binary files
            and paths matching the repo's ``.gitattributes`` LFS patterns always are.
        host, port: where to listen (port 0 = pick a free one).
    """

    def __init__(
        self,
        token: str = FAKE_HUB_TOKEN,
        *,
        read_tokens: tuple[str, ...] | list[str] = (),
        user: str = "test-user",
        orgs: list[str] | None = None,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.token = token
        self.read_tokens = tuple(read_tokens)
        self.user = user
        self.orgs = orgs
        self.lfs_threshold = lfs_threshold
        self.host = host
        self.port = port
        self.requests: list[RecordedRequest] = []
        self.unhandled: list[RecordedRequest] = []
        self.problems: list[str] = []  # server-side complaints (bad payloads, xet attempts, ...)
        self.injected: list[RecordedRequest] = []  # requests answered with a failure set by fail()
        self._failures: dict[str, tuple[int, str]] = {}  # route -> (status, message)
        self._repos: dict[tuple[str, str], Repo] = {}
        self._uploads: dict[str, tuple[str, str, str, int]] = {}  # upload id -> (type, repo_id, sha256, size)
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._commit_counter = itertools.count(1)

    # ----------------------------------------------------------------------------------- lifecycle

    def start(self) -> str:
        if self._server is not None:
            return self.url
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="FakeHub", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> "FakeHub":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def fail(self, route: str, status: int = 500, message: str = "FakeHub: failure injected by the test") -> None:
        """Answer every request to `route` with `status` and `message` (the Hub's error headers) from now on."""
        with self._lock:
            self._failures[route] = (status, message)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    # ------------------------------------------------------------------------------ client helpers

    def client_env(self, hf_home: str | os.PathLike | None = None, *, token: str | None = None) -> dict[str, str]:
        """Environment for a *subprocess* running the official clients against this server.

        Merge it over ``os.environ`` and also drop ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``
        (see :func:`client_env`)."""
        return client_env(self.url, hf_home=hf_home, token=self.token if token is None else token)

    # ----------------------------------------------------------------------------- inspection API

    @property
    def repos(self) -> dict[str, dict[str, Any]]:
        """Snapshot: repo id -> {"private", "type", "files": {path: bytes}, "lfs_files": set, "sha", "commits"}.

        ``files`` is the content of ``main``. If the same id exists with two repo types, the dataset wins;
        use :meth:`repo` to pick a type."""
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            for (rtype, rid), repo in sorted(self._repos.items(), key=lambda kv: kv[0][0] != "dataset"):
                if rid not in out:
                    out[rid] = self._repo_snapshot(repo)
        return out

    def repo(self, repo_id: str, repo_type: str = "dataset") -> dict[str, Any]:
        with self._lock:
            return self._repo_snapshot(self._repos[(repo_type, repo_id)])

    def _repo_snapshot(self, repo: Repo) -> dict[str, Any]:
        head = repo.head
        return {
            "id": repo.repo_id,
            "type": repo.repo_type,
            "private": repo.private,
            "sha": head.oid,
            "files": {path: blob.content for path, blob in head.files.items()},
            "lfs_files": {path for path, blob in head.files.items() if blob.lfs},
            "commits": [c.title for c in self._history(repo, head)],
            "refs": dict(repo.refs),
        }

    def file(self, repo_id: str, path: str, repo_type: str = "dataset", revision: str = "main") -> bytes:
        with self._lock:
            commit = self._repos[(repo_type, repo_id)].resolve(revision)
            assert commit is not None, f"unknown revision {revision!r}"
            return commit.files[path].content

    def requests_to(self, route: str) -> list[RecordedRequest]:
        """Recorded requests whose route name (e.g. "commit", "preupload", "lfs-batch") matches."""
        return [r for r in list(self.requests) if r.route == route]

    def add_repo(
        self, repo_id: str, *, repo_type: str = "dataset", private: bool = False, files: dict[str, bytes] | None = None
    ) -> None:
        """Seed a repo directly (without going through the API)."""
        with self._lock:
            repo = self._create_repo(repo_id, repo_type, private)
            if files:
                new_files = dict(repo.head.files)
                for path, content in files.items():
                    new_files[path] = Blob(content, self._should_be_lfs(repo, path, content[:512], len(content)))
                self._new_commit(repo, "main", "Seed files", "", new_files)

    # --------------------------------------------------------------------------------- internals

    def _history(self, repo: Repo, commit: Commit) -> list[Commit]:
        out = []
        c: Commit | None = commit
        while c is not None:
            out.append(c)
            c = repo.commits.get(c.parents[0]) if c.parents else None
        return out

    def _create_repo(self, repo_id: str, repo_type: str, private: bool) -> Repo:
        now = time.time()
        repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private, created=now)
        self._repos[(repo_type, repo_id)] = repo
        files = {".gitattributes": Blob(DEFAULT_GITATTRIBUTES.encode(), lfs=False)}
        self._new_commit(repo, "main", "initial commit", "", files, parent=None)
        return repo

    def _new_commit(
        self,
        repo: Repo,
        ref: str,
        title: str,
        description: str,
        files: dict[str, Blob],
        parent: str | None | bool = True,
    ) -> Commit:
        if parent is True:
            parent = repo.refs.get(ref)
        seed = f"{repo.repo_type}/{repo.repo_id}:{next(self._commit_counter)}:{time.time_ns()}:{title}".encode()
        oid = hashlib.sha1(seed).hexdigest()
        commit = Commit(
            oid=oid,
            parents=[parent] if parent else [],
            title=title,
            description=description,
            timestamp=time.time(),
            files=files,
            authors=[self.user],
        )
        repo.commits[oid] = commit
        repo.refs[ref] = oid
        return commit

    def _lfs_patterns(self, repo: Repo) -> list[str]:
        blob = repo.head.files.get(".gitattributes")
        if blob is None:
            return []
        patterns = []
        for line in blob.content.decode("utf-8", "replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and "filter=lfs" in parts[1:]:
                patterns.append(parts[0])
        return patterns

    def _should_be_lfs(self, repo: Repo, path: str, sample: bytes, size: int) -> bool:
        if size == 0:
            return False
        if size >= self.lfs_threshold:
            return True
        if _is_binary(sample):
            return True
        name = path.rsplit("/", 1)[-1]
        for pattern in self._lfs_patterns(repo):
            pat = pattern.lstrip("/")
            if "/" in pat:
                if fnmatch.fnmatch(path, pat.replace("**/", "*")) or fnmatch.fnmatch(path, pat):
                    return True
            elif fnmatch.fnmatch(name, pat):
                return True
        return False


def _is_binary(sample: bytes) -> bool:
    if b"\x00" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as e:
        # a multi-byte character cut at the end of the 512-byte sample is still text
        return e.start < len(sample) - 4
    return False


# --------------------------------------------------------------------------------------------------
# request handling
# --------------------------------------------------------------------------------------------------

_REPO = r"(?P<repo>[^/]+/[^/]+?)"
_API_REPO_RE = re.compile(r"^/api/(?P<plural>models|datasets|spaces)/" + _REPO + r"(?P<rest>/.*)?$")
_RESOLVE_RE = re.compile(r"^/(?:(?P<prefix>datasets|spaces)/)?" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_LFS_RE = re.compile(
    r"^/(?:(?P<prefix>datasets|spaces)/)?" + _REPO + r"\.git/info/lfs/objects/(?P<action>batch|verify)$"
)
_UPLOAD_RE = re.compile(r"^/_fakehub/lfs-upload/(?P<upload_id>[A-Za-z0-9_-]+)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake_hub: FakeHub  # set on the per-server subclass
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr logging
        pass

    # -- plumbing ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after the chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        hub = self.fake_hub
        split = urlsplit(self.path)
        self.url_path = split.path
        self.query = parse_qs(split.query, keep_blank_values=True)
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.auth = self._auth_state(headers.get("authorization"))
        if "authorization" in headers:
            headers["authorization"] = "<redacted>"
        self.record = RecordedRequest(
            method=self.command, path=self.url_path, query=self.query, headers=headers, auth=self.auth, body_size=0
        )
        with hub._lock:
            hub.requests.append(self.record)
        try:
            self.body = self._read_body()
            self.record.body_size = len(self.body)
            self._dispatch()
        except HubError as e:
            self._send_error(e)
        except Exception as e:  # never let a bug in the fake look like a network failure
            msg = f"FakeHub internal error on {self.command} {self.url_path}: {type(e).__name__}: {e}"
            hub.problems.append(msg)
            # 400 rather than 500: clients retry 5xx with backoff, which would only slow the failing test down
            self._send_error(HubError(400, msg))

    def _auth_state(self, value: str | None) -> str:
        if not value:
            return "missing"
        scheme, _, tok = value.partition(" ")
        if scheme.lower() != "bearer" or not tok:
            return "invalid"
        tok = tok.strip()
        if secrets.compare_digest(tok, self.fake_hub.token):
            return "valid"
        if any(secrets.compare_digest(tok, t) for t in self.fake_hub.read_tokens):
            return "read"
        return "invalid"

    def _send(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        content_length: int | None = None,
    ) -> None:
        self.record.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _send_error(self, e: HubError) -> None:
        headers = {"X-Error-Message": e.message.replace("\n", " ")[:1000], **e.headers}
        if e.code:
            headers["X-Error-Code"] = e.code
        self._json({"error": e.message, **e.body}, status=e.status, headers=headers)

    # -- auth helpers -----------------------------------------------------------------------------

    def _reject_invalid_token(self) -> None:
        if self.auth == "invalid":
            raise HubError(401, INVALID_CREDENTIALS)

    def _require_write(self) -> None:
        self._reject_invalid_token()
        if self.auth == "missing":
            raise HubError(401, "You must be authenticated to access this resource (missing Authorization header).")
        if self.auth == "read":
            raise HubError(403, "This token does not have write access (read-only token).")

    def _get_repo(self, repo_type: str, repo_id: str, *, write: bool = False) -> Repo:
        if write:
            self._require_write()
        else:
            self._reject_invalid_token()
        repo = self.fake_hub._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        if repo.private and self.auth == "missing":
            # like the Hub: private repos look missing to anonymous users
            raise HubError(401, "Repository not found", code="RepoNotFound")
        return repo

    def _get_commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    # -- routing ----------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        hub = self.fake_hub
        p, m = self.url_path, self.command

        if p == "/api/whoami-v2" and m == "GET":
            return self._route("whoami", self._whoami)
        if p == "/api/repos/create" and m == "POST":
            return self._route("create-repo", self._create_repo)
        if p == "/api/repos/delete" and m in ("POST", "DELETE"):
            return self._route("delete-repo", self._delete_repo)
        if p == "/api/validate-yaml" and m == "POST":
            return self._route("validate-yaml", self._validate_yaml)
        if p.startswith("/api/telemetry/"):
            return self._route("telemetry", lambda: self._json({}))

        mt = _UPLOAD_RE.match(p)
        if mt and m == "PUT":
            return self._route("lfs-upload", self._lfs_upload, mt.group("upload_id"))

        mt = _LFS_RE.match(p)
        if mt and m == "POST":
            rtype = REPO_TYPES.get(mt.group("prefix") or "models", "model")
            action = mt.group("action")
            handler = self._lfs_batch if action == "batch" else self._lfs_verify
            return self._route(f"lfs-{action}", handler, rtype, mt.group("repo"))

        mt = _RESOLVE_RE.match(p)
        if mt and m in ("GET", "HEAD"):
            rtype = REPO_TYPES.get(mt.group("prefix") or "models", "model")
            return self._route(
                "resolve", self._resolve, rtype, mt.group("repo"), unquote(mt.group("rev")), unquote(mt.group("path"))
            )

        mt = _API_REPO_RE.match(p)
        if mt:
            rtype = REPO_TYPES[mt.group("plural")]
            repo_id = unquote(mt.group("repo"))
            rest = mt.group("rest") or ""
            if rest in ("", "/") and m == "GET":
                return self._route("repo-info", self._repo_info, rtype, repo_id, "main")
            for prefix, route, methods, handler in (
                ("/revision/", "repo-info", ("GET",), self._repo_info),
                ("/preupload/", "preupload", ("POST",), self._preupload),
                ("/commit/", "commit", ("POST",), self._commit),
                ("/paths-info/", "paths-info", ("POST",), self._paths_info),
                ("/commits/", "list-commits", ("GET",), self._list_commits),
                ("/branch/", "create-branch", ("POST",), self._create_branch),
            ):
                if rest.startswith(prefix) and m in methods:
                    return self._route(route, handler, rtype, repo_id, unquote(rest[len(prefix) :]))
            if rest.startswith("/tree/") and m == "GET":
                rev, _, path = rest[len("/tree/") :].partition("/")
                return self._route("tree", self._tree, rtype, repo_id, unquote(rev), unquote(path))
            if rest == "/refs" and m == "GET":
                return self._route("refs", self._refs, rtype, repo_id)
            if rest == "/settings" and m == "PUT":
                return self._route("settings", self._settings, rtype, repo_id)
            if re.match(r"^/xet-(read|write)-token(/|$)", rest):
                msg = (
                    "FakeHub does not emulate Xet storage. Run the client with HF_HUB_DISABLE_XET=1 "
                    "(or patch huggingface_hub.constants.HF_HUB_DISABLE_XET = True) so it uses the LFS upload path."
                )
                hub.problems.append(f"xet token requested: {m} {p}")
                self.record.route = "xet-token"
                raise HubError(400, msg)

        self.record.route = "unhandled"
        with hub._lock:
            hub.unhandled.append(self.record)
        raise HubError(404, f"FakeHub: no route for {m} {p}")

    def _route(self, name: str, handler: Any, *args: Any) -> None:
        self.record.route = name
        with self.fake_hub._lock:
            failure = self.fake_hub._failures.get(name)
            if failure is not None:
                self.fake_hub.injected.append(self.record)
                raise HubError(*failure)
            handler(*args)

    # -- request body helpers ---------------------------------------------------------------------

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}")

    def _base(self) -> str:
        return self.fake_hub.url

    def _repo_url(self, repo: Repo) -> str:
        return f"{self._base()}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # -- endpoints: account / repos ---------------------------------------------------------------

    def _whoami(self) -> None:
        self._reject_invalid_token()
        if self.auth == "missing":
            raise HubError(401, "Unauthorized")
        hub = self.fake_hub
        role = "write" if self.auth == "valid" else "read"
        self._json(
            {
                "type": "user",
                "id": "fakehub-user-id",
                "name": hub.user,
                "fullname": hub.user,
                "email": f"{hub.user}@example.invalid",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "orgs": [{"type": "org", "name": o, "roleInOrg": "write"} for o in (hub.orgs or [])],
                "auth": {"type": "access_token", "accessToken": {"displayName": "fakehub", "role": role}},
            }
        )

    def _create_repo(self) -> None:
        self._require_write()
        hub = self.fake_hub
        payload = self._json_body()
        name = payload.get("name")
        org = payload.get("organization") or hub.user
        rtype = payload.get("type") or "model"
        if rtype not in URL_PREFIX:
            raise HubError(400, f"Unsupported repo type {rtype!r}")
        if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
            raise HubError(400, f"Invalid repo name {name!r}")
        if hub.orgs is not None and org != hub.user and org not in hub.orgs:
            raise HubError(403, f"You don't have the rights to create a repo under the namespace {org!r}")
        repo_id = f"{org}/{name}"
        visibility = payload.get("visibility")
        private = payload.get("private")
        if visibility is not None:
            private = visibility == "private"
        private = bool(private)
        existing = hub._repos.get((rtype, repo_id))
        url = f"{self._base()}/{URL_PREFIX[rtype]}{repo_id}"
        if existing is not None:
            # the client reads "url" from the 409 body when exist_ok=True
            raise HubError(409, f"You already created this {rtype} repo", body={"url": url})
        hub._create_repo(repo_id, rtype, private)
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        self._require_write()
        payload = self._json_body()
        repo_id = f"{payload.get('organization') or self.fake_hub.user}/{payload.get('name')}"
        key = (payload.get("type") or "model", repo_id)
        if key not in self.fake_hub._repos:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        del self.fake_hub._repos[key]
        self._json({})

    def _settings(self, rtype: str, repo_id: str) -> None:
        repo = self._get_repo(rtype, repo_id, write=True)
        payload = self._json_body()
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        if "private" in payload:
            repo.private = bool(payload["private"])
        self._json({"private": repo.private})

    def _validate_yaml(self) -> None:
        self._reject_invalid_token()
        payload = self._json_body()
        content = payload.get("content") or ""
        errors = []
        try:
            _parse_front_matter(content)
        except Exception as e:  # noqa: BLE001
            errors.append({"message": f"Invalid YAML metadata: {e}"})
        if errors:
            self._json({"errors": errors, "warnings": []}, status=400)
        else:
            self._json({"errors": [], "warnings": []})

    # -- endpoints: read API ----------------------------------------------------------------------

    def _repo_info(self, rtype: str, repo_id: str, revision: str) -> None:
        repo = self._get_repo(rtype, repo_id)
        commit = self._get_commit(repo, revision)
        with_blobs = _truthy(self.query.get("blobs", ["false"])[-1])
        siblings = []
        for path in sorted(commit.files):
            blob = commit.files[path]
            sib: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sib.update(size=blob.size, blobId=blob.git_oid)
                if blob.lfs:
                    sib["lfs"] = {"size": blob.size, "sha256": blob.sha256, "pointerSize": len(blob.pointer)}
            siblings.append(sib)
        info: dict[str, Any] = {
            "_id": hashlib.md5(f"{rtype}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "createdAt": _now_iso(repo.created),
            "lastModified": _now_iso(commit.timestamp),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(b.size for b in commit.files.values()),
        }
        if rtype == "model":
            info["modelId"] = repo.repo_id
        if rtype == "space":
            info["sdk"] = "static"
        readme = commit.files.get("README.md")
        if readme is not None:
            try:
                card = _parse_front_matter(readme.content.decode("utf-8", "replace"))
            except Exception:  # noqa: BLE001
                card = None
            if isinstance(card, dict):
                info["cardData"] = card
                tags = card.get("tags")
                if isinstance(tags, list):
                    info["tags"] = [str(t) for t in tags]
        expand = self.query.get("expand") or self.query.get("expand[]")
        if expand:
            keep = set(expand) | {"_id", "id"}
            info = {k: v for k, v in info.items() if k in keep}
        self._json(info)

    def _entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict[str, Any] | None:
        files = commit.files
        if path in files:
            blob = files[path]
            entry: dict[str, Any] = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": path}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
        else:
            prefix = path.rstrip("/") + "/"
            children = sorted(p for p in files if p.startswith(prefix))
            if not children:
                return None
            tree_oid = hashlib.sha1("\n".join(f"{p}:{files[p].git_oid}" for p in children).encode()).hexdigest()
            entry = {"type": "directory", "oid": tree_oid, "size": 0, "path": path.rstrip("/")}
        if expand:
            entry["lastCommit"] = self._last_commit_touching(repo, commit, path)
        return entry

    def _last_commit_touching(self, repo: Repo, commit: Commit, path: str) -> dict[str, Any]:
        def state(c: Commit) -> list[tuple[str, str]]:
            prefix = path.rstrip("/") + "/"
            return sorted((p, b.git_oid) for p, b in c.files.items() if p == path or p.startswith(prefix))

        history = self.fake_hub._history(repo, commit)
        target = state(commit)
        last = commit
        for older in history[1:]:
            if state(older) != target:
                break
            last = older
        return {"id": last.oid, "title": last.title, "date": _now_iso(last.timestamp)}

    def _tree(self, rtype: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._get_repo(rtype, repo_id)
        commit = self._get_commit(repo, revision)
        recursive = _truthy(self.query.get("recursive", ["false"])[-1])
        expand = _truthy(self.query.get("expand", ["false"])[-1])
        path = path.strip("/")
        prefix = f"{path}/" if path else ""
        if path and path in commit.files:
            raise HubError(404, f"{path} is a file, not a directory", code="EntryNotFound")
        below = [p for p in commit.files if p.startswith(prefix)]
        if path and not below:
            raise HubError(404, f"Entry not found: {path}", code="EntryNotFound",
                           headers={"X-Repo-Commit": commit.oid})
        names: set[str] = set()
        for p in below:
            parts = p[len(prefix) :].split("/")
            if recursive:
                for i in range(1, len(parts)):
                    names.add(prefix + "/".join(parts[:i]))
                names.add(p)
            else:
                names.add(prefix + parts[0])
        entries = [self._entry(repo, commit, n, expand) for n in names]
        entries = [e for e in entries if e is not None]
        # the Hub lists directories first, then files, each sorted by path
        entries.sort(key=lambda e: (e["type"] != "directory", e["path"]))
        self._json(entries)

    def _paths_info(self, rtype: str, repo_id: str, revision: str) -> None:
        repo = self._get_repo(rtype, repo_id)
        commit = self._get_commit(repo, revision)
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            payload = self._json_body()
            paths = payload.get("paths") or []
            expand = bool(payload.get("expand"))
        else:
            form = parse_qs(self.body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = _truthy((form.get("expand") or ["false"])[-1])
        if isinstance(paths, str):
            paths = [paths]
        out = []
        for path in paths:
            entry = self._entry(repo, commit, path.strip("/"), expand) if path.strip("/") else None
            if entry is not None:
                out.append(entry)
        self._json(out)

    def _refs(self, rtype: str, repo_id: str) -> None:
        repo = self._get_repo(rtype, repo_id)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in sorted(repo.refs.items())
            if not name.startswith("refs/")
        ]
        out: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if _truthy(self.query.get("include_prs", ["0"])[-1]):
            out["pullRequests"] = [
                {"name": name.rsplit("/", 1)[-1], "ref": name, "targetCommit": oid}
                for name, oid in sorted(repo.refs.items())
                if name.startswith("refs/pr/")
            ]
        self._json(out)

    def _list_commits(self, rtype: str, repo_id: str, revision: str) -> None:
        repo = self._get_repo(rtype, repo_id)
        commit = self._get_commit(repo, revision)
        self._json(
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.description,
                    "date": _now_iso(c.timestamp),
                    "authors": [{"user": a, "avatar": None} for a in c.authors],
                }
                for c in self.fake_hub._history(repo, commit)
            ]
        )

    def _resolve(self, rtype: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._get_repo(rtype, repo_id)
        commit = self._get_commit(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers = {
            "ETag": f'"{blob.etag}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
            "Cache-Control": "private, max-age=0",
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(blob.size)
        data = blob.content
        rng = self.headers.get("Range")
        if rng:
            mt = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            if not mt or (mt.group(1) == "" and mt.group(2) == ""):
                raise HubError(416, f"Unsupported range {rng!r}", headers={"Content-Range": f"bytes */{len(data)}"})
            if mt.group(1) == "":  # suffix range: last N bytes
                start, end = max(0, len(data) - int(mt.group(2))), len(data) - 1
            else:
                start = int(mt.group(1))
                end = int(mt.group(2)) if mt.group(2) else len(data) - 1
                end = min(end, len(data) - 1)
            if start >= len(data) or start > end:
                raise HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, data[start : end + 1], content_type="application/octet-stream", headers=headers)
            return
        self._send(200, data, content_type="application/octet-stream", headers=headers)

    # -- endpoints: write API ---------------------------------------------------------------------

    def _preupload(self, rtype: str, repo_id: str, revision: str) -> None:
        repo = self._get_repo(rtype, repo_id, write=True)
        commit = self._get_commit(repo, revision) if not _truthy(self.query.get("create_pr", ["0"])[-1]) else repo.head
        payload = self._json_body()
        files = payload.get("files")
        if not isinstance(files, list):
            raise HubError(400, "Expected 'files' list")
        ignore_patterns = _gitignore_patterns(payload.get("gitIgnore"), commit)
        out = []
        for f in files:
            path, size = f.get("path"), f.get("size")
            if not isinstance(path, str) or not isinstance(size, int):
                raise HubError(400, f"Malformed preupload entry {f!r}")
            try:
                sample = base64.b64decode(f.get("sample") or "")
            except ValueError:
                raise HubError(400, f"Invalid base64 sample for {path}")
            mode = "lfs" if self.fake_hub._should_be_lfs(repo, path, sample, size) else "regular"
            existing = commit.files.get(path)
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.git_oid
            out.append(
                {
                    "path": path,
                    "uploadMode": mode,
                    "shouldIgnore": any(fnmatch.fnmatch(path, pat) for pat in ignore_patterns),
                    "oid": oid,
                }
            )
        self._json({"files": out, "commitOid": commit.oid})

    def _lfs_batch(self, rtype: str, repo_id: str) -> None:
        repo = self._get_repo(rtype, repo_id, write=True)
        hub = self.fake_hub
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "FakeHub only implements LFS 'upload' batches")
        transfers = payload.get("transfers") or ["basic"]
        if "basic" not in transfers:
            raise HubError(400, f"FakeHub only implements the 'basic' LFS transfer, client offered {transfers}")
        objects = []
        for obj in payload.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
                objects.append({"oid": str(oid), "size": int(size or 0),
                                "error": {"code": 422, "message": "invalid oid or size"}})
                continue
            if oid in repo.lfs_objects:
                objects.append({"oid": oid, "size": size})  # no "actions": already present upstream
                continue
            upload_id = secrets.token_urlsafe(24)
            hub._uploads[upload_id] = (rtype, repo_id, oid, size)
            lfs_base = f"{self._base()}/{URL_PREFIX[rtype]}{repo_id}.git/info/lfs/objects"
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{self._base()}/_fakehub/lfs-upload/{upload_id}", "expires_in": 3600},
                        "verify": {"href": f"{lfs_base}/verify", "expires_in": 3600},
                    },
                }
            )
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, upload_id: str) -> None:
        hub = self.fake_hub
        target = hub._uploads.get(upload_id)
        if target is None:
            raise HubError(403, "Unknown or expired LFS upload URL")
        rtype, repo_id, oid, size = target
        data = self.body
        if len(data) != size:
            hub.problems.append(f"LFS upload for {oid} has {len(data)} bytes, batch announced {size}")
            raise HubError(400, f"Size mismatch: got {len(data)} bytes, expected {size}")
        actual = hashlib.sha256(data).hexdigest()
        if actual != oid:
            hub.problems.append(f"LFS upload sha256 mismatch: announced {oid}, got {actual}")
            raise HubError(400, f"sha256 mismatch: got {actual}, expected {oid}")
        repo = hub._repos.get((rtype, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        repo.lfs_objects[oid] = data
        del hub._uploads[upload_id]
        self._send(200, b"", headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def _lfs_verify(self, rtype: str, repo_id: str) -> None:
        repo = self._get_repo(rtype, repo_id, write=True)
        payload = self._json_body()
        oid, size = payload.get("oid"), payload.get("size")
        data = repo.lfs_objects.get(oid or "")
        if data is None:
            raise HubError(404, f"LFS object {oid} was not uploaded")
        if size is not None and size != len(data):
            raise HubError(400, f"LFS object {oid} has size {len(data)}, not {size}")
        self._json({"oid": oid, "size": len(data)})

    def _create_branch(self, rtype: str, repo_id: str, branch: str) -> None:
        repo = self._get_repo(rtype, repo_id, write=True)
        payload = self._json_body()
        if branch in repo.refs:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._get_commit(repo, payload.get("startingPoint") or "main")
        repo.refs[branch] = start.oid
        self._json({})

    def _commit(self, rtype: str, repo_id: str, revision: str) -> None:
        hub = self.fake_hub
        repo = self._get_repo(rtype, repo_id, write=True)
        create_pr = _truthy(self.query.get("create_pr", ["0"])[-1])
        try:
            lines = [json.loads(line) for line in self.body.decode("utf-8").splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"Commit payload is not valid NDJSON: {e}")
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a 'header' line")
        header = lines[0].get("value") or {}
        summary = header.get("summary")
        if not summary:
            raise HubError(400, "Commit summary is required")
        base = self._get_commit(repo, revision)
        parent = header.get("parentCommit")
        if parent and not base.oid.startswith(parent):
            raise HubError(412, f"Parent commit {parent} is not the head of {revision} ({base.oid})")
        files = dict(base.files)
        for item in lines[1:]:
            key, value = item.get("key"), item.get("value") or {}
            path = value.get("path")
            if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
                raise HubError(400, f"Invalid path in commit operation: {item!r}")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                content = base64.b64decode(value.get("content") or "")
                if len(content) >= hub.lfs_threshold or (content and _is_binary(content[:512])):
                    hub.problems.append(f"binary or large file {path} sent as a regular git blob")
                    raise HubError(
                        400,
                        f"Your push was rejected because it contains binary or large files ({path}). "
                        "Use LFS (the preupload endpoint said so).",
                    )
                files[path] = Blob(content, lfs=False)
            elif key == "lfsFile":
                oid = value.get("oid")
                data = repo.lfs_objects.get(oid or "")
                if data is None:
                    hub.problems.append(f"commit references LFS object {oid} ({path}) that was never uploaded")
                    raise HubError(400, f"LFS object {oid} for {path} was not uploaded to this repo")
                if value.get("size") is not None and value["size"] != len(data):
                    raise HubError(400, f"LFS size mismatch for {path}")
                files[path] = Blob(data, lfs=True)
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise HubError(400, f"Unsupported commit operation {key!r}")
        if create_pr:
            repo.pr_count += 1
            ref = f"refs/pr/{repo.pr_count}"
            commit = hub._new_commit(repo, ref, summary, header.get("description") or "", files, parent=base.oid)
            pr_url = f"{self._repo_url(repo)}/discussions/{repo.pr_count}"
        else:
            ref = revision
            if ref not in repo.refs:
                ref = next((name for name, oid in repo.refs.items() if oid == base.oid), "main")
            commit = hub._new_commit(repo, ref, summary, header.get("description") or "", files, parent=base.oid)
            pr_url = None
        self._json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            }
        )


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _gitignore_patterns(explicit: str | None, commit: Commit) -> list[str]:
    text = explicit
    if text is None and ".gitignore" in commit.files:
        text = commit.files[".gitignore"].content.decode("utf-8", "replace")
    if not text:
        return []
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not line.startswith("!"):
            out.append(line.lstrip("/"))
            if not line.startswith("*"):
                out.append("*/" + line.lstrip("/"))
    return out


def _parse_front_matter(text: str) -> dict[str, Any] | None:
    """Parse the YAML block between leading ``---`` lines of a README (None if there is none)."""
    mt = re.match(r"^\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.S)
    if not mt:
        return None
    try:
        import yaml
    except ImportError:  # pragma: no cover - huggingface_hub depends on pyyaml
        return None
    data = yaml.safe_load(mt.group(1))
    if data is not None and not isinstance(data, dict):
        raise ValueError("metadata must be a YAML mapping")
    return data


# --------------------------------------------------------------------------------------------------
# pointing the clients at the server
# --------------------------------------------------------------------------------------------------

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def client_env(url: str, *, hf_home: str | os.PathLike | None = None, token: str | None = None) -> dict[str, str]:
    """Environment variables that point a fresh Python process's clients at a FakeHub.

    ``huggingface_hub`` and ``datasets`` read these at *import* time, so they must be in the
    environment of the process before it imports them (e.g. ``subprocess.run(..., env=...)``).
    The caller must also remove the offline variables: ``{k: v for k, v in os.environ.items()
    if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}``; or use
    :func:`subprocess_env`, which does both.
    """
    env = {
        "HF_ENDPOINT": url,
        # hf_xet is installed with current huggingface_hub and would be used for every upload;
        # the fake only speaks the classic LFS protocol.
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
        "HF_HUB_ETAG_TIMEOUT": "30",
        "HF_HUB_DOWNLOAD_TIMEOUT": "60",
        "DO_NOT_TRACK": "1",
    }
    if hf_home is not None:
        hf_home = str(hf_home)
        os.makedirs(os.path.join(hf_home, "xet"), exist_ok=True)
        env.update(
            HF_HOME=hf_home,
            HF_HUB_CACHE=os.path.join(hf_home, "hub"),
            HF_DATASETS_CACHE=os.path.join(hf_home, "datasets"),
            HF_XET_CACHE=os.path.join(hf_home, "xet"),
            # hf_xet (if it runs at all) writes its logs under ~/.cache/huggingface/xet/logs
            # regardless of HF_HOME / HF_XET_CACHE; this redirects them (a file path).
            HF_XET_LOG_DEST=os.path.join(hf_home, "xet", "hf_xet.log"),
        )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def subprocess_env(
    url: str, *, hf_home: str | os.PathLike | None = None, token: str | None = None, base: dict | None = None
) -> dict[str, str]:
    """``os.environ`` (or ``base``) + :func:`client_env`, minus the offline switches and stray tokens."""
    env = dict(os.environ if base is None else base)
    for k in (*_OFFLINE_VARS, "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HF_DATASETS_CACHE",
              "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_STAGING"):
        env.pop(k, None)
    env.update(client_env(url, hf_home=hf_home, token=token))
    return env


def patch_hub_clients(monkeypatch: Any, url: str, *, hf_home: str | os.PathLike, token: str | None = None) -> None:
    """Point *already imported* ``huggingface_hub`` / ``datasets`` at ``url`` for one test.

    Why the environment is not enough: ``huggingface_hub.constants.ENDPOINT`` (and
    ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_HUB_DISABLE_XET``, ``HF_HUB_OFFLINE``, the cache and token
    paths) and ``datasets.config.HF_ENDPOINT`` are computed once, at import. ``HfApi()`` and
    ``hf_hub_download`` read ``huggingface_hub.constants.<NAME>`` at call time, and ``datasets``
    passes ``endpoint=datasets.config.HF_ENDPOINT`` explicitly, so patching those module attributes
    (plus the env vars, for any subprocess) is what works. Objects created before the patch
    (e.g. an ``HfApi()`` built at import of your module) keep their old endpoint.
    """
    hf_home = str(hf_home)
    env = client_env(url, hf_home=hf_home, token=token)
    for k in _OFFLINE_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    import huggingface_hub.constants as hc

    hub_cache = os.path.join(hf_home, "hub")
    patches: dict[str, Any] = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": os.path.join(hf_home, "assets"),
        "HF_TOKEN_PATH": os.path.join(hf_home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(hf_home, "stored_tokens"),
        "HF_XET_CACHE": os.path.join(hf_home, "xet"),
    }
    if hasattr(hc, "HF_URL_HOSTS"):
        patches["HF_URL_HOSTS"] = frozenset(set(hc.HF_URL_HOSTS) | {urlsplit(url).hostname})
    for name, value in patches.items():
        if hasattr(hc, name):
            monkeypatch.setattr(hc, name, value)

    try:
        import huggingface_hub.utils._http as hh

        if hasattr(hh, "_HUB_ORIGINS"):
            monkeypatch.setattr(hh, "_HUB_ORIGINS", frozenset(set(hh._HUB_ORIGINS) | {hh._url_origin(url)}))
    except ImportError:  # pragma: no cover
        pass

    try:
        import datasets.config as dc
    except ImportError:
        return
    ds_cache = Path(hf_home) / "datasets"
    for name, value in {
        "HF_ENDPOINT": url,
        "HUB_DATASETS_URL": url + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_CACHE_HOME": hf_home,
        "HF_DATASETS_CACHE": ds_cache,
        "HF_MODULES_CACHE": Path(hf_home) / "modules",
        "DOWNLOADED_DATASETS_PATH": ds_cache / "downloads",
        "EXTRACTED_DATASETS_PATH": ds_cache / "downloads" / "extracted",
    }.items():
        if hasattr(dc, name):
            monkeypatch.setattr(dc, name, value)


# --------------------------------------------------------------------------------------------------
# pytest fixtures (import them into a test module or a conftest.py)
# --------------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def fake_hub() -> Iterator[FakeHub]:
        """A started FakeHub accepting ``FAKE_HUB_TOKEN`` (write) and ``"hf_test_read_only"`` (read)."""
        with FakeHub(token=FAKE_HUB_TOKEN, read_tokens=("hf_test_read_only",)) as hub:
            yield hub

    @pytest.fixture
    def hub_clients(fake_hub: FakeHub, monkeypatch: Any, tmp_path: Path) -> FakeHub:
        """``fake_hub`` with in-process clients pointed at it and a temporary HF_HOME (``tmp_path/hf_home``).

        HF_TOKEN is *not* set: pass ``token=fake_hub.token`` explicitly (the way selfalign should)."""
        patch_hub_clients(monkeypatch, fake_hub.url, hf_home=tmp_path / "hf_home")
        return fake_hub
