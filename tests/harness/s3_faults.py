"""A fault-injecting HTTP proxy in front of an S3 endpoint (e.g. the SeaweedFS of harness.s3_server), for tests of
how the project's S3 clients (s3fs/botocore, obstore) and their retry policy cope with what real S3 and a shared
network throw at a run.

    with SeaweedS3(tmp_path / "s3") as s3, S3Faults(s3, seed=7) as faults:
        env = faults.env                      # s3.env with AWS_ENDPOINT_URL -> the proxy, + RCA_TEST_S3_FAULTS
        faults.endpoint                       # http://127.0.0.1:<port>, for storage.endpoint_url / endpoint_url=
        faults.set(slowdown=0.1)              # 10 % of all requests answer 503 SlowDown
        faults.set(internal_error=Fault(0.05, methods=["GET"], prefix="/bucket/run/"))
        faults.set(reset=Fault(0.2, methods=["GET"], cut=0.5))   # half the body, then a TCP reset
        faults.set(latency=Fault(0.1, delay=0.5))                 # 0.5 s before forwarding, 10 % of requests
        faults.blackout(2.0)                  # now: every connection reset for 2 s (mode="refuse": refused)
        faults.blackout(1.0, at=time.time() + 5)                  # or later
        faults.counters()                     # {"requests": ..., "slowdown": ..., "reset": ..., ...}
        faults.log()                          # [{"n", "t", "method", "path", "kind", ...}, ...] what was injected
        faults.clear(); faults.reset()        # all rates 0; counters, log and the seeded sequence back to zero

Design: the proxy is its own process (this file run as a script: stdlib asyncio only, so any interpreter can
run it), listening on a free port of 127.0.0.1, with a small JSON control API on a second port. `S3Faults`
starts and stops that process (a context manager, every wait bounded; the proxy also stops by itself when
the process that started it is gone); `FaultControl(url)` is the control
client alone, usable from any process on the machine: a subprocess, a Ray worker on either node of a local
two-node cluster, `rca run` (it finds the URL in the environment variable RCA_TEST_S3_FAULTS that `env`
hands out: `FaultControl.from_env()`). The control port is never blacked out.

What it forwards: every request as it came, byte for byte (request line, headers in order, Host included:
SigV4 signs the Host the client used, and the upstream server checks it), the body streamed by its framing
(Content-Length, or chunked: chunks and trailers copied as they are; a body of up to 64 KiB not waiting for
100 Continue is read first and sent with its head), `Expect: 100-continue` (the client's body is copied once
it comes, the upstream's interim 100 is passed back), the response likewise (Content-Length, chunked, or until
close; HEAD, 1xx, 204 and 304 without a body). Each client connection gets one upstream connection of its own
(opened at its first forwarded request, reopened when the upstream closed it; a request whose bytes are all
in hand is sent once more when a kept upstream connection turns out closed), so the client's keep-alive is
kept, and a connection closes when either side asks for `Connection: close`. Not handled: HTTPS, HTTP/2,
protocol upgrades (S3 clients on an http:// endpoint use none of them).

Cost, measured on a shared 2-core machine against SeaweedFS: ~0.2 ms of proxy CPU per small request;
sequential 1 KB GETs through obstore 1004/s through the proxy vs 1462/s direct, 16 MB GETs 570 vs 838 MB/s.

What it injects, per request, at set rates (fractions of requests):
- "slowdown": 503 Slow Down with S3's XML error (`<Error><Code>SlowDown</Code><Message>Please reduce your
  request rate.</Message>...`), without contacting the upstream;
- "internal_error": 500 with `<Code>InternalError</Code>`, likewise;
- "reset": the request is forwarded; of its response the client gets the status line and headers (the full
  Content-Length) and the first `cut` fraction of the body, then a TCP reset (SO_LINGER 0). A response without
  a body (HEAD, a PUT's 200, a DELETE's 204) is cut before its first byte: the upstream did the work, the client
  sees a reset and no answer;
- "latency": a delay of `delay` seconds before the request is handled (may come with one of the above).
An error answer to a request whose body follows (no `Expect: 100-continue`) is sent once the body has been
read, on a connection that stays open; with `Expect: 100-continue` the body is not waited for and the
connection closes after the answer (as a server that refuses the body must). HEAD answers carry no body.

At most one of slowdown / internal_error / reset per request: one seeded draw u in [0, 1) per request, and the
kinds whose filter matches split it in that order (u < r_slowdown: slowdown; < r_slowdown + r_internal_error:
internal_error; ...). Latency draws its own u. Each draw is a hash of (seed, method, decoded URL path, how
many requests with that method and path came before), not of arrival order: the same requests with the same
seed get the same faults however concurrent clients interleave. Per kind, the filters `methods` (e.g. ["GET"]),
`prefix` (the decoded URL path, "/bucket/key...", starts with it; a listing's path is "/bucket"), `query` (a
substring of the raw query string: "list-type=" picks listings, "uploadId=" multipart parts) and `limit` (at
most this many of the kind until the next `reset()`).

Blackout, `blackout(seconds, at=None, mode="reset")`: for the window (from now, or from the wall-clock time
`at`) every open client connection is aborted at its start with a TCP reset, and (mode "reset") every new
connection is accepted and reset at once, or (mode "refuse") the listening socket is closed so that connects
are refused (ECONNREFUSED); after the window the proxy serves again on the same port. Refused connects never
reach the proxy and are not counted.

Counters (`counters()`): requests (request heads read), forwarded, one per fault kind (slowdown,
internal_error, reset, latency, blackout: reset connections and aborted requests), blackout_idle (idle
keep-alive connections dropped at a blackout's start), connections (accepted), upstream_errors (upstream
unreachable or broken: the client's connection is reset; never injected, so a test can assert 0), and the
wire features seen (expect_100_continue, chunked_requests, chunked_responses), by_method. `log()` lists each
injected fault (and each upstream error) with the request number n, time t, method, path (decoded, no query),
kind and details (status, length, sent bytes for a reset; delay for latency).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import email.utils
import hashlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

ERROR_KINDS = ("slowdown", "internal_error", "reset")  # one draw, split in this order
KINDS = (*ERROR_KINDS, "latency")
CONTROL_ENV = "RCA_TEST_S3_FAULTS"  # the control URL, in the env `S3Faults.env` hands out
LOG_CAP = 200_000                   # log entries kept (the counters go on counting)
_BUF = 256 * 1024
_SMALL_BODY = 64 * 1024             # request bodies up to this size go to the upstream with their head
_LINE_LIMIT = 1 << 20               # longest request/response head and chunk-size line accepted

_ERRORS = {  # kind: (status, reason, S3 code, message): the texts real S3 sends
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal_error": (500, "Internal Server Error", "InternalError",
                       "We encountered an internal error. Please try again."),
}


@dataclasses.dataclass
class Fault:
    """One kind's setting: `rate` (fraction of the matching requests), filters `methods` (None: all),
    `prefix` (of the decoded URL path "/bucket/key"; a listing's path is "/bucket"; None: all), `limit` (at
    most this many injections until `reset()`; None: no limit), `delay` (seconds, latency only), `cut`
    (fraction of the body sent before a reset), `query` (a substring of the raw query string, e.g.
    "list-type=" for listings, "uploadId=" for multipart requests; None: all)."""

    rate: float = 0.0
    methods: list[str] | None = None
    prefix: str | None = None
    limit: int | None = None
    delay: float = 0.0
    cut: float = 0.5
    query: str | None = None

    def __post_init__(self):
        if not 0.0 <= float(self.rate) <= 1.0:
            raise ValueError(f"rate {self.rate} outside [0, 1]")
        if not 0.0 <= float(self.cut) < 1.0:
            raise ValueError(f"cut {self.cut} outside [0, 1)")
        if self.delay < 0:
            raise ValueError(f"negative delay {self.delay}")
        self.rate, self.cut, self.delay = float(self.rate), float(self.cut), float(self.delay)
        if self.methods is not None:
            self.methods = sorted({str(m).upper() for m in self.methods})

    def matches(self, method: str, path: str, query: str = "") -> bool:
        return (self.rate > 0 and (self.methods is None or method in self.methods)
                and (self.prefix is None or path.startswith(self.prefix))
                and (self.query is None or self.query in query))


def _as_fault(value: Any) -> Fault:
    if isinstance(value, Fault):
        return value
    if isinstance(value, dict):
        return Fault(**value)
    if value is None:
        return Fault()
    return Fault(rate=float(value))


def draw(seed: int, salt: str, method: str, path: str, k: int) -> float:
    """The seeded u in [0, 1) for the k-th request (from 0) with this method and decoded path."""
    h = hashlib.blake2b(f"{seed}\0{salt}\0{method}\0{path}\0{k}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64


# =============================================================================================== the proxy process
class _Sink:
    """A writer that discards (a request body read only to keep the connection usable)."""

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass


class _Request:
    __slots__ = ("head", "method", "target", "path", "query", "headers", "length", "chunked", "expect", "close")

    def __init__(self, head: bytes):
        self.head = head
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].decode("latin-1").split(" ")
        if len(parts) != 3:
            raise ValueError(f"bad request line {lines[0][:200]!r}")
        self.method, self.target, version = parts
        self.headers = _headers(lines[1:])
        url = urllib.parse.urlsplit(self.target)
        self.path, self.query = urllib.parse.unquote(url.path), url.query
        te = self.headers.get("transfer-encoding", "").lower()
        self.chunked = "chunked" in te
        self.length = 0 if self.chunked else int(self.headers.get("content-length", "0") or 0)
        self.expect = self.headers.get("expect", "").lower() == "100-continue"
        conn = self.headers.get("connection", "").lower()
        self.close = "close" in conn or (version == "HTTP/1.0" and "keep-alive" not in conn)

    @property
    def has_body(self) -> bool:
        return self.chunked or self.length > 0


def _headers(lines: list[bytes]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        key = name.strip().lower()
        out[key] = f"{out[key]}, {value.strip()}" if key in out else value.strip()
    return out


async def _copy_n(src: asyncio.StreamReader, dst, n: int) -> None:
    while n > 0:
        data = await src.read(min(n, _BUF))
        if not data:
            raise asyncio.IncompleteReadError(b"", n)
        dst.write(data)
        n -= len(data)
        await dst.drain()


async def _copy_chunked(src: asyncio.StreamReader, dst) -> None:
    while True:
        line = await src.readuntil(b"\r\n")
        dst.write(line)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, up to the empty line
                t = await src.readuntil(b"\r\n")
                dst.write(t)
                if t == b"\r\n":
                    await dst.drain()
                    return
        await _copy_n(src, dst, size + 2)  # the data and its CRLF


async def _copy_body(src, dst, chunked: bool, length: int) -> None:
    if chunked:
        await _copy_chunked(src, dst)
    elif length:
        await _copy_n(src, dst, length)


def _unacked(sock) -> int:
    """Bytes in the kernel's send queue of `sock` not yet acknowledged by the peer (Linux SIOCOUTQ); 0 where
    it cannot be read."""
    try:
        import fcntl
        import termios

        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (ImportError, OSError, AttributeError):
        return 0


async def _delivered(writer: asyncio.StreamWriter, timeout: float) -> bool:
    """Bounded wait until what was written reached the peer: out of asyncio's buffer and acknowledged (a reset
    drops the kernel's unsent bytes, so the peer would get less than was written)."""
    deadline = time.monotonic() + timeout
    sock = writer.get_extra_info("socket")
    while time.monotonic() < deadline:
        if not writer.transport.get_write_buffer_size() and (sock is None or _unacked(sock) == 0):
            return True
        await asyncio.sleep(0.002)
    return False


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Abort the connection with a TCP reset (SO_LINGER 0), dropping what asyncio has not sent yet."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.transport.abort() if writer.transport.is_closing() else writer.close()


class _Conn:
    __slots__ = ("writer", "task", "request")

    def __init__(self, writer, task):
        self.writer, self.task, self.request = writer, task, None


class Proxy:
    """The proxy's state and servers, all on one event loop (no locks)."""

    def __init__(self, upstream: str, seed: int = 0, rules: dict | None = None):
        u = urllib.parse.urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream = upstream
        self.up_host, self.up_port = u.hostname, u.port or 80
        self.seed = int(seed)
        self.rules = {k: Fault() for k in KINDS}
        for k, v in (rules or {}).items():
            self._set_rule(k, v)
        self.port = self.control_port = 0
        self.server: asyncio.base_events.Server | None = None
        self.control: asyncio.base_events.Server | None = None
        self.conns: set[_Conn] = set()
        self.windows: dict[int, dict] = {}  # blackouts: id -> {"start", "end", "mode"}
        self.active: dict[int, str] = {}    # blackouts in force: id -> mode
        self.stopped = asyncio.Event()
        self.rebind_error = ""
        self._window_ids = 0
        self.reset()

    # ----------------------------------------------------------------------------- state
    def reset(self) -> None:
        self.counters: dict[str, Any] = {k: 0 for k in (
            "requests", "forwarded", *KINDS, "blackout", "blackout_idle", "connections", "upstream_errors",
            "expect_100_continue", "chunked_requests", "chunked_responses")}
        self.counters["by_method"] = {}
        self.log: list[dict] = []
        self.log_dropped = 0
        self.seen: dict[tuple[str, str], int] = {}

    def _set_rule(self, kind: str, value: Any) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (kinds: {', '.join(KINDS)})")
        self.rules[kind] = _as_fault(value)

    def _record(self, kind: str, req: _Request | None, n: int | None, **detail) -> None:
        if kind in self.counters:
            self.counters[kind] += 1
        if len(self.log) >= LOG_CAP:
            self.log_dropped += 1
            return
        self.log.append({"n": n, "t": time.time(), "method": req.method if req else None,
                         "path": req.path if req else None, "kind": kind, **detail})

    def decide(self, method: str, path: str, query: str = "") -> tuple[str | None, float]:
        """(error kind or None, latency delay) for the next request with this method and decoded path."""
        k = self.seen.get((method, path), 0)
        self.seen[(method, path)] = k + 1
        action = None
        u, edge = draw(self.seed, "error", method, path, k), 0.0
        for kind in ERROR_KINDS:
            rule = self.rules[kind]
            if not rule.matches(method, path, query):
                continue
            edge += rule.rate
            if u < edge:
                if rule.limit is None or self.counters[kind] < rule.limit:
                    action = kind
                break
        delay = 0.0
        lat = self.rules["latency"]
        if (lat.matches(method, path, query) and lat.delay > 0
                and draw(self.seed, "latency", method, path, k) < lat.rate
                and (lat.limit is None or self.counters["latency"] < lat.limit)):
            delay = lat.delay
        return action, delay

    @property
    def blackout_mode(self) -> str | None:
        if not self.active:
            return None
        return "refuse" if "refuse" in self.active.values() else "reset"

    # ----------------------------------------------------------------------------- servers
    @staticmethod
    def _bind(port: int) -> socket.socket:
        # proto IPPROTO_TCP, so that asyncio sets TCP_NODELAY on accepted sockets (it checks sock.proto; with
        # proto 0 a head and a small body written apart wait ~40 ms for a delayed ACK: Nagle)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(512)
        except OSError:
            s.close()
            raise
        s.setblocking(False)
        return s

    @classmethod
    def _bind_free(cls, avoid: set[int]) -> socket.socket:
        """A listening socket on a free port of 20000-32767 (below Linux's ephemeral range, where client sockets
        take their ports, so the port can be bound again after a refusing blackout)."""
        rng = random.Random()
        for _ in range(500):
            port = rng.randint(20000, 32767)
            if port in avoid:
                continue
            try:
                return cls._bind(port)
            except OSError:
                continue
        raise RuntimeError("no free port in 20000-32767 on 127.0.0.1")

    async def start(self, port: int = 0, control_port: int = 0) -> None:
        ctl = self._bind(control_port) if control_port else self._bind_free(set())
        self.control_port = ctl.getsockname()[1]
        self.control = await asyncio.start_server(self._control_client, sock=ctl, limit=_LINE_LIMIT)
        main = self._bind(port) if port else self._bind_free({self.control_port})
        self.port = main.getsockname()[1]
        self.server = await asyncio.start_server(self._client, sock=main, limit=_LINE_LIMIT)

    async def stop(self) -> None:
        for srv in (self.server, self.control):
            if srv is not None:
                srv.close()
        for c in list(self.conns):
            _rst(c.writer)
            c.task.cancel()
        self.stopped.set()

    # ----------------------------------------------------------------------------- blackouts
    def schedule_blackout(self, seconds: float, at: float | None, mode: str) -> dict:
        if mode not in ("reset", "refuse"):
            raise ValueError(f"blackout mode {mode!r}: 'reset' or 'refuse'")
        if not seconds > 0:
            raise ValueError(f"blackout of {seconds} s")
        loop = asyncio.get_running_loop()
        now = time.time()
        start = now if at is None else max(float(at), now)
        self._window_ids += 1
        wid = self._window_ids
        self.windows[wid] = {"start": start, "end": start + seconds, "mode": mode}
        if start <= now:
            self._blackout_begin(wid)  # in force before the control call answers
        else:
            loop.call_later(start - now, self._blackout_begin, wid)
        loop.call_later(start + seconds - now, lambda: asyncio.ensure_future(self._blackout_end(wid)))
        return {"id": wid, **self.windows[wid]}

    def _blackout_begin(self, wid: int) -> None:
        self.active[wid] = self.windows[wid]["mode"]
        if self.blackout_mode == "refuse" and self.server is not None and self.server.is_serving():
            self.server.close()
        for c in list(self.conns):
            if c.request is not None:
                self._record("blackout", c.request, None, detail="request in flight reset")
            else:
                self.counters["blackout_idle"] += 1
            _rst(c.writer)
            c.task.cancel()
            self.conns.discard(c)

    async def _blackout_end(self, wid: int) -> None:
        self.active.pop(wid, None)
        self.windows.pop(wid, None)
        if self.blackout_mode != "refuse" and self.server is not None and not self.server.is_serving() \
                and not self.stopped.is_set():
            deadline = time.monotonic() + 10
            while True:
                try:
                    sock = self._bind(self.port)
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        self.rebind_error = f"port {self.port} not bound again after the blackout: {e}"
                        return
                    await asyncio.sleep(0.05)
            self.server = await asyncio.start_server(self._client, sock=sock, limit=_LINE_LIMIT)

    # ----------------------------------------------------------------------------- S3 traffic
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counters["connections"] += 1
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.blackout_mode:
            self._record("blackout", None, None, detail="connection reset")
            _rst(writer)
            return
        conn = _Conn(writer, asyncio.current_task())
        self.conns.add(conn)
        up: list = [None, None]  # this connection's upstream (reader, writer)
        try:
            await self._serve(conn, reader, writer, up)
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, OSError):
            pass
        finally:
            self.conns.discard(conn)
            _close(up[1])
            if not writer.transport.is_closing():
                writer.close()

    async def _serve(self, conn: _Conn, reader, writer, up: list) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # the client closed the connection (between requests, or inside a head)
            req = _Request(head)
            conn.request = req
            self.counters["requests"] += 1
            n = self.counters["requests"]
            by = self.counters["by_method"]
            by[req.method] = by.get(req.method, 0) + 1
            self.counters["expect_100_continue"] += req.expect
            self.counters["chunked_requests"] += req.chunked
            if self.blackout_mode:
                self._record("blackout", req, n, detail="request reset")
                _rst(writer)
                return
            action, delay = self.decide(req.method, req.path, req.query)
            if delay:
                self._record("latency", req, n, delay=delay)
                await asyncio.sleep(delay)
            if action in _ERRORS:
                keep = await self._answer_error(req, n, action, reader, writer)
            else:
                keep = await self._forward(req, n, reader, writer, up, cut=action == "reset")
            conn.request = None
            if not keep:
                return

    async def _answer_error(self, req: _Request, n: int, kind: str, reader, writer) -> bool:
        status, reason, code, message = _ERRORS[kind]
        keep = not req.close
        if req.has_body:
            if req.expect:
                keep = False  # the body is not asked for; it would arrive where the next request should
            else:
                await _copy_body(reader, _Sink(), req.chunked, req.length)
        rid = uuid.uuid4().hex[:16].upper()
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<Resource>{escape(req.path)}</Resource><RequestId>{rid}</RequestId>"
                f"<HostId>s3-faults</HostId></Error>").encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nx-amz-request-id: {rid}\r\nx-amz-id-2: s3-faults\r\n"
                f"Content-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
                f"Date: {email.utils.formatdate(usegmt=True)}\r\nServer: AmazonS3\r\n"
                f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n").encode()
        self._record(kind, req, n, status=status)
        writer.write(head if req.method == "HEAD" else head + body)
        await writer.drain()
        return keep

    async def _upstream(self, up: list) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ur, uw = up
        if uw is None or uw.transport.is_closing() or ur.at_eof():
            _close(uw)
            up[0], up[1] = await asyncio.wait_for(
                asyncio.open_connection(self.up_host, self.up_port, limit=_LINE_LIMIT), timeout=10)
        return up[0], up[1]

    async def _forward(self, req: _Request, n: int, reader, writer, up: list, cut: bool) -> bool:
        body: list = [None]
        try:
            return await self._forward_one(req, n, reader, writer, up, cut, body)
        finally:  # a request body still being copied (a blackout, a cut, an early answer) ends with it
            if body[0] is not None and not body[0].done():
                body[0].cancel()

    async def _forward_one(self, req: _Request, n: int, reader, writer, up: list, cut: bool, holder: list) -> bool:
        # A small body that is not waiting for 100 Continue is read first and sent with the head (one send);
        # a larger one, a chunked one or one behind `Expect: 100-continue` is streamed by a task of its own.
        pre = b""
        if not req.chunked and not req.expect and 0 < req.length <= _SMALL_BODY:
            pre = await reader.readexactly(req.length)
        streamed = req.has_body and not pre
        first = None  # the first response head, read here unless the body is streamed
        for attempt in (0, 1):
            reused = up[1] is not None
            try:
                ur, uw = await self._upstream(up)
                uw.write(req.head + pre)
                await uw.drain()
                if streamed:
                    break
                first = await ur.readuntil(b"\r\n\r\n")
                break
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                # A kept-alive upstream connection the server closed while idle: a request whose bytes are all
                # in hand goes once more on a new connection, as HTTP clients do.
                if attempt == 0 and reused and not streamed and not isinstance(e, asyncio.TimeoutError):
                    _close(up[1])
                    up[0] = up[1] = None
                    continue
                return self._upstream_failed(req, n, writer, up, f"connect/send: {type(e).__name__}: {e}")
        body = None
        if streamed:
            body = holder[0] = asyncio.ensure_future(_copy_body(reader, uw, req.chunked, req.length))
            body.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no "never retrieved"
        continued = False
        try:
            while True:  # interim answers (100 Continue) go back to the client as they come
                rhead, first = (first, None) if first is not None else (await self._response_head(ur, body), None)
                if rhead is None:  # the client's body broke off (it went away): nothing to answer
                    _close(up[1])
                    up[0] = up[1] = None
                    return False
                status = int(rhead[9:12])
                if 100 <= status < 200 and status != 101:
                    continued = True
                    writer.write(rhead)
                    await writer.drain()
                    continue
                break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            if body is not None:
                body.cancel()
            return self._upstream_failed(req, n, writer, up, f"response head: {type(e).__name__}: {e}")
        self.counters["forwarded"] += 1
        rh = _headers(rhead[:-4].split(b"\r\n")[1:])
        chunked = "chunked" in rh.get("transfer-encoding", "").lower()
        self.counters["chunked_responses"] += chunked
        if req.method == "HEAD" or status in (204, 304):
            length, until_close = 0, False
        elif chunked:
            length, until_close = 0, False
        elif "content-length" in rh:
            length, until_close = int(rh["content-length"]), False
        else:
            length, until_close = 0, True
        if cut:
            if body is not None:
                body.cancel()
            return await self._cut(req, n, status, rhead, chunked or until_close, length, ur, writer, up)
        try:
            if until_close:
                writer.write(rhead)
                while data := await ur.read(_BUF):
                    writer.write(data)
                    await writer.drain()
            elif chunked:
                writer.write(rhead)
                await _copy_chunked(ur, writer)
            else:  # the head with the body's first piece: one send (and one segment) for a small answer
                first = await ur.read(min(length, _BUF)) if length else b""
                if length and not first:
                    raise asyncio.IncompleteReadError(b"", length)
                writer.write(rhead + first)
                await _copy_n(ur, writer, length - len(first))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            if body is not None:
                body.cancel()
            return self._upstream_failed(req, n, writer, up, f"response body: {type(e).__name__}: {e}")
        keep = not (req.close or until_close or "close" in rh.get("connection", "").lower())
        if body is not None and not body.done():
            if req.expect and not continued:
                body.cancel()  # a final answer without 100 Continue: the client does not send the body
                return False
            try:  # a final answer while the body was still coming: let it finish, briefly
                await asyncio.wait_for(asyncio.shield(body), timeout=1.0)
            except (asyncio.TimeoutError, Exception):
                body.cancel()
                return False
        if body is not None and (body.cancelled() or body.exception() is not None):
            return False
        return keep

    @staticmethod
    async def _response_head(ur: asyncio.StreamReader, body: asyncio.Future | None) -> bytes | None:
        """The upstream's next response head; None if the client's request body failed first."""
        if body is None or body.done() and body.exception() is None:
            return await ur.readuntil(b"\r\n\r\n")
        head = asyncio.ensure_future(ur.readuntil(b"\r\n\r\n"))
        try:
            while not head.done():
                await asyncio.wait({head, body} if not body.done() else {head},
                                   return_when=asyncio.FIRST_COMPLETED)
                if body.done() and not body.cancelled() and body.exception() is not None and not head.done():
                    return None
        finally:
            if not head.done():
                head.cancel()
        return head.result()

    async def _cut(self, req, n, status, rhead, stream: bool, length: int, ur, writer, up: list) -> bool:
        """The reset kind: headers and the first `cut` of the body, then a TCP reset; the upstream is dropped."""
        frac = self.rules["reset"].cut
        sent = 0
        if stream or length > 0:
            writer.write(rhead)
            try:
                if stream:  # chunked or until close: part of what comes first
                    data = await ur.read(_BUF)
                    part = data[:int(len(data) * frac)]
                else:
                    part = b""
                    want = int(length * frac)
                    while len(part) < want:
                        data = await ur.read(min(_BUF, want - len(part)))
                        if not data:
                            break
                        part += data
                writer.write(part)
                sent = len(part)
                await writer.drain()
                await _delivered(writer, timeout=2.0)
            except (OSError, asyncio.IncompleteReadError):
                pass
            where = "mid-body"
        else:
            where = "before the response (it has no body)"
        self._record("reset", req, n, status=status, length=None if stream else length, sent=sent, where=where)
        _close(up[1])
        up[0] = up[1] = None
        _rst(writer)
        return False

    def _upstream_failed(self, req, n, writer, up: list, why: str) -> bool:
        self._record("upstream_errors", req, n, detail=why)
        _close(up[1])
        up[0] = up[1] = None
        _rst(writer)
        return False

    # ----------------------------------------------------------------------------- control API
    def state(self) -> dict:
        return {"pid": os.getpid(), "port": self.port, "control_port": self.control_port, "upstream": self.upstream,
                "seed": self.seed, "rules": {k: dataclasses.asdict(v) for k, v in self.rules.items()},
                "counters": json.loads(json.dumps(self.counters)), "log_size": len(self.log),
                "log_dropped": self.log_dropped, "blackout": self.blackout_mode,
                "windows": [{"id": k, **v} for k, v in sorted(self.windows.items())],
                "serving": bool(self.server and self.server.is_serving()), "rebind_error": self.rebind_error}

    def handle_control(self, method: str, path: str, query: dict, body: dict) -> tuple[int, Any]:
        if method == "GET" and path == "/state":
            return 200, self.state()
        if method == "GET" and path == "/log":
            since = int(query.get("since", ["0"])[0])
            return 200, {"entries": self.log[since:], "next": len(self.log)}
        if method == "POST" and path == "/rules":
            new = dict(self.rules) if not body.get("replace") else {k: Fault() for k in KINDS}
            for k, v in (body.get("rules") or {}).items():
                if k not in KINDS:
                    raise ValueError(f"unknown fault kind {k!r} (kinds: {', '.join(KINDS)})")
                new[k] = _as_fault(v)
            self.rules = new
            if body.get("seed") is not None:
                self.seed = int(body["seed"])
            return 200, self.state()
        if method == "POST" and path == "/blackout":
            return 200, self.schedule_blackout(float(body["seconds"]), body.get("at"), body.get("mode", "reset"))
        if method == "POST" and path == "/reset":
            self.reset()
            return 200, self.state()
        if method == "POST" and path == "/stop":
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.stop()))
            return 200, {"stopping": True}
        return 404, {"error": f"no control endpoint {method} {path}"}

    async def _control_client(self, reader, writer) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            lines = head[:-4].split(b"\r\n")
            method, target, _ = lines[0].decode("latin-1").split(" ")
            hdrs = _headers(lines[1:])
            raw = await asyncio.wait_for(reader.readexactly(int(hdrs.get("content-length", "0") or 0)), timeout=10)
            u = urllib.parse.urlsplit(target)
            try:
                status, out = self.handle_control(method, u.path, urllib.parse.parse_qs(u.query),
                                                  json.loads(raw) if raw else {})
            except (ValueError, TypeError, KeyError) as e:
                status, out = 400, {"error": f"{type(e).__name__}: {e}"}
            data = json.dumps(out).encode()
            writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: application/json"
                         f"\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError):
            pass
        finally:
            writer.close()


async def _main(args) -> None:
    proxy = Proxy(args.upstream, seed=args.seed, rules=json.loads(args.rules) if args.rules else None)
    await proxy.start(args.port, args.control_port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(proxy.stop()))
    ready = Path(args.ready_file)
    tmp = ready.with_name(ready.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "port": proxy.port, "control_port": proxy.control_port}))
    tmp.replace(ready)  # whole, or not there
    print(f"s3-faults: 127.0.0.1:{proxy.port} -> {args.upstream}, control 127.0.0.1:{proxy.control_port}",
          flush=True)
    if args.parent_pid:  # the starter gone (killed with -9, say): stop rather than linger
        async def watch():
            while not proxy.stopped.is_set():
                if os.getppid() != args.parent_pid:
                    print("s3-faults: parent gone, stopping", flush=True)
                    await proxy.stop()
                    return
                await asyncio.sleep(0.5)

        watcher = asyncio.ensure_future(watch())
    await proxy.stopped.wait()
    await asyncio.sleep(0.05)
    if args.parent_pid:
        watcher.cancel()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Fault-injecting HTTP proxy in front of an S3 endpoint (tests only).")
    p.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of the S3 server")
    p.add_argument("--ready-file", required=True, help="written (JSON: pid, port, control_port) once serving")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rules", default="", help='JSON {kind: rate or {"rate": ..., ...}}')
    p.add_argument("--port", type=int, default=0, help="0: a free port of 20000-32767")
    p.add_argument("--control-port", type=int, default=0)
    p.add_argument("--parent-pid", type=int, default=0, help="stop when this process is no longer the parent")
    asyncio.run(_main(p.parse_args(argv)))


# =============================================================================================== test side
class FaultControl:
    """The control client of a running proxy (any process): `FaultControl(url)` or `FaultControl.from_env()`.
    Every call is one HTTP request to 127.0.0.1 with a bounded timeout."""

    def __init__(self, control_url: str, timeout: float = 10.0):
        self.control_url = control_url.rstrip("/")
        self.timeout = timeout

    @classmethod
    def from_env(cls, env: dict | None = None) -> "FaultControl":
        env = os.environ if env is None else env
        if CONTROL_ENV not in env:
            raise KeyError(f"{CONTROL_ENV} is not set: start the process with S3Faults(...).env")
        return cls(env[CONTROL_ENV])

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.control_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise RuntimeError(f"s3-faults control {method} {path}: {e.code} {detail}") from None

    def state(self) -> dict:
        """Rules, seed, counters, blackout in force and scheduled, ports, whether the S3 port is serving."""
        return self._call("GET", "/state")

    def counters(self) -> dict:
        return self.state()["counters"]

    def log(self, kind: str | None = None, since: int = 0) -> list[dict]:
        """Injected faults (and upstream errors) in order, from entry `since`; only `kind` if given."""
        entries = self._call("GET", f"/log?since={int(since)}")["entries"]
        return [e for e in entries if kind is None or e["kind"] == kind]

    def set(self, seed: int | None = None, replace: bool = False, **rules: float | Fault | dict | None) -> dict:
        """Change rates and filters now, per kind: a rate (all requests), a `Fault`, or None (off). Kinds not
        named keep theirs unless `replace`. A `seed` changes the draws from the next request on."""
        for k in rules:
            if k not in KINDS:
                raise ValueError(f"unknown fault kind {k!r} (kinds: {', '.join(KINDS)})")
        body = {"rules": {k: dataclasses.asdict(_as_fault(v)) for k, v in rules.items()}, "replace": replace,
                "seed": seed}
        return self._call("POST", "/rules", body)["rules"]

    def clear(self) -> None:
        """Every kind off (blackouts already scheduled stay)."""
        self.set(replace=True)

    def reset(self) -> None:
        """Counters, log and the seeded draw sequence back to zero (rules stay)."""
        self._call("POST", "/reset", {})

    def blackout(self, seconds: float, at: float | None = None, mode: str = "reset") -> dict:
        """A blackout of `seconds` from now (in force when this returns) or from the wall-clock time `at`
        (time.time()); mode "reset" (connections accepted and reset) or "refuse" (connects refused). Returns
        {"id", "start", "end", "mode"} (wall-clock times)."""
        return self._call("POST", "/blackout", {"seconds": seconds, "at": at, "mode": mode})

    def wait_serving(self, timeout: float = 15.0) -> None:
        """Bounded wait until no blackout is in force or scheduled and the S3 port accepts connections."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.state()
            if s["rebind_error"]:
                raise RuntimeError(s["rebind_error"])
            if s["serving"] and s["blackout"] is None and not s["windows"]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"s3-faults still blacked out after {timeout} s: {s['windows']}")
            time.sleep(0.02)


class S3Faults(FaultControl):
    """The proxy as a child process of the caller (its own process group), in front of `upstream`: a
    SeaweedS3 (or anything with `.endpoint` and `.env`) or an http:// endpoint URL. `seed` and initial
    `rules` (kind=rate or Fault) as in `set`."""

    def __init__(self, upstream: Any, seed: int = 0, workdir: str | os.PathLike | None = None,
                 start_timeout: float = 15.0, stop_timeout: float = 5.0, **rules: float | Fault | dict):
        self.upstream_endpoint = upstream if isinstance(upstream, str) else upstream.endpoint
        self.upstream_env = {} if isinstance(upstream, str) else dict(upstream.env)
        self.seed = seed
        self.rules = {k: dataclasses.asdict(_as_fault(v)) for k, v in rules.items()}
        for k in rules:
            if k not in KINDS:
                raise ValueError(f"unknown fault kind {k!r} (kinds: {', '.join(KINDS)})")
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.proc: subprocess.Popen | None = None
        self.port = self.control_port = 0
        super().__init__("http://127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        """The URL clients use as their S3 endpoint."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The upstream's client environment with AWS_ENDPOINT_URL pointing at the proxy, and RCA_TEST_S3_FAULTS
        (the control URL, for `FaultControl.from_env()` in other processes)."""
        return {**self.upstream_env, "AWS_ENDPOINT_URL": self.endpoint, CONTROL_ENV: self.control_url}

    @property
    def log_path(self) -> Path:
        return self.workdir / "s3-faults.out"

    def start(self) -> "S3Faults":
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("S3Faults already running")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="s3-faults-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready = self.workdir / f"ready-{uuid.uuid4().hex[:8]}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--upstream", self.upstream_endpoint,
               "--ready-file", str(ready), "--seed", str(self.seed), "--rules", json.dumps(self.rules),
               "--parent-pid", str(os.getpid())]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=self.workdir)
        deadline = time.monotonic() + self.start_timeout
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with code {self.proc.returncode}" if self.proc.poll() is not None
                       else f"not ready within {self.start_timeout:.0f} s")
                self.stop()
                raise RuntimeError(f"s3-faults proxy {why}; log {self.log_path}:\n{_tail(self.log_path)}")
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        ready.unlink()
        self.port, self.control_port = info["port"], info["control_port"]
        self.control_url = f"http://127.0.0.1:{self.control_port}"
        return self

    def stop(self) -> None:
        """SIGTERM, a bounded wait, then SIGKILL of its process group."""
        if self.proc is None:
            return
        from ._proc import stop_process

        stop_process(self.proc, timeout=self.stop_timeout, group=True, signal_group_first=False)
        if self._own_dir and self.workdir is not None:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> "S3Faults":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"<cannot read {path}: {e}>"


if __name__ == "__main__":
    main()
