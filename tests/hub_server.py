"""A local stand-in for the Hugging Face Hub: the part of its HTTP API that huggingface_hub's client uses to check a
token, create repos, commit files (regular and git-LFS uploads, NDJSON commits), list and download them.

Plain stdlib http.server in a thread on 127.0.0.1 (port 0: a free one). Accounts: TOKENS maps a token to its user;
ORGS maps an organisation to its members and their roles. "alice" owns her namespace and can write to "alice-team";
"bob" is an organisation alice is not a member of. Drive it with the real client (HF_HUB_DISABLE_XET=1, the
endpoint passed explicitly or through HF_ENDPOINT).

    hub = FakeHub().start()          # hub.url -> "http://127.0.0.1:PORT"
    hub.fail("POST", "/commit/", 400, "simulated failure", times=1)
    hub.files("alice/repo")          # {path: bytes} at main
    hub.stop()
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

ALICE_TOKEN = "hf_alice_token_for_tests"
BOB_TOKEN = "hf_bob_token_for_tests"
TOKENS = {ALICE_TOKEN: "alice", BOB_TOKEN: "bob-admin"}
ORGS = {"alice-team": {"alice": "write"}, "bob": {"bob-admin": "admin"}}
WRITE_ROLES = {"admin", "write", "contributor"}
# What the Hub's default .gitattributes sends to LFS, by extension (it also does so for binary or large files).
LFS_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".png", ".jpg", ".jpeg", ".webp", ".zip", ".gz")
LFS_MIN_SIZE = 10 * 1024 * 1024
TYPE_PREFIXES = {"datasets": "dataset", "spaces": "space", "models": "model"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {len(self.data)}\n").encode()

    @property
    def oid(self) -> str:
        """What the tree listing calls "oid": the git blob hash of the content, or of the LFS pointer."""
        return git_blob_sha1(self.pointer if self.lfs else self.data)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HubHTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.faults: list[dict] = []
        self.lock = threading.Lock()
        self.secret = secrets.token_bytes(16)
        self._server: ThreadingHTTPServer | None = None
        self._counter = 0

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- helpers for tests -----------------------------------------------------------------------------------
    def fail(self, method: str, path_contains: str, status: int, message: str, times: int = 1) -> None:
        """Answer the next `times` requests whose path contains `path_contains` with an error."""
        self.faults.append({"method": method, "path": path_contains, "status": status, "message": message,
                            "times": times})

    def add_repo(self, repo_id: str, repo_type: str = "model", private: bool = False,
                 files: dict[str, bytes] | None = None) -> str:
        with self.lock:
            repo = self._create(repo_type, repo_id, private)
            if files:
                self._commit(repo, "main", {p: Blob(d, _is_lfs(p, d)) for p, d in files.items()}, set(), "seed")
            return repo.branches["main"]

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[(repo_type, repo_id)]
        return {path: blob.data for path, blob in repo.commits[repo.resolve(revision)].items()}

    def commit_messages(self, repo_id: str, repo_type: str = "model") -> list[str]:
        repo = self.repos[(repo_type, repo_id)]
        return list(repo.messages.values())

    # -- model -----------------------------------------------------------------------------------------------
    def _create(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = self.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private)
        self._commit(repo, "main", {".gitattributes": Blob(GITATTRIBUTES, False)}, set(), "initial commit")
        return repo

    def _commit(self, repo: Repo, branch: str, added: dict[str, Blob], deleted: set[str], message: str) -> str:
        parent = repo.branches.get(branch)
        files = dict(repo.commits[parent]) if parent else {}
        for path in deleted:
            for existing in [p for p in files if p == path or p.startswith(path.rstrip("/") + "/")]:
                del files[existing]
        files.update(added)
        self._counter += 1
        oid = hashlib.sha1(f"{parent}|{message}|{self._counter}|{sorted(files)}".encode()).hexdigest()
        repo.commits[oid] = files
        repo.branches[branch] = oid
        repo.messages[oid] = message
        return oid

    def user_of(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in TOKENS:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return TOKENS[token]

    def can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or ORGS.get(namespace, {}).get(user) in WRITE_ROLES)

    def can_read(self, user: str | None, repo: Repo) -> bool:
        namespace = repo.repo_id.split("/")[0]
        return not repo.private or user == namespace or user in ORGS.get(namespace, {})

    def upload_signature(self, oid: str, size: int) -> str:
        return hmac.new(self.secret, f"{oid}:{size}".encode(), hashlib.sha256).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _is_lfs(path: str, data: bytes) -> bool:
    return path.lower().endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE or b"\0" in data[:512]


# ----------------------------------------------------------------------------------------------------------------
# HTTP


REPO_API = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/(.*))?$")
LFS_BATCH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+?)\.git/info/lfs/objects/(batch|verify)$")
RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    def log_message(self, *args) -> None:  # quiet
        pass

    # -- plumbing --------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, error: HubHTTPError, head: bool = False) -> None:
        headers = {"X-Error-Message": error.message}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send(error.status, b"" if head else json.dumps({"error": error.message}).encode(), headers, head)

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        self.hub.requests.append((method, path))
        body = self._body() if method in ("POST", "PUT") else b""
        try:
            for fault in self.hub.faults:
                if fault["times"] > 0 and fault["method"] == method and fault["path"] in path:
                    fault["times"] -= 1
                    raise HubHTTPError(fault["status"], fault["message"])
            user = self.hub.user_of(self.headers.get("Authorization"))
            with self.hub.lock:
                self._route(method, path, query, body, user)
        except HubHTTPError as error:
            self._error(error, head=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # -- routes ----------------------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict, body: bytes, user: str | None) -> None:
        if method == "GET" and path == "/api/whoami-v2":
            return self._whoami(user)
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body), user)
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if method == "PUT" and path.startswith("/lfs-upload/"):
            return self._lfs_put(path.removeprefix("/lfs-upload/"), query, body)
        if match := REPO_API.match(path):
            kind, namespace, name, rest = match.groups()
            repo = self._repo(TYPE_PREFIXES[kind], f"{unquote(namespace)}/{unquote(name)}", user)
            return self._repo_api(method, repo, rest or "", query, body, user)
        if method == "POST" and (match := LFS_BATCH.match(path)):
            kind, namespace, name, action = match.groups()
            repo = self._repo(TYPE_PREFIXES.get(kind, "model"), f"{namespace}/{name}", user)
            self._require_write(repo, user)
            return self._lfs_batch(repo, json.loads(body)) if action == "batch" else self._lfs_verify(json.loads(body))
        if method in ("GET", "HEAD") and (match := RESOLVE.match(path)):
            kind, namespace, name, revision, file_path = match.groups()
            repo = self._repo(TYPE_PREFIXES.get(kind, "model"), f"{namespace}/{name}", user)
            return self._resolve(method, repo, unquote(revision), unquote(file_path))
        raise HubHTTPError(404, f"the test hub does not implement {method} {path}")

    def _repo(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or not self.hub.can_read(user, repo):
            raise HubHTTPError(404, "Repository not found", "RepoNotFound")
        return repo

    def _require_write(self, repo: Repo, user: str | None) -> None:
        if user is None:
            raise HubHTTPError(401, "You must be authenticated to write to a repository")
        if not self.hub.can_write(user, repo.repo_id.split("/")[0]):
            raise HubHTTPError(403, f"You don't have the rights to write to {repo.repo_id}")

    def _whoami(self, user: str | None) -> None:
        if user is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        orgs = [{"type": "org", "name": org, "roleInOrg": members[user]}
                for org, members in ORGS.items() if user in members]
        self._json(200, {"type": "user", "id": f"id-{user}", "name": user, "fullname": user.title(), "orgs": orgs,
                         "auth": {"type": "access_token",
                                  "accessToken": {"displayName": "tests", "role": "write"}}})

    def _create_repo(self, payload: dict, user: str | None) -> None:
        if user is None:
            raise HubHTTPError(401, "You must be authenticated to create a repository")
        namespace = payload.get("organization") or user
        repo_type = payload.get("type") or "model"
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.hub.url}/{URL_PREFIXES[repo_type]}{repo_id}"
        if not self.hub.can_write(user, namespace):
            raise HubHTTPError(403, f'You don\'t have the rights to create a {repo_type} under the namespace '
                                    f'"{namespace}"')
        if (repo_type, repo_id) in self.hub.repos:
            return self._json(409, {"error": "You already created this repo", "url": url},
                              {"X-Error-Message": "You already created this repo"})
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        self.hub._create(repo_type, repo_id, private)
        self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        import yaml

        content, errors = payload.get("content", ""), []
        if content.startswith("---"):
            try:
                yaml.safe_load(content.split("---")[1])
            except yaml.YAMLError as error:
                errors.append({"message": f"invalid YAML: {error}"})
        if errors:
            return self._json(400, {"errors": errors}, {"X-Error-Message": errors[0]["message"]})
        self._json(200, {"errors": [], "warnings": []})

    def _repo_api(self, method: str, repo: Repo, rest: str, query: dict, body: bytes, user: str | None) -> None:
        parts = rest.split("/", 1) if rest else [""]
        action, tail = parts[0], (parts[1] if len(parts) > 1 else "")
        if method == "GET" and action in ("", "revision"):
            return self._repo_info(repo, unquote(tail) if action == "revision" else "main")
        if method == "GET" and action == "tree":
            revision, _, sub = tail.partition("/")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self._tree(repo, unquote(revision), unquote(sub), recursive)
        if method == "POST" and action in ("preupload", "commit", "branch"):
            self._require_write(repo, user)
            revision = unquote(tail)
            if action == "branch":
                return self._create_branch(repo, revision, json.loads(body or b"{}"))
            if revision not in repo.branches:
                raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if action == "preupload":
                return self._preupload(repo, revision, json.loads(body))
            return self._commit(repo, revision, body)
        raise HubHTTPError(404, f"the test hub does not implement {method} /api/.../{rest}")

    def _commit_of(self, repo: Repo, revision: str) -> str:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _repo_info(self, repo: Repo, revision: str) -> None:
        commit = self._commit_of(repo, revision)
        self._json(200, {"id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit,
                         "private": repo.private, "disabled": False, "gated": False, "tags": [], "downloads": 0,
                         "likes": 0, "lastModified": _now(),
                         "siblings": [{"rfilename": path} for path in sorted(repo.commits[commit])]})

    def _tree(self, repo: Repo, revision: str, folder: str, recursive: bool) -> None:
        files = repo.commits[self._commit_of(repo, revision)]
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        if prefix and not any(path.startswith(prefix) for path in files):
            raise HubHTTPError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        entries, folders = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            relative = path[len(prefix):].split("/")
            for depth in range(1, len(relative)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(relative[:depth]))
            if recursive or len(relative) == 1:
                blob = files[path]
                entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
                entries.append(entry)
        entries += [{"type": "directory", "oid": git_blob_sha1(name.encode()), "size": 0, "path": name}
                    for name in sorted(folders)]
        self._json(200, entries)

    def _create_branch(self, repo: Repo, branch: str, payload: dict) -> None:
        if branch in repo.branches:
            raise HubHTTPError(409, f"Reference already exists: {branch}")
        repo.branches[branch] = self._commit_of(repo, payload.get("startingPoint") or "main")
        self._json(200, {})

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> None:
        files = repo.commits[repo.branches[revision]]
        answer = []
        for item in payload["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = _is_lfs(item["path"], sample) or item["size"] >= LFS_MIN_SIZE
            existing = files.get(item["path"])
            oid = None if existing is None else (existing.sha256 if existing.lfs else git_blob_sha1(existing.data))
            answer.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                           "oid": oid})
        self._json(200, {"files": answer, "commitOid": repo.branches[revision]})

    def _lfs_batch(self, repo: Repo, payload: dict) -> None:
        if payload.get("operation") != "upload" or payload.get("hash_algo", "sha256") != "sha256":
            raise HubHTTPError(400, "the test hub only implements sha256 uploads")
        objects = []
        for item in payload["objects"]:
            oid, size = item["oid"], int(item["size"])
            answer = {"oid": oid, "size": size, "authenticated": True}
            if self.hub.lfs_objects.get(oid) is None or len(self.hub.lfs_objects[oid]) != size:
                signature = self.hub.upload_signature(oid, size)
                # The PUT carries no Authorization header: the href carries its own credential.
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{oid}?size={size}&sig={signature}"},
                    "verify": {"href": f"{self.hub.url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}.git/info/lfs/"
                                       "objects/verify"}}
            objects.append(answer)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str, query: dict, body: bytes) -> None:
        size = int(query.get("size", ["-1"])[0])
        if not hmac.compare_digest(query.get("sig", [""])[0], self.hub.upload_signature(oid, size)):
            raise HubHTTPError(403, "bad upload signature")
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise HubHTTPError(400, "the uploaded bytes do not match the announced sha256 and size")
        self.hub.lfs_objects[oid] = body
        self._send(200)

    def _lfs_verify(self, payload: dict) -> None:
        data = self.hub.lfs_objects.get(payload["oid"])
        if data is None or len(data) != payload["size"]:
            raise HubHTTPError(404, f"LFS object {payload['oid']} was not uploaded")
        self._json(200, {"success": True})

    def _commit(self, repo: Repo, branch: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), None)
        if header is None or not header.get("summary"):
            raise HubHTTPError(400, "a commit needs a header line with a summary")
        if header.get("parentCommit") and header["parentCommit"] != repo.branches[branch]:
            raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
        added, deleted = {}, set()
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                added[value["path"]] = Blob(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    raise HubHTTPError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                added[value["path"]] = Blob(data, True)
            elif key in ("deletedFile", "deletedFolder"):
                deleted.add(value["path"])
            elif key != "header":
                raise HubHTTPError(400, f"the test hub does not implement commit lines of kind {key!r}")
        oid = self.hub._commit(repo, branch, added, deleted, header["summary"])
        commit_url = f"{self.hub.url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}/commit/{oid}"
        self._json(200, {"success": True, "commitOid": oid, "commitUrl": commit_url, "pullRequestUrl": None})

    def _resolve(self, method: str, repo: Repo, revision: str, path: str) -> None:
        commit = self._commit_of(repo, revision)
        blob = repo.commits[commit].get(path)
        if blob is None:
            raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound")
        data = blob.data
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": commit, "Accept-Ranges": "bytes",
                   "ETag": f'"{blob.sha256 if blob.lfs else git_blob_sha1(data)}"'}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(data))})
        status, byte_range = 200, self.headers.get("Range")
        if byte_range and (match := re.fullmatch(r"bytes=(\d+)-(\d*)", byte_range.strip())):
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(status, data, headers, head=method == "HEAD")

