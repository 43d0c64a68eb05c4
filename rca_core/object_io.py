"""Requests to object storage: the one module that calls obstore, and the one place a policy for the requests
that pass here (retries, timeouts, request counting) would go. They are the artifact store's (per-image entries,
listings, manifest, tables, files), rca_core.storage's FileRef and `fetch` (the data set's images and masks);
zarr-python's own requests (the store's group metadata and whole arrays) go through its FsspecStore instead.

Two clients reach an s3:// location: obstore (the Rust object_store, used where `s3_client` makes one: ~a fifth of
s3fs's Python CPU per request) and fsspec (s3fs, gcsfs, or the local file system; everything else). Callers hand
in the fsspec file system, the path inside it (object storage: `bucket/key`, as fsspec writes it) and, where one
serves, the obstore client; the functions here pick the client and make every answer look the same:

- `get(fs, path, client)`: one file's bytes in one request; a missing file is FileNotFoundError on every path.
- `get_many(fs, paths, client)`: several files concurrently, {path: bytes or the exception} (fsspec's
  `on_error="return"` shape), a missing file as FileNotFoundError.
- `put_many(fs, files, client)`: several files; through obstore one after the other in the given order, through
  fsspec in one concurrent round trip.
- `request(path, fn, ...)`: any other call that reaches object storage (fsspec's listings, `pipe_file`, ...), so
  that it passes the same point.

Every request goes through `request` (blocking) or its async twin `_request_async` (inside `get_many`'s event
loop), side by side below; both map obstore's NotFoundError (not an OSError) to FileNotFoundError
(`_as_file_error`). A retry policy belongs in that pair and nowhere else. obstore's own retry settings, should
they be wanted instead, are given where its client is made (`s3_client`).

This module imports nothing from the rest of the project, so both the I/O layer (rca_core.storage) and the
artifact store (rca_core.store) build on it.
"""
from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable


def split_key(path: str) -> tuple[str, str]:
    """(bucket, key) of an object-storage path as fsspec writes it: `bucket/key/...` (no scheme)."""
    bucket, _, key = str(path).partition("/")
    return bucket, key


def is_not_found(e: BaseException) -> bool:
    """Whether an error of either client means "no such object" (obstore's NotFoundError is not an OSError)."""
    return isinstance(e, FileNotFoundError) or type(e).__name__ == "NotFoundError"


def _as_file_error(e: BaseException, path: str) -> BaseException:
    """The error a caller sees: "no such object" of either client as FileNotFoundError, anything else unchanged."""
    return FileNotFoundError(path) if is_not_found(e) and not isinstance(e, FileNotFoundError) else e


# ------------------------------------------------------------------------------------------------ retry policy
# One retry policy for every object-storage request of a process, on both paths: obstore requests are retried here
# (`request`, `_request_async`, with obstore's own retries off), s3fs/botocore requests by rca_core.s3fs_retrying
# (every S3 call s3fs makes, zarr-python's and pyarrow's included, with s3fs's and botocore's own retries off).
# Bounded attempts with full-jitter exponential backoff for throttling (503 SlowDown), server errors (500, 502,
# 503, 504), timeouts and connection resets; a total deadline per request; counters (requests, retries, gave up).
# The run config's `storage` section sets it (rca_core.storage.configure_requests).
@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 10            # tries after the first
    deadline_s: float = 120.0    # a request (all its tries and waits) gives up after this long
    backoff_s: float = 0.1       # the first wait (at most; full jitter)
    backoff_max_s: float = 20.0  # the longest wait

    def wait(self, retry: int) -> float:
        return random.uniform(0.0, min(self.backoff_max_s, self.backoff_s * 2 ** retry))

    @property
    def attempt_timeout_s(self) -> float:
        """One try's timeout (connect + answer), so that a server that hangs cannot eat the whole deadline."""
        return max(1.0, min(30.0, self.deadline_s / 2))


class StorageUnavailable(OSError):
    """Object storage did not answer a request usefully within the policy (attempts or deadline): names the endpoint,
    the request and the last error."""


class RequestStats:
    """Counters of this process's object-storage requests (thread-safe)."""

    KEYS = ("requests", "retries", "gave_up")

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(self.KEYS, 0)
        self.last_error = ""

    def add(self, key: str, n: int = 1, error: BaseException | None = None) -> None:
        with self._lock:
            self.counts[key] += n
            if error is not None:
                self.last_error = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"

    def snapshot(self) -> dict:
        with self._lock:
            return {**self.counts, "last_error": self.last_error}


STATS = RequestStats()
_POLICY = RetryPolicy()
_ENDPOINT = ""  # where requests go, for messages (set with the policy)


def configure(policy: RetryPolicy, endpoint: str = "") -> None:
    """This process's retry policy (from the run config's storage section) and the endpoint messages name."""
    global _POLICY, _ENDPOINT
    _POLICY = policy
    if endpoint:
        _ENDPOINT = endpoint


def policy() -> RetryPolicy:
    return _POLICY


def stats_since(before: dict | None) -> dict:
    """The requests, retries and give-ups since `before` (a STATS.snapshot()), with the last error if any."""
    now = STATS.snapshot()
    out = {k: now[k] - (before or {}).get(k, 0) for k in RequestStats.KEYS}
    if out["retries"] or out["gave_up"]:
        out["last_error"] = now["last_error"]
    return out


def summary_fields(*parts: dict | None) -> dict:
    """The stage summary's storage counters from several stats_since() parts (driver, workers): storage_requests,
    storage_retries, storage_gave_up and, when anything was retried or given up, storage_last_error."""
    out = {f"storage_{k}": sum(int((p or {}).get(k, 0)) for p in parts) for k in RequestStats.KEYS}
    errors = [p["last_error"] for p in parts if p and p.get("last_error")]
    if errors and (out["storage_retries"] or out["storage_gave_up"]):
        out["storage_last_error"] = errors[-1]
    return out


_TRANSIENT_TEXT = ("SlowDown", "Slow Down", "reduce your request rate", "ServiceUnavailable", "Service Unavailable",
                   "InternalError", "Internal Server Error", "Bad Gateway", "Gateway Timeout",
                   "We encountered an internal error", "RequestTimeout", "Throttl", "TooManyRequests", "503", "500",
                   "502", "504", "Connection reset", "connection reset", "Connection refused", "connection refused",
                   "Broken pipe", "timed out", "Timeout", "timeout", "IncompleteRead", "incomplete", "ServerDisconnected",
                   "Server disconnected", "ConnectionClosed", "ClientPayloadError", "Response payload is not completed",
                   "EndpointConnectionError", "Could not connect", "error sending request", "connection closed",
                   "Connection aborted", "ContentLengthError", "unexpected EOF", "hyper")


def error_chain(e: BaseException | None, limit: int = 8) -> list[BaseException]:
    """An error and its causes (explicit `from`, else the context), at most `limit`, no cycle."""
    chain: list[BaseException] = []
    while e is not None and len(chain) < limit and all(e is not x for x in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def retryable(e: BaseException) -> bool:
    """Whether a request's error is worth another try: throttling, a server error, a timeout, a dropped connection.
    "No such object", refused credentials, a failed precondition and the caller's own errors are not. The error's
    causes count too (s3fs turns botocore's error into an OSError whose text loses the S3 error code)."""
    if isinstance(e, (FileNotFoundError, PermissionError, StorageUnavailable)) or is_not_found(e):
        return False
    chain = error_chain(e)
    if any(isinstance(x, (ConnectionError, TimeoutError, asyncio.TimeoutError)) for x in chain):
        return True
    text = " ".join(f"{type(x).__name__} {x}" for x in chain)
    if any(s in text for s in ("PreconditionFailed", "pre-conditions", "AlreadyExists", "Precondition",
                               "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket")):
        return False
    return any(s in text for s in _TRANSIENT_TEXT)


def _gave_up(what: str, tries: int, t0: float, last: BaseException, pol: RetryPolicy) -> StorageUnavailable:
    STATS.add("gave_up", error=last)
    where = _ENDPOINT or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    return StorageUnavailable(
        f"object storage at {where} gave no usable answer to {what} for {time.monotonic() - t0:.1f} s ({tries} "
        f"tries; storage.retries {pol.retries}, storage.timeout_s {pol.deadline_s:g}); last error: "
        f"{type(last).__name__}: {str(last).splitlines()[0][:300] if str(last) else ''}")


def _next_pause(what: str, e: Exception, tries: int, t0: float, pol: RetryPolicy) -> float:
    """After a try failed with `e`: how long to wait before the next one; raises `e` when a retry cannot fix it
    and StorageUnavailable when the policy's tries or deadline are spent."""
    if not retryable(e):
        raise e
    pause = pol.wait(tries - 1)
    if tries > pol.retries or time.monotonic() - t0 + pause > pol.deadline_s:
        raise _gave_up(what, tries, t0, e, pol) from e
    STATS.add("retries", error=e)
    return pause


def with_retries(what: str, call: Callable[[], Any]) -> Any:
    """`call()` under the policy (blocking)."""
    pol, t0, tries = _POLICY, time.monotonic(), 0
    STATS.add("requests")
    while True:
        tries += 1
        try:
            return call()
        except Exception as e:
            pause = _next_pause(what, e, tries, t0, pol)
        time.sleep(pause)


async def with_retries_async(what: str, make: Callable[[], Awaitable[Any]]) -> Any:
    """`await make()` under the policy (`make()` starts the request anew each try)."""
    pol, t0, tries = _POLICY, time.monotonic(), 0
    STATS.add("requests")
    while True:
        tries += 1
        try:
            return await make()
        except Exception as e:
            pause = _next_pause(what, e, tries, t0, pol)
        await asyncio.sleep(pause)


def request(path: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """`fn(*args, **kwargs)`: one request for `path` (the object it concerns, named in a FileNotFoundError)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        mapped = _as_file_error(e, path)
        if mapped is e:
            raise
        raise mapped from None


async def _request_async(path: str, make: Callable[[], Awaitable[Any]]) -> Any:
    """`request` for a coroutine (`make()` starts the request)."""
    try:
        return await make()
    except Exception as e:
        mapped = _as_file_error(e, path)
        if mapped is e:
            raise
        raise mapped from None


# ------------------------------------------------------------------------------------------------ fsspec options
def one_read_kwargs(fs) -> dict:
    """Keyword arguments that make `fs.cat_file` / `fs.cat` fetch a whole file in one request: s3fs otherwise asks
    each object's size first (a HEAD before the GET) to decide whether to split the read."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return {"max_concurrency": 1} if "s3" in protocols else {}


def cat_file(fs, path: str) -> bytes:
    """The bytes of one small file through fsspec (a per-image entry, an image), one request on object storage.
    Large files (checkpoints) go through `fs.cat_file` itself, which s3fs reads in concurrent parts."""
    return request(path, fs.cat_file, path, **one_read_kwargs(fs))


# ------------------------------------------------------------------------------------------------ requests
def get(fs, path: str, client=None) -> bytes:
    """The bytes of the file at `path` in one request: through obstore with a client, else through fsspec."""
    if client is None:
        return cat_file(fs, path)
    import obstore

    return request(path, with_retries, f"GET {path}", lambda: bytes(obstore.get(client, split_key(path)[1]).bytes()))


def get_many(fs, paths: list[str], client=None) -> dict[str, Any]:
    """{path: bytes, or the exception of its request} of several files fetched concurrently (a missing file:
    FileNotFoundError). obstore's requests run on an event loop of their own; inside a running loop (a caller's
    async code) fsspec serves instead."""
    if client is not None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread (the usual case: workers, I/O threads)
            return dict(zip(paths, asyncio.run(_get_all_async(client, paths))))
    got = request(paths[0], fs.cat, paths, on_error="return", **one_read_kwargs(fs))
    return {p: _as_file_error(v, p) if isinstance(v, BaseException) else v for p, v in got.items()}


async def _get_all_async(client, paths: list[str]) -> list:
    import obstore

    async def one(path):
        async def get():
            return bytes(await (await obstore.get_async(client, split_key(path)[1])).bytes_async())

        async def make():
            return await with_retries_async(f"GET {path}", get)
        try:
            return await _request_async(path, make)
        except Exception as e:  # noqa: BLE001 - handed back, as fsspec's on_error="return" does
            return e

    return await asyncio.gather(*(one(p) for p in paths))


def put_many(fs, files: dict[str, bytes], client=None) -> None:
    """Write {path: bytes}. Through obstore one PUT after the other in the dict's order (each finished before the
    next starts: a caller that puts a marker last relies on it); through fsspec all in one concurrent round trip
    (no order)."""
    if client is None:
        request(next(iter(files)), fs.pipe, files)
        return
    import obstore

    for path, data in files.items():
        request(path, with_retries, f"PUT {path}", lambda p=path, d=data: obstore.put(client, split_key(p)[1], d))


# ------------------------------------------------------------------------------------------------ obstore clients
def s3_client(bucket: str, options: dict):
    """An obstore S3 client for `bucket` with fsspec's s3 `options` (endpoint_url, region, anon, profile), or None
    where fsspec must serve: obstore not installed, a named profile, or no key in the environment (profiles,
    config files and SSO are s3fs's to resolve). Credentials come from the environment only (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)."""
    try:
        from obstore.store import S3Store
    except ImportError:
        return None
    anon = bool(options.get("anon"))
    if options.get("profile") or not (anon or os.environ.get("AWS_ACCESS_KEY_ID")):
        return None
    kw: dict = {"region": (options.get("client_kwargs") or {}).get("region_name") or "us-east-1"}
    endpoint = options.get("endpoint_url")
    if endpoint:
        kw["endpoint"] = endpoint
        kw["allow_http"] = endpoint.startswith("http://")
        kw["virtual_hosted_style_request"] = False  # path-style, as s3fs with an endpoint
    if anon:
        kw["skip_signature"] = True
    else:
        kw["access_key_id"] = os.environ["AWS_ACCESS_KEY_ID"]
        kw["secret_access_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kw["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    t = f"{policy().attempt_timeout_s:g}s"
    return S3Store(bucket, retry_config={"max_retries": 0}, client_options={"timeout": t, "connect_timeout": "5s"},
                   **kw)


_CLIENTS: dict[tuple, Any] = {}


def process_s3_client(bucket: str, options: dict):
    """`s3_client(bucket, options)` made once per process, bucket, options and key (a forked child, or a Ray worker,
    makes its own: a client must not be shared across processes)."""
    key = (os.getpid(), bucket, repr(sorted(options.items())),
           os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SESSION_TOKEN"))
    if key not in _CLIENTS:
        _CLIENTS[key] = s3_client(bucket, options)
    return _CLIENTS[key]


# ------------------------------------------------------------------------------------------------ conditional writes
# A small record that several processes (drivers on other machines) update (a stage's lease): read it with its
# version, then write it only if it is still that version (or still absent), so that two writers never both win.
# Object storage: S3's conditional requests (If-None-Match: * and If-Match: <ETag>, through s3fs/botocore); a local
# file system: a lock file held around the check and the write (fcntl.flock; a shared network file system must
# support it).
def _is_s3(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols or "s3a" in protocols


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _precondition_failed(e: BaseException) -> bool:
    """S3 refused a conditional write (412 PreconditionFailed, 409 ConditionalRequestConflict); s3fs hands both back
    as an OSError whose text says so."""
    text = f"{type(e).__name__} {e}"
    return any(s in text for s in ("PreconditionFailed", "pre-conditions you specified", "ConditionalRequestConflict",
                                   "412", "AlreadyExists"))


def _local_version(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:16]


class _LocalLock:
    def __init__(self, path: str):
        self.path = path + ".lock"

    def __enter__(self):
        import fcntl

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.f = open(self.path, "a+")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _s3_call(fs, method: str, **kwargs):
    """One S3 API call through s3fs's `_call_s3`, looked up on the instance (the retrying subclass's, where
    rca_core.s3fs_retrying serves; s3fs's own `call_s3` is bound to the base class's method)."""
    from fsspec.asyn import sync

    return sync(fs.loop, fs._call_s3, method, **kwargs)


def read_versioned(fs, path: str) -> tuple[bytes, str] | None:
    """(bytes, version) of a small record, or None when there is none. The version is what `put_if` compares."""
    if _is_local(fs):
        with _LocalLock(path):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None
        return data, _local_version(data)
    if _is_s3(fs):
        from fsspec.asyn import sync

        bucket, key = split_key(path)

        async def get():
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with resp["Body"] as body:
                return await body.read(), resp["ETag"]

        try:
            return request(path, sync, fs.loop, get)
        except FileNotFoundError:
            return None
    try:  # other file systems: no conditional write; the content is the version (best effort)
        data = request(path, fs.cat_file, path)
    except FileNotFoundError:
        return None
    return data, _local_version(data)


def put_if(fs, path: str, data: bytes, version: str | None) -> str | None:
    """Write `data` only if the record is still at `version` (None: only if there is no record yet). Returns the new
    version, or None when another writer got there first."""
    if _is_local(fs):
        with _LocalLock(path):
            try:
                with open(path, "rb") as f:
                    now = _local_version(f.read())
            except FileNotFoundError:
                now = None
            if now != version:
                return None
            tmp = f"{path}.{os.getpid()}.partial"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return _local_version(data)
    if _is_s3(fs):
        bucket, key = split_key(path)
        cond = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            resp = request(path, _s3_call, fs, "put_object", Bucket=bucket, Key=key, Body=data, **cond)
        except Exception as e:  # noqa: BLE001
            if _precondition_failed(e):
                return None
            raise
        return resp.get("ETag") or _local_version(data)
    got = read_versioned(fs, path)
    if (got[1] if got else None) != version:
        return None
    request(path, fs.pipe_file, path, data)
    return _local_version(data)


def delete_if(fs, path: str, version: str) -> bool:
    """Remove the record only if it is still at `version`; False when it changed (or is gone)."""
    if _is_local(fs):
        with _LocalLock(path):
            try:
                with open(path, "rb") as f:
                    if _local_version(f.read()) != version:
                        return False
            except FileNotFoundError:
                return False
            os.unlink(path)
        return True
    if _is_s3(fs):
        bucket, key = split_key(path)
        try:
            request(path, _s3_call, fs, "delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except FileNotFoundError:
            return False
        except Exception as e:  # noqa: BLE001
            if _precondition_failed(e):
                return False
            raise
        return True
    got = read_versioned(fs, path)
    if not got or got[1] != version:
        return False
    request(path, fs.rm, path)
    return True
