"""The fault-injecting S3 proxy (harness.s3_faults) in front of a real SeaweedFS, with the project's two real
S3 clients (s3fs/botocore and obstore) and every client-side retry turned off, so that each injected fault
reaches the test as the error the client raises: what passes through is byte-identical, each fault kind looks
like real S3's (or a real network's), at the seeded rate, and the proxy's counters and log match what the
clients saw."""
from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.s3_faults import CONTROL_ENV, Fault, FaultControl, S3Faults
from harness.s3_server import KEY, REGION, SECRET, SeaweedS3

SEED = 11
BUCKET = "faults"
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("s3"))
    server.start()
    try:
        server.make_bucket(BUCKET)
        yield server
    finally:
        server.kill()  # throwaway data: SIGKILL is immediate, where stop() waits out weed's ~15 s gRPC grace


@pytest.fixture(scope="module")
def proxy(s3, tmp_path_factory):
    with S3Faults(s3, seed=SEED, workdir=tmp_path_factory.mktemp("faults")) as p:
        yield p


@pytest.fixture
def faults(proxy):
    """The proxy with every kind off and counters, log and draws at zero; the same again afterwards."""
    proxy.wait_serving()
    proxy.clear()
    proxy.reset()
    yield proxy
    proxy.clear()
    proxy.wait_serving()


def s3fs_client(endpoint: str):
    """s3fs with botocore's retries off (one attempt) and s3fs's own retry loop off (retries = 1)."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=KEY, secret=SECRET, client_kwargs={"region_name": REGION},
                           config_kwargs={"retries": {"total_max_attempts": 1}}, skip_instance_cache=True,
                           use_listings_cache=False)
    fs.retries = 1
    return fs


def obstore_client(endpoint: str):
    """obstore with retries off (max_retries 0)."""
    from obstore.store import S3Store

    return S3Store(BUCKET, endpoint=endpoint, allow_http=True, region=REGION, access_key_id=KEY,
                   secret_access_key=SECRET, virtual_hosted_style_request=False,
                   retry_config={"max_retries": 0, "retry_timeout": datetime.timedelta(seconds=20)})


def cat(fs, key: str) -> bytes:
    """One GET (s3fs asks for the size first unless told not to split the read)."""
    return fs.cat_file(f"{BUCKET}/{key}", max_concurrency=1)


def oget(store, key: str) -> bytes:
    import obstore

    return bytes(obstore.get(store, key).bytes())


def s3_error(e: BaseException) -> tuple[str, int] | None:
    """(S3 error code, HTTP status) of a client's error answer: s3fs's OSError carries botocore's ClientError
    as its cause, obstore's GenericError quotes the status line and the XML body."""
    from botocore.exceptions import ClientError

    cause = e if isinstance(e, ClientError) else e.__cause__
    if isinstance(cause, ClientError):
        return cause.response["Error"]["Code"], cause.response["ResponseMetadata"]["HTTPStatusCode"]
    m = re.search(r"non-2xx status code: (\d{3}) .*?<Code>(\w+)</Code>", str(e), re.S)
    return (m.group(2), int(m.group(1))) if m else None


EXPECTED = {"slowdown": ("SlowDown", 503), "internal_error": ("InternalError", 500)}


# ---------------------------------------------------------------------------------------------------------- tests
def test_both_clients_pass_through_byte_identical(faults, s3, tmp_path):
    """Writes and reads through the proxy, each client reading the other's objects, both checked directly
    against the server too; listings; a 12 MB multipart upload by each client; a chunked request body and
    `Expect: 100-continue` bodies forwarded; keep-alive connections reused; nothing injected, nothing failed."""
    import obstore

    fs, store = s3fs_client(faults.endpoint), obstore_client(faults.endpoint)
    direct = s3fs_client(s3.endpoint)
    rng = __import__("random").Random(3)
    payloads = {"empty": b"", "one": b"\x00", "small": rng.randbytes(1000), "mid": rng.randbytes(300_000),
                "two-mb": rng.randbytes(2 * 2**20 + 7)}
    for name, data in payloads.items():
        fs.pipe_file(f"{BUCKET}/pt/s3fs/{name}", data)
        obstore.put(store, f"pt/obstore/{name}", data)
    for name, data in payloads.items():
        for key in (f"pt/s3fs/{name}", f"pt/obstore/{name}"):
            assert cat(fs, key) == data and oget(store, key) == data and cat(direct, key) == data, key
    names = sorted(payloads)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/pt/obstore", refresh=True)) == names
    listed = obstore.list(store, prefix="pt/").collect()
    assert sorted(o["path"] for o in listed) == sorted(f"pt/{c}/{n}" for c in ("s3fs", "obstore") for n in names)
    assert {o["path"]: o["size"] for o in listed}["pt/s3fs/two-mb"] == len(payloads["two-mb"])

    big = rng.randbytes(12 * 2**20 + 13)
    (tmp_path / "big").write_bytes(big)
    before = faults.counters()["by_method"]
    fs.put_file(str(tmp_path / "big"), f"{BUCKET}/pt/big-s3fs", chunksize=5 * 2**20)   # multipart: 3 parts
    obstore.put(store, "pt/big-obstore", big, chunk_size=5 * 2**20)                   # multipart: 3 parts
    after = faults.counters()["by_method"]
    assert after.get("PUT", 0) - before.get("PUT", 0) >= 6            # UploadPart x 3, per client
    assert after.get("POST", 0) - before.get("POST", 0) >= 4          # Create/CompleteMultipartUpload per client
    for key in ("pt/big-s3fs", "pt/big-obstore"):
        assert oget(store, key) == big and cat(fs, key) == big and cat(direct, key) == big

    # a body in chunked transfer encoding, SigV4-signed for the Host the client used (the proxy's), streamed
    status, _ = chunked_put(faults.endpoint, "pt/chunked", [b"a" * 1000, b"b" * 70_000, b"c"])
    assert status == 200 and cat(direct, "pt/chunked") == b"a" * 1000 + b"b" * 70_000 + b"c"

    c = faults.counters()
    assert c["chunked_requests"] == 1 and c["expect_100_continue"] >= 1, c
    assert c["requests"] == c["forwarded"] > 40 and c["connections"] < c["requests"] / 3, c  # keep-alive
    assert all(c[k] == 0 for k in ("slowdown", "internal_error", "reset", "latency", "blackout",
                                   "upstream_errors")), c
    assert faults.log() == []


def chunked_put(endpoint: str, key: str, parts: list[bytes]) -> tuple[int, bytes]:
    """A PUT whose body goes in chunked transfer encoding (payload unsigned, headers signed with SigV4)."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    req = AWSRequest(method="PUT", url=f"{endpoint}/{BUCKET}/{key}",
                     headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD", "Transfer-Encoding": "chunked"})
    S3SigV4Auth(Credentials(KEY, SECRET), "s3", REGION).add_auth(req)
    host, port = endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        conn.request("PUT", f"/{BUCKET}/{key}", body=iter(parts), headers=dict(req.headers.items()),
                     encode_chunked=True)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_slowdown_and_internal_error_reach_both_clients_at_the_seeded_rates(faults):
    """503 SlowDown and 500 InternalError on GETs under one prefix: each client raises the S3 error (code and
    status) for exactly the requests the log names, at about the set rates over 300 GETs; PUTs (other
    method) and GETs elsewhere (other prefix) pass. The draws depend on the seed and the requests, not on the
    client: s3fs and obstore get the same faults on the same objects."""
    import obstore

    fs, store = s3fs_client(faults.endpoint), obstore_client(faults.endpoint)
    keys = [f"rate/{i}" for i in range(10)]
    datas = {k: os.urandom(100 + i) for i, k in enumerate(keys)}
    faults.set(slowdown=Fault(0.1, methods=["GET"], prefix=f"/{BUCKET}/rate/"),
               internal_error=Fault(0.05, methods=["GET"], prefix=f"/{BUCKET}/rate/"))
    for k, d in datas.items():
        obstore.put(store, k, d)
    obstore.put(store, "elsewhere", b"x")
    seen = {}
    for client, get in (("s3fs", lambda k: cat(fs, k)), ("obstore", lambda k: oget(store, k))):
        faults.reset()  # the same draws again
        got = []
        for r in range(30):
            assert get("elsewhere") == b"x"
            for k in keys:
                try:
                    assert get(k) == datas[k]
                except (OSError, obstore.exceptions.BaseError) as e:
                    code = s3_error(e)
                    kind = next((kd for kd, exp in EXPECTED.items() if exp == code), None)
                    assert kind is not None, f"{client}: not an S3 error answer: {e!r}"
                    got.append((f"/{BUCKET}/{k}", kind))
        c = faults.counters()
        log = faults.log()
        assert [(e["path"], e["kind"]) for e in log] == got, client
        assert all(e["method"] == "GET" and e["status"] == EXPECTED[e["kind"]][1] for e in log)
        n = {kd: sum(1 for _, k in got if k == kd) for kd in EXPECTED}
        assert c["slowdown"] == n["slowdown"] and c["internal_error"] == n["internal_error"], (c, n)
        assert c["by_method"] == {"GET": 330} and c["requests"] == 330 and c["forwarded"] == 330 - len(got)
        assert 15 <= n["slowdown"] <= 45 and 4 <= n["internal_error"] <= 27, n   # 30 and 15 expected
        assert n == {"slowdown": 24, "internal_error": 21}  # exact: seed 11 and these requests
        seen[client] = got
    assert seen["s3fs"] == seen["obstore"]
    # concurrent requests (each round's 10 GETs at once, obstore's async API) get the same faults: the draws
    # follow the requests, not their arrival order
    faults.reset()

    async def one(key):
        try:
            return bytes(await (await obstore.get_async(store, key)).bytes_async())
        except obstore.exceptions.BaseError as e:
            return e

    async def rounds():
        out = []
        for r in range(30):
            assert await one("elsewhere") == b"x"
            out.append(await asyncio.gather(*(one(k) for k in keys)))
        return out

    got = []
    for answers in asyncio.run(rounds()):
        for k, v in zip(keys, answers):
            if isinstance(v, BaseException):
                got.append((f"/{BUCKET}/{k}", next(kd for kd, exp in EXPECTED.items() if exp == s3_error(v))))
            else:
                assert v == datas[k]
    assert faults.counters()["connections"] > 1  # the GETs did run side by side
    assert sorted(got) == sorted(seen["s3fs"]) == sorted((e["path"], e["kind"]) for e in faults.log())
    # another seed, other requests hit
    faults.reset()
    faults.set(seed=SEED + 1)
    try:
        for k in keys * 3:
            try:
                oget(store, k)
            except obstore.exceptions.BaseError:
                pass
        assert [(e["path"], e["kind"]) for e in faults.log()] != seen["obstore"][:len(faults.log())]
    finally:
        faults.set(seed=SEED)


def test_limit_and_query_filters(faults):
    """`limit`: rate 1 with limit 2 fails the first two matching requests and none after. `query`: a rule for
    listings ("list-type=") fails listings and no object GET."""
    fs = s3fs_client(faults.endpoint)
    fs.pipe_file(f"{BUCKET}/limit/a", b"a")
    faults.set(internal_error=Fault(1.0, methods=["GET"], prefix=f"/{BUCKET}/limit/", limit=2))
    outcomes = []
    for _ in range(5):
        try:
            outcomes.append(cat(fs, "limit/a"))
        except OSError as e:
            outcomes.append(s3_error(e))
    assert outcomes == [("InternalError", 500)] * 2 + [b"a"] * 3
    faults.clear()
    faults.reset()
    faults.set(slowdown=Fault(1.0, methods=["GET"], query="list-type="))
    assert cat(fs, "limit/a") == b"a"
    with pytest.raises(OSError) as info:
        fs.ls(f"{BUCKET}/limit", refresh=True)
    assert s3_error(info.value) == ("SlowDown", 503)
    assert [(e["method"], e["path"]) for e in faults.log()] == [("GET", f"/{BUCKET}")]


def test_mid_body_reset_is_an_incomplete_read(faults, s3):
    """The reset kind on GETs: status and headers with the full Content-Length, the first half of the body, a TCP
    reset. s3fs (aiohttp) reports a payload short of its Content-Length by exactly what the log says was sent;
    obstore reports a broken response body (not a failed request); a PUT cut this way was still stored (the
    client saw no answer)."""
    import obstore

    fs, store = s3fs_client(faults.endpoint), obstore_client(faults.endpoint)
    data = os.urandom(256 * 1024)
    for i in range(4):
        obstore.put(store, f"cut/{i}", data)
    faults.set(reset=Fault(0.25, methods=["GET"], prefix=f"/{BUCKET}/cut/"))
    got = []
    for r in range(20):
        for i in range(4):
            key = f"cut/{i}"
            client = "s3fs" if (r + i) % 2 else "obstore"
            try:
                assert (cat(fs, key) if client == "s3fs" else oget(store, key)) == data
            except Exception as e:  # noqa: BLE001 - checked below
                got.append((f"/{BUCKET}/{key}", client, e))
    log = faults.log()
    assert [e["path"] for e in log] == [p for p, _, _ in got] and 8 <= len(got) <= 34, len(got)  # 20 expected
    assert len(got) == 24  # exact: seed 11 and these requests
    assert faults.counters()["reset"] == len(got)
    for entry, (_, client, e) in zip(log, got):
        assert entry["kind"] == "reset" and entry["status"] == 200 and entry["where"] == "mid-body"
        assert entry["length"] == len(data) and entry["sent"] == len(data) // 2
        if client == "s3fs":
            import aiohttp

            assert isinstance(e, aiohttp.ClientPayloadError), repr(e)
            assert f"received {entry['sent']} of {len(data)} bytes" in str(e), str(e)
        else:
            assert isinstance(e, obstore.exceptions.GenericError), repr(e)
            assert "response body error" in str(e) and "Connection reset by peer" in str(e), str(e)
    # a response without a body is cut before it starts: the client gets no answer, the server did the work
    faults.reset()
    faults.set(reset=Fault(1.0, methods=["PUT"], prefix=f"/{BUCKET}/cut-put/"))
    with pytest.raises(obstore.exceptions.GenericError, match="error sending request"):
        obstore.put(store, "cut-put/x", b"stored anyway")
    assert cat(s3fs_client(s3.endpoint), "cut-put/x") == b"stored anyway"
    assert [(e["method"], e["where"]) for e in faults.log()] == [("PUT", "before the response (it has no body)")]


def test_latency_delays_exactly_the_logged_requests(faults):
    """Latency 0.25 s on a quarter of the GETs under a prefix: the requests the log names take at least the
    delay, the others well under it."""
    import obstore

    store = obstore_client(faults.endpoint)
    keys = [f"lat/{i}" for i in range(24)]
    for k in keys:
        obstore.put(store, k, b"l")
    delay = 0.25
    faults.set(latency=Fault(0.25, methods=["GET"], prefix=f"/{BUCKET}/lat/", delay=delay))
    took = {}
    for k in keys:
        t0 = time.monotonic()
        assert oget(store, k) == b"l"
        took[f"/{BUCKET}/{k}"] = time.monotonic() - t0
    delayed = {e["path"] for e in faults.log()}
    assert all(e["kind"] == "latency" and e["delay"] == delay for e in faults.log())
    assert 2 <= len(delayed) <= 12 and faults.counters()["latency"] == len(delayed)  # 6 expected
    assert len(delayed) == 8  # exact: seed 11 and these requests
    assert all(took[p] >= delay for p in delayed), took
    fast = sorted(t for p, t in took.items() if p not in delayed)
    assert fast[len(fast) // 2] < delay / 2, fast  # the median undelayed request


def _connect_error(e: BaseException) -> str:
    """'refused' / 'reset' / '' for a client's error of a connection that failed (botocore wraps aiohttp's,
    obstore quotes the OS error)."""
    text, cause = str(e), e
    while cause is not None:
        text += " " + repr(cause) + " " + repr(getattr(cause, "kwargs", ""))
        cause = cause.__cause__ or cause.__context__
    if "Connection refused" in text or "ConnectionRefused" in text:
        return "refused"
    if "Connection reset" in text or "ConnectionReset" in text or "closed before we received" in text \
            or "error sending request" in text or "Server disconnected" in text:
        return "reset"
    return ""


def test_blackouts_reset_or_refuse_every_connection_then_service_resumes(faults):
    """A blackout now (reset: connections accepted and reset at once; refuse: the port refuses connects)
    fails every request of both clients, and a later one (`at`) starts on time; afterwards the same port
    serves again with the same clients (their kept-alive connections were dropped at the start)."""
    import obstore

    fs, store = s3fs_client(faults.endpoint), obstore_client(faults.endpoint)
    fs.pipe_file(f"{BUCKET}/bo/a", b"a")
    assert oget(store, "bo/a") == b"a"  # both clients hold a kept-alive connection now
    port = faults.port
    for mode in ("reset", "refuse"):
        faults.reset()
        w = faults.blackout(1.2, mode=mode)
        assert faults.state()["blackout"] == mode
        with socket.socket() as raw:
            raw.settimeout(5)
            if mode == "refuse":
                with pytest.raises(ConnectionRefusedError):
                    raw.connect(("127.0.0.1", port))
            else:
                # accepted, then reset before any answer (the reset may already meet connect() or sendall())
                with pytest.raises(ConnectionResetError):
                    raw.connect(("127.0.0.1", port))
                    raw.sendall(b"GET /faults/bo/a HTTP/1.1\r\nHost: x\r\n\r\n")
                    if raw.recv(100) == b"":
                        raise ConnectionResetError("closed")
        for get in (lambda: cat(fs, "bo/a"), lambda: oget(store, "bo/a")):
            with pytest.raises(Exception) as info:
                get()
            assert _connect_error(info.value) in ("reset", "refused"), repr(info.value)
            if mode == "refuse":
                assert _connect_error(info.value) == "refused", repr(info.value)
        assert time.time() < w["end"], "the requests above took longer than the blackout: machine too slow"
        faults.wait_serving(timeout=10)
        assert faults.port == port and cat(fs, "bo/a") == b"a" and oget(store, "bo/a") == b"a"
        c = faults.counters()
        assert c["blackout_idle"] >= 1 and c["upstream_errors"] == 0
        if mode == "reset":  # the raw socket and both clients' connections were accepted and reset
            assert c["blackout"] >= 3 and {e["kind"] for e in faults.log()} == {"blackout"}, faults.log()
    # a request in flight (held by latency) when a blackout starts is reset, and logged as such
    faults.reset()
    faults.set(latency=Fault(1.0, prefix=f"/{BUCKET}/bo/slow", delay=2.0))
    fs.pipe_file(f"{BUCKET}/bo/slow", b"s")  # PUT: delayed too, then stored
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(oget, store, "bo/slow")
        deadline = time.monotonic() + 10
        while faults.counters()["latency"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        faults.blackout(0.3)
        with pytest.raises(obstore.exceptions.GenericError) as info:
            pending.result(timeout=10)
    assert _connect_error(info.value) == "reset", repr(info.value)
    assert [(e["method"], e["path"], e["kind"], e.get("detail")) for e in faults.log()][-1] == (
        "GET", f"/{BUCKET}/bo/slow", "blackout", "request in flight reset")
    faults.clear()
    faults.wait_serving(timeout=10)
    # scheduled: served before, failed inside, served after
    start = time.time() + 1.0
    faults.blackout(0.8, at=start, mode="reset")
    assert oget(store, "bo/a") == b"a" and time.time() < start
    time.sleep(max(0.0, start - time.time()) + 0.1)
    with pytest.raises(obstore.exceptions.GenericError):
        oget(store, "bo/a")
    faults.wait_serving(timeout=10)
    assert oget(store, "bo/a") == b"a"


CHILD = r"""
import json, os, sys
from harness.s3_faults import Fault, FaultControl
from rca_core import object_io, storage

ctl = FaultControl.from_env()
ctl.set(slowdown=Fault(1.0, methods=["GET"], prefix="/faults/child/denied"))
out = {"ok": storage.read_bytes("s3://faults/child/ok").decode()}       # the project's s3fs, from env alone
fs, _ = storage.filesystem("s3://faults/child")
client = storage.process_object_store("s3://faults/child")             # the project's obstore, from env alone
out["obstore"] = object_io.get(fs, "faults/child/ok", client).decode()
import s3fs
raw = s3fs.S3FileSystem(config_kwargs={"retries": {"total_max_attempts": 1}}, skip_instance_cache=True)
raw.retries = 1
try:
    raw.cat_file("faults/child/denied", max_concurrency=1)
except OSError as e:
    out["denied"] = e.__cause__.response["Error"]["Code"]
out["counters"] = ctl.counters()
print(json.dumps(out))
"""


def test_another_process_reaches_s3_and_controls_the_proxy_through_its_env(faults):
    """A separate process started with `faults.env` (as a Ray worker or `rca run` would be): the project's own
    clients (rca_core.storage's s3fs, rca_core.object_io's obstore) reach S3 through the proxy from the
    environment alone, and the process sets a rule over the control API that hits its own request."""
    fs = s3fs_client(faults.endpoint)
    fs.pipe_file(f"{BUCKET}/child/ok", b"ok")
    fs.pipe_file(f"{BUCKET}/child/denied", b"no")
    faults.reset()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(faults.env)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent)])
    assert env["AWS_ENDPOINT_URL"] == faults.endpoint and env[CONTROL_ENV] == faults.control_url
    p = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["ok"] == "ok" and out["obstore"] == "ok" and out["denied"] == "SlowDown", out
    c = faults.counters()
    assert c["slowdown"] == 1 and out["counters"]["slowdown"] == 1 and c["by_method"].get("GET", 0) >= 3, c
    assert [(e["method"], e["path"], e["kind"]) for e in faults.log()] == [
        ("GET", f"/{BUCKET}/child/denied", "slowdown")]
    assert faults.state()["rules"]["slowdown"]["prefix"] == "/faults/child/denied"
    # and a second control client (any process: the URL is all it needs) sees the same proxy
    assert FaultControl.from_env(faults.env).counters() == faults.counters()


def test_chunked_and_until_close_responses_pass_through_verbatim(tmp_path):
    """SeaweedFS answers every S3 request with a Content-Length (measured: objects, ranges, gzip-able types,
    listings, uploads, versions), where real S3 sends listings chunked: so the proxy's chunked and read-until-close
    response paths are checked against a plain HTTP/1.1 server of the standard library on 127.0.0.1. Chunk framing
    and trailers arrive byte for byte, the connection stays usable after a chunked answer, an answer without
    length ends with the connection, and a cut chunked answer is an incomplete read."""
    import http.server
    import threading

    parts = [b"<ListBucketResult>", os.urandom(5000), b"x" * 70_000, b"</ListBucketResult>"]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nX-Trailer: t\r\n\r\n"
    plain = os.urandom(100_000)

    class Upstream(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            if self.path == "/chunked":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(framed)
            else:  # no length: the body ends with the connection
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(plain)
                self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        with S3Faults(f"http://127.0.0.1:{server.server_address[1]}", workdir=tmp_path / "faults") as faults:
            with socket.create_connection(("127.0.0.1", faults.port), timeout=10) as raw:
                for _ in range(2):  # twice on one connection
                    raw.sendall(b"GET /chunked HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    got = b""
                    while not got.endswith(framed):
                        data = raw.recv(65536)
                        assert data, got[-200:]
                        got += data
                    head, _, body = got.partition(b"\r\n\r\n")
                    assert b"Transfer-Encoding: chunked" in head and body == framed
            conn = http.client.HTTPConnection("127.0.0.1", faults.port, timeout=10)
            conn.request("GET", "/plain")
            resp = conn.getresponse()
            assert resp.getheader("Content-Length") is None and resp.read() == plain
            conn.close()
            c = faults.counters()
            assert c["chunked_responses"] == 2 and c["requests"] == 3 and c["connections"] == 2, c
            faults.set(reset=Fault(1.0, cut=0.5))
            conn = http.client.HTTPConnection("127.0.0.1", faults.port, timeout=10)
            conn.request("GET", "/chunked")
            with pytest.raises((http.client.IncompleteRead, ConnectionResetError)):
                conn.getresponse().read()
            conn.close()
            assert [(e["path"], e["where"]) for e in faults.log()] == [("/chunked", "mid-body")]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
