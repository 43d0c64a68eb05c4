"""One I/O layer for every byte the pipeline reads or writes: local paths and fsspec URLs.

A location is a local path (`runs/demo/store`, `/data/VOC2012`) or a URL (`s3://bucket/run`,
`gs://bucket/voc`, `memory://x`, `file:///abs/path`). Everything that crosses a process or a node
(store arrays, checkpoints, model files, summaries, PNG exports, the report, the data set) is read
and written through `filesystem(url)`, so a worker on another machine needs only the URL.

Object storage:
- `s3://` needs s3fs, `gs://` needs gcsfs (optional extras: `pip install -e '.[s3]'` / `'.[gcs]'`);
  a missing one raises `MissingExtraError` naming the extra.
- Credentials come from the usual environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
  AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, ...) and are never part of a config. The standard
  environment alone points s3:// at any S3-compatible server: AWS_ENDPOINT_URL (or
  AWS_ENDPOINT_URL_S3) and AWS_DEFAULT_REGION are read here and handed to s3fs explicitly, so it
  does not depend on the botocore version honouring them.
- Non-secret options (endpoint URL, region, profile name) may also be given in the run config's
  `storage` section; they are passed as fsspec storage options.
- The artifact store's per-image entries and `fetch` (the data set's images and masks) on s3:// go through
  obstore (`object_store`, part of the s3 extra) when a key is in the environment: the same objects, a fifth
  of s3fs's CPU per request. Everything else, and every s3:// location without obstore or with a profile,
  goes through s3fs. Both clients' requests pass rca_core.object_io (the only module that calls obstore,
  and the one place a policy for object-storage requests, such as retries, would go).
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from rca_core import object_io
from rca_core.object_io import cat_file, one_read_kwargs  # noqa: F401 - part of this module's API

EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


class MissingExtraError(ImportError):
    """A URL scheme whose fsspec implementation is not installed."""


def is_url(location: str | os.PathLike | None) -> bool:
    """True for a remote (non-local) URL such as s3://..., gs://..., memory://...; False for local paths."""
    if location is None or isinstance(location, os.PathLike):
        return False
    s = str(location)
    return "://" in s and not s.startswith("file://")


def protocol(location: str | os.PathLike) -> str:
    s = str(location)
    return s.split("://", 1)[0] if "://" in s else "file"


def local_path(location: str | os.PathLike) -> str:
    """A local location as a plain path (file:// stripped). Refuses remote URLs."""
    s = str(location)
    if is_url(s):
        raise ValueError(f"{s} is a remote URL, not a local path")
    return s[len("file://"):] if s.startswith("file://") else s


def absolute(location: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """URLs unchanged; local paths made absolute against `base` (default: the working directory)."""
    if is_url(location):
        return str(location)
    p = Path(local_path(location)).expanduser()
    return str((Path(base or Path.cwd()) / p).resolve()) if not p.is_absolute() else str(p.resolve())


def join(location: str, *parts: str) -> str:
    out = str(location).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def options_for(location: str, storage: Any = None) -> dict:
    """fsspec storage options for `location` from the run config's storage section (or a dict) and the
    standard environment. Never holds credentials: those stay in the environment / profile."""
    proto = protocol(location)
    if isinstance(storage, dict):
        given = dict(storage)
    elif storage is not None:
        given = {k: v for k, v in storage.model_dump().items() if v not in (None, {}, "")}
    else:
        given = {}
    if proto in ("s3", "s3a", "gs", "gcs") and storage is not None:
        configure_requests(given)
    if proto in ("s3", "s3a"):
        # no directory-listing cache: other processes (workers on other nodes) add objects all the time, and a
        # cached listing would hide them (finished images, checkpoints, manifest parts)
        opts: dict = {"use_listings_cache": False}
        # botocore: one attempt per call (the project's policy retries: rca_core.object_io), one try's timeouts
        opts["config_kwargs"] = {"retries": {"mode": "standard", "total_max_attempts": 1}, "connect_timeout": 5,
                                 "read_timeout": object_io.policy().attempt_timeout_s}
        endpoint = given.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = given.get("region") or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if endpoint:
            opts["endpoint_url"] = endpoint
        if region:
            opts.setdefault("client_kwargs", {})["region_name"] = region
        if given.get("profile"):
            opts["profile"] = given["profile"]
        if given.get("anon"):
            opts["anon"] = True
        return opts
    if proto in ("gs", "gcs"):
        opts = {"cache_timeout": 0}  # no listing cache (see s3 above)
        if given.get("endpoint_url"):
            opts["endpoint_url"] = given["endpoint_url"]
        if given.get("project"):
            opts["project"] = given["project"]
        if given.get("anon"):
            opts["token"] = "anon"
        return opts
    return {}


def configure_requests(storage: Any = None) -> None:
    """This process's object-storage retry policy from the run config's storage section (or its dict): retries,
    timeout_s, backoff_s, backoff_max_s (rca_core.object_io.RetryPolicy)."""
    given = storage if isinstance(storage, dict) else (storage.model_dump() if storage is not None else {})
    base = object_io.RetryPolicy()
    policy = object_io.RetryPolicy(
        retries=int(given.get("retries", base.retries)), deadline_s=float(given.get("timeout_s", base.deadline_s)),
        backoff_s=float(given.get("backoff_s", base.backoff_s)),
        backoff_max_s=float(given.get("backoff_max_s", base.backoff_max_s)))
    endpoint = given.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    object_io.configure(policy, endpoint or "")


_S3FS_REGISTERED = False


def _register_s3fs() -> None:
    """Every s3:// file system of this process (ours, zarr-python's, pyarrow's through ours) is s3fs under the
    project's retry policy (rca_core.s3fs_retrying)."""
    global _S3FS_REGISTERED
    if not _S3FS_REGISTERED:
        from rca_core.s3fs_retrying import RetryingS3FileSystem

        for proto in ("s3", "s3a"):
            fsspec.register_implementation(proto, RetryingS3FileSystem, clobber=True)
        _S3FS_REGISTERED = True


def filesystem(location: str | os.PathLike, storage: Any = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a local path or URL; clear error for a missing extra."""
    s = str(location)
    proto = protocol(s)
    if proto in EXTRAS:
        module, extra = EXTRAS[proto]
        try:
            __import__(module)
        except ImportError:
            raise MissingExtraError(f"{s}: {proto}:// URLs need the {module} package; install the extra: "
                                    f"pip install -e '.[{extra}]'") from None
        if module == "s3fs":
            _register_s3fs()
    if not is_url(s):
        return fsspec.filesystem("file"), local_path(s)
    try:
        return fsspec.core.url_to_fs(s, **options_for(s, storage))
    except (ImportError, ValueError) as e:
        raise MissingExtraError(f"{s}: no file system for {proto}:// ({e})") from None


@dataclass(frozen=True)
class FileRef:
    """One file at a location: read, write (atomic), test. Picklable (fsspec file systems are)."""

    fs: Any
    path: str
    uri: str

    def exists(self) -> bool:
        return bool(object_io.request(self.path, self.fs.exists, self.path))

    def read_bytes(self) -> bytes:
        try:  # fsspec's own read: s3fs splits a large object (a checkpoint) into concurrent ranged GETs
            return object_io.request(self.path, self.fs.cat_file, self.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"file not found: {self.uri}") from None

    def write_bytes(self, data: bytes) -> None:
        """Local: write a sibling temp file, then rename (a killed writer leaves no half file).
        Object storage: one PUT, which is atomic by itself."""
        parent = self.path.rsplit("/", 1)[0] if "/" in self.path else ""
        if is_local_fs(self.fs):
            if parent:
                os.makedirs(parent, exist_ok=True)
            tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.partial"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        object_io.request(self.path, self.fs.pipe_file, self.path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def size(self) -> int:
        return int(object_io.request(self.path, self.fs.size, self.path))

    def remove(self) -> None:
        if self.exists():
            object_io.request(self.path, self.fs.rm, self.path)

    def __str__(self) -> str:
        return self.uri


def is_local_fs(fs: Any) -> bool:
    protos = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protos or "local" in protos


def file_ref(location: str | os.PathLike, storage: Any = None) -> FileRef:
    fs, path = filesystem(location, storage)
    return FileRef(fs, path, str(location))


def read_bytes(location: str | os.PathLike, storage: Any = None) -> bytes:
    return file_ref(location, storage).read_bytes()


def write_bytes(location: str | os.PathLike, data: bytes, storage: Any = None) -> None:
    file_ref(location, storage).write_bytes(data)


def exists(location: str | os.PathLike, storage: Any = None) -> bool:
    fs, path = filesystem(location, storage)
    return bool(fs.exists(path))


def is_dir(location: str | os.PathLike, storage: Any = None) -> bool:
    fs, path = filesystem(location, storage)
    try:
        return bool(fs.isdir(path))
    except FileNotFoundError:
        return False


def credentials_problem(location: str, storage: Any = None) -> str | None:
    """Why this process cannot sign requests to `location` (no AWS credentials found: no key in the environment,
    no profile, no instance profile or web identity), in words; None when it can, or the location needs none."""
    if protocol(location) not in ("s3", "s3a"):
        return None
    opts = options_for(location, storage)
    if opts.get("anon"):
        return None
    try:
        import botocore.session

        session = botocore.session.Session(profile=opts.get("profile"))
        if session.get_credentials() is not None:
            return None
    except Exception as e:  # noqa: BLE001 - a broken profile or config file: say so
        return f"the AWS credentials could not be loaded ({type(e).__name__}: {e})"
    where = f"profile {opts['profile']!r}" if opts.get("profile") else "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    return (f"no AWS credentials on this node for {location}: none in the environment ({where}), no shared "
            "credentials file, no instance profile or web identity; give the node its credentials (an instance "
            "profile, the pod its Secret, or the variables in the environment that starts its Ray)")


REFUSED = re.compile(r"\b(InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|Forbidden|ExpiredToken|"
                     r"InvalidToken|PermissionDenied|Unauthenticated|403)\b")


def refused_credentials(e: BaseException, location: str) -> bool:
    """Whether an error reading `location` means the object store refused the credentials (wrong key, secret or
    token). Never for a local path (a missing local file is not a credentials problem, whatever its name holds);
    error codes are matched as whole words over the error and its causes."""
    if protocol(location) in ("file", "local", ""):
        return False
    chain = object_io.error_chain(e)
    if isinstance(e, FileNotFoundError):
        return False
    heads = (f"{type(x).__name__} {str(x).splitlines()[0] if str(x) else ''}" for x in chain)
    return any(isinstance(x, PermissionError) for x in chain) or any(REFUSED.search(h) for h in heads)


def upload_tree(local_dir: str | os.PathLike, location: str, storage: Any = None) -> int:
    """Copy a local directory tree to a location (files only); returns the number of files copied."""
    fs, root = filesystem(location, storage)
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    if is_local_fs(fs):
        for p in files:
            file_ref(join(root, p.relative_to(local_dir).as_posix())).write_bytes(p.read_bytes())
        return len(files)
    lpaths = [str(p) for p in files]
    rpaths = [join(root, p.relative_to(local_dir).as_posix()) for p in files]
    fs.put(lpaths, rpaths)
    return len(files)


def content_hash(location: str | os.PathLike, storage: Any = None, length: int = 16) -> str:
    """sha256 of a file's bytes (streamed), for fingerprints that must not depend on where a file lives."""
    fs, path = filesystem(location, storage)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:length]


def host() -> str:
    """This machine's name, for error messages that must name the node."""
    return socket.gethostname()


__all__ = ["MissingExtraError", "FileRef", "is_url", "protocol", "local_path", "absolute", "join", "options_for",
           "filesystem", "file_ref", "read_bytes", "write_bytes", "exists", "is_dir", "upload_tree",
           "content_hash", "host", "credentials_problem", "refused_credentials", "is_local_fs", "cat_file", "one_read_kwargs", "fetch", "process_object_store"]


def object_store(location: str, storage: Any = None):
    """An obstore (Rust object_store) client for an s3:// location, or None where the fsspec path must serve:
    obstore not installed, another scheme, a named profile, or no key in the environment (profiles, config
    files and SSO are s3fs's to resolve). The store's per-image requests go through it: measured on SeaweedFS,
    0.4-0.6 ms of Python CPU per two-object entry against s3fs's 2-4.5 ms (docs/benchmarks.md), which on a
    busy node is CPU taken from the stage. Same environment and options as `options_for`; never a credential
    in a config. Made by rca_core.object_io (`s3_client`), the one module that calls obstore."""
    if protocol(location) not in ("s3", "s3a"):
        return None
    return object_io.s3_client(_bucket(location), options_for(location, storage))


def process_object_store(location: str, storage: Any = None):
    """`object_store(location, storage)` made once per process, bucket and settings (a forked child, or a Ray
    worker, makes its own: a client must not be shared across processes); None where fsspec serves."""
    if protocol(location) not in ("s3", "s3a"):
        return None
    return object_io.process_s3_client(_bucket(location), options_for(location, storage))


def _bucket(location: str) -> str:
    return object_io.split_key(str(location).split("://", 1)[1])[0]


def fetch(fs, path: str, location: str, storage: Any = None) -> bytes:
    """The bytes of the file at `path` (a path of `fs`, under `location`) in one request: through obstore for an
    s3:// location where `object_store` serves (less client CPU), else fsspec without s3fs's size request.
    A missing file is FileNotFoundError on either path."""
    return object_io.get(fs, path, process_object_store(location, storage))
