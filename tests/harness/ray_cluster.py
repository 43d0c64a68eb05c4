"""A two-node Ray cluster on 127.0.0.1 whose second node does not see the driver's files in given directories.

    cluster = TwoNodeCluster(tmp_path / "ray", hidden_dirs=[data_dir], env=s3.env)
    cluster.start()                       # raises IsolationUnavailable when unshare/mount cannot be used
    ray.init(address=cluster.address)     # the driver: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray
    ...  NodeAffinitySchedulingStrategy(cluster.node2_id, soft=False), or resources={"node2": 0.01}
    cluster.stop()

How (a recipe measured on the development machine; stock `ray start` cannot do it on loopback):
- head: stock `ray start --head --node-ip-address=127.0.0.1 --port=G --block` with explicit ports for everything,
  no dashboard, its own --temp-dir, a capped object store, custom resource {"head": 1};
- node 2: the same CLI through ray_node_wrapper.py (allows a worker node and pins its IP to 127.0.0.1), run in
  `unshare --mount --propagation private bash -c "mount -t tmpfs tmpfs DIR && ... && exec python wrapper ..."`,
  so each hidden DIR is an empty private tmpfs for node 2 and everything it starts (raylet, workers); custom
  resource {"node2": 1}. Root is needed for unshare/mount.
- every Ray process gets RAY_USAGE_STATS_ENABLED=0, RAY_AUTH_MODE=disabled,
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, faster GCS health checks
  (a dead node is marked DEAD within a few seconds) and the caller's extra env (e.g. S3 credentials).
- stop: SIGTERM to the `ray start --block` process only (signalling its whole group first kills the GCS
  and the stop hangs ~30 s), bounded wait, then SIGKILL whatever is left of its process group. Never
  `ray stop` (it kills every Ray on the host).

Ray's session directories (sockets, logs) must have short paths (unix sockets: 107 bytes), so when `workdir`
is long they live in a short /tmp/rh2-* directory, linked from workdir/ray-temp while the cluster runs; on
stop() the session logs are copied to workdir/{head,node2}-logs and the short directory is removed. The
`ray start` output of each node is in workdir/{head,node2}.out (node 2's numbered by restart).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._proc import cmdline, descendants, free_port_block, free_ports, pids_in_group, stop_process, tail

# The driver side must see this before `import ray` (ray_constants reads it at import time).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

RAY = str(Path(sys.executable).with_name("ray"))
WRAPPER = str(Path(__file__).with_name("ray_node_wrapper.py"))
HEAD_RESOURCE, NODE2_RESOURCE = "head", "node2"
WORKER_PORTS = 100  # per node; each Ray worker process takes one

BASE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # GCS health checks of raylets: default 3 s period x 5 failures; a killed node is noticed in ~3-4 s here.
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


class IsolationUnavailable(RuntimeError):
    """Node 2 cannot get private mounts here (no unshare, not root, mount refused...): skip such a test."""


def check_isolation(hidden_dirs: list[Path], timeout: float = 15.0) -> None:
    """Raise IsolationUnavailable (with the reason) unless private tmpfs mounts over hidden_dirs work here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise IsolationUnavailable("`unshare` (util-linux) is not installed")
    if os.geteuid() != 0:
        raise IsolationUnavailable(f"unshare --mount and mount -t tmpfs need root (euid is {os.geteuid()})")
    script = " && ".join([f"mount -t tmpfs tmpfs {shlex.quote(str(d))}" for d in hidden_dirs] + ["true"])
    try:
        r = subprocess.run([unshare, "--mount", "--propagation", "private", "bash", "-c", script],
                           capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise IsolationUnavailable(f"unshare/mount probe did not finish within {timeout:.0f} s") from None
    if r.returncode != 0:
        raise IsolationUnavailable(f"private tmpfs mounts refused (rc {r.returncode}): "
                                   f"{(r.stderr or r.stdout).strip()[-500:]}")


def _gcs_client(address: str):
    from ray._raylet import GcsClient

    return GcsClient(address=address)


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class TwoNodeCluster:
    """Head (with {"head": 1}) + node 2 (with {"node2": 1}, private tmpfs over hidden_dirs) on 127.0.0.1."""

    def __init__(self, workdir: str | os.PathLike, hidden_dirs: list[str | os.PathLike] = (), head_cpus: int = 2,
                 node2_cpus: int = 1, env: dict[str, str] | None = None,
                 object_store_memory: int = 128 * 1024 ** 2, head_timeout: float = 90.0,
                 node2_timeout: float = 60.0, stop_timeout: float = 20.0,
                 cpu_sets: tuple[str, str] | None = None):
        self.workdir = Path(workdir).absolute()
        # (head, node 2) processor lists for taskset, e.g. ("0", "1"): each node's processes (raylet, GCS on the
        # head, workers) run on its own cores only, as on two machines; None: both float over the host's cores
        self.cpu_sets = cpu_sets
        self.hidden_dirs = [Path(d).absolute() for d in hidden_dirs]
        self.head_cpus, self.node2_cpus = head_cpus, node2_cpus
        self.extra_env = dict(env or {})
        self.node2_drop_env: tuple[str, ...] = ()  # variables node 2 is started without (restart_node2)
        self.object_store_memory = object_store_memory
        self.head_timeout, self.node2_timeout, self.stop_timeout = head_timeout, node2_timeout, stop_timeout
        self.head_proc: subprocess.Popen | None = None
        self.node2_proc: subprocess.Popen | None = None
        self.gcs_port = 0
        self.head_id: str | None = None
        self.node2_id: str | None = None
        self._node2_starts = 0
        self._short_tmp: Path | None = None
        self._gcs = None
        self._head_env: dict[str, str] = {}
        self._taken: set[int] = set()  # every port handed to a node of this cluster
        self._started: dict[int, str | None] = {}  # pid -> start time, of every process seen in our groups
        self.timings: dict[str, float] = {}

    # --- addresses -----------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def head_log(self) -> Path:
        return self.workdir / "head.out"

    @property
    def node2_log(self) -> Path:
        return self.workdir / f"node2.{self._node2_starts}.out"

    def _temp_root(self) -> Path:
        if self._short_tmp is None:
            # ~60 bytes of session_*/sockets/plasma_store go after --temp-dir; keep the prefix short.
            if len(str(self.workdir)) <= 40:
                self._short_tmp = self.workdir / "rt"
                self._short_tmp.mkdir(parents=True, exist_ok=True)
            else:
                self._short_tmp = Path(tempfile.mkdtemp(prefix="rh2-", dir="/tmp"))
                link = self.workdir / "ray-temp"
                if link.is_symlink():
                    link.unlink()
                link.symlink_to(self._short_tmp)
        return self._short_tmp

    def _env(self, head: bool = False) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        env.update(BASE_ENV)
        if head:
            env.update(self._head_env)
        env.update(self.extra_env)
        if not head:
            for k in self.node2_drop_env:
                env.pop(k, None)
        return env

    def _node_ports(self, head: bool) -> list[str]:
        n = 10 if head else 6
        ports = free_ports(n, avoid=self._taken)
        self._taken.update(ports)
        wmin = free_port_block([0], span=WORKER_PORTS, avoid=self._taken)
        self._taken.update(range(wmin, wmin + WORKER_PORTS))
        args = [f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
                f"--min-worker-port={wmin}", f"--max-worker-port={wmin + WORKER_PORTS - 1}",
                f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
                f"--metrics-export-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}"]
        if head:
            # --include-dashboard=false still starts the dashboard's API process (port 8265, +50 retries),
            # and it and the autoscaler monitor bind fixed metrics ports (44227, 44217) unless told.
            args += [f"--ray-client-server-port={ports[6]}", f"--dashboard-port={ports[7]}",
                     "--dashboard-host=127.0.0.1"]
            self._head_env = {"DASHBOARD_METRIC_PORT": str(ports[8]), "AUTOSCALER_METRIC_PORT": str(ports[9])}
        return args

    def _pin(self, node: int) -> list[str]:
        """The taskset prefix of a node's `ray start` (its children inherit the CPU affinity); [] unpinned."""
        if not self.cpu_sets:
            return []
        taskset = shutil.which("taskset")
        if taskset is None:
            raise RuntimeError("cpu_sets needs `taskset` (util-linux)")
        return [taskset, "-c", self.cpu_sets[node]]

    def _common_args(self, temp_dir: Path, cpus: int, resource: str) -> list[str]:
        return ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
                f"--resources={json.dumps({resource: 1})}", f"--object-store-memory={self.object_store_memory}",
                f"--temp-dir={temp_dir}", "--disable-usage-stats", "--block"]

    # --- node info -----------------------------------------------------------------------------------
    def nodes(self, timeout: float = 5.0) -> list[dict]:
        """All nodes the GCS knows: [{"node_id", "alive", "resources", "ip"}] (no ray.init needed)."""
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        infos = self._gcs.get_all_node_info(timeout=timeout)
        return [{"node_id": i.node_id.hex(), "alive": i.state == GcsNodeInfo.GcsNodeState.ALIVE,
                 "resources": dict(i.resources_total), "ip": i.node_manager_address} for i in infos.values()]

    def node_alive(self, node_id: str) -> bool:
        return any(n["node_id"] == node_id and n["alive"] for n in self.nodes())

    def wait_node_dead(self, node_id: str, timeout: float = 30.0) -> float:
        """Bounded wait until the GCS marks node_id not alive; returns the seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.node_alive(node_id):
                return time.monotonic() - t0
            time.sleep(0.2)
        raise TimeoutError(f"node {node_id} still alive after {timeout:.0f} s")

    def _wait_node(self, resource: str, proc: subprocess.Popen, log: Path, timeout: float, t0: float,
                   exclude: set[str] = frozenset()) -> str:
        deadline = t0 + timeout
        last = "GCS not reachable yet"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"`ray start` for {resource} exited with code {proc.returncode}; "
                                   f"{self._log_tails(log)}")
            try:
                if self._gcs is None:
                    self._gcs = _gcs_client(self.address)
                for n in self.nodes(timeout=2):
                    if n["alive"] and resource in n["resources"] and n["node_id"] not in exclude:
                        if n["ip"] != "127.0.0.1":
                            raise RuntimeError(f"{resource} registered as {n['ip']}, not 127.0.0.1")
                        return n["node_id"]
                last = "node not registered yet"
            except RuntimeError:
                raise
            except Exception as e:  # noqa: BLE001  GCS still coming up; reported if the deadline passes
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.3)
        raise TimeoutError(f"{resource} did not join {self.address} within {timeout:.0f} s ({last}); "
                           f"{self._log_tails(log)}")

    def _log_tails(self, log: Path) -> str:
        out = [f"{log}:\n{tail(log, 40)}"]
        temp = self._short_tmp
        if temp is not None:
            for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err"):
                for f in sorted(temp.glob(f"*/session_latest/logs/{name}")):
                    if f.stat().st_size:
                        out.append(f"{f}:\n{tail(f, 20)}")
        return "\n".join(out)

    def _track(self, proc: subprocess.Popen | None) -> None:
        if proc is None or proc.poll() is not None:
            return
        for pid in {proc.pid, *pids_in_group(proc.pid), *descendants(proc.pid)}:
            self._started.setdefault(pid, _start_time(pid))

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> "TwoNodeCluster":
        self.workdir.mkdir(parents=True, exist_ok=True)
        for d in self.hidden_dirs:
            if not d.is_dir():
                raise ValueError(f"hidden dir {d} must be an existing directory")
        check_isolation(self.hidden_dirs)
        for d in self.hidden_dirs:  # node 2's own session files must stay visible to it
            for own in (self.workdir, self._temp_root()):
                if own == d or d in own.parents:
                    raise ValueError(f"{own} is inside hidden dir {d}: node 2's Ray files would vanish")
        try:
            self._start_head()
            self._start_node2()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_head(self) -> None:
        t0 = time.monotonic()
        self.gcs_port = free_port_block([0], avoid=self._taken)
        self._taken.add(self.gcs_port)
        temp = self._temp_root() / "head"
        temp.mkdir(parents=True, exist_ok=True)
        cmd = [*self._pin(0), RAY, "start", "--head", f"--port={self.gcs_port}", "--include-dashboard=false",
               *self._node_ports(head=True), *self._common_args(temp, self.head_cpus, HEAD_RESOURCE)]
        with open(self.head_log, "ab") as log:
            log.write(f"$ {shlex.join(cmd)}\n".encode())
            log.flush()
            self.head_proc = subprocess.Popen(cmd, cwd=self.workdir, env=self._env(head=True), stdin=subprocess.DEVNULL,
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.head_id = self._wait_node(HEAD_RESOURCE, self.head_proc, self.head_log, self.head_timeout, t0)
        self._track(self.head_proc)
        self.timings["head_start_s"] = time.monotonic() - t0

    def _start_node2(self, exclude: set[str] = frozenset()) -> None:
        t0 = time.monotonic()
        self._node2_starts += 1
        temp = self._temp_root() / f"node2-{self._node2_starts}"
        temp.mkdir(parents=True, exist_ok=True)
        ray_cmd = [sys.executable, WRAPPER, "start", f"--address={self.address}", *self._node_ports(head=False),
                   *self._common_args(temp, self.node2_cpus, NODE2_RESOURCE)]
        mounts = [f"mount -t tmpfs tmpfs {shlex.quote(str(d))}" for d in self.hidden_dirs]
        script = " && ".join(mounts + ["exec " + shlex.join([*self._pin(1), *ray_cmd])])
        cmd = ["unshare", "--mount", "--propagation", "private", "bash", "-c", script]
        with open(self.node2_log, "ab") as log:
            log.write(f"$ {shlex.join(cmd)}\n".encode())
            log.flush()
            self.node2_proc = subprocess.Popen(cmd, cwd=self.workdir, env=self._env(), stdin=subprocess.DEVNULL,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.node2_id = self._wait_node(NODE2_RESOURCE, self.node2_proc, self.node2_log, self.node2_timeout, t0,
                                        exclude=exclude)
        self._track(self.node2_proc)
        self.timings["node2_start_s"] = time.monotonic() - t0

    def node2_raylet_pid(self) -> int:
        """The raylet of node 2: found among the descendants of node 2's `ray start` process only."""
        if self.node2_proc is None or self.node2_proc.poll() is not None:
            raise RuntimeError("node 2 is not running")
        for pid in descendants(self.node2_proc.pid):
            argv = cmdline(pid)
            if argv and Path(argv[0]).name == "raylet":
                return pid
        raise RuntimeError(f"no raylet among node 2's processes (ray start pid {self.node2_proc.pid})")

    def kill_node2_raylet(self) -> int:
        """SIGKILL node 2's raylet (nothing else); returns its pid. Node 2's `ray start --block` then exits."""
        self._track(self.node2_proc)
        pid = self.node2_raylet_pid()
        os.kill(pid, signal.SIGKILL)
        return pid

    def restart_node2(self, drop_env: tuple[str, ...] = ()) -> str:
        """Stop what is left of node 2 and start it again (fresh node id, same hidden dirs) without the environment
        variables named in `drop_env` (e.g. its AWS credentials: a node without its instance profile); returns the id."""
        self.node2_drop_env = tuple(drop_env)
        old = self.node2_id
        # the node is replaced, not shut down: nothing on it is worth a grace period (the store is elsewhere), so a
        # short wait, then SIGKILL for what is left (workers of a killed raylet linger for the whole grace)
        self._stop_node(self.node2_proc, "node2", timeout=2.0)
        self._start_node2(exclude={old} if old else set())
        return self.node2_id

    def _stop_node(self, proc: subprocess.Popen | None, name: str, timeout: float | None = None) -> None:
        if proc is None:
            return
        self._track(proc)
        t0 = time.monotonic()
        stop_process(proc, timeout=self.stop_timeout if timeout is None else timeout, group=True,
                     signal_group_first=False)
        self.timings[f"{name}_stop_s"] = time.monotonic() - t0

    def pids(self) -> dict[int, str | None]:
        """Every process seen in this cluster's process groups (pid -> start time), live or not."""
        self._track(self.head_proc)
        self._track(self.node2_proc)
        return dict(self._started)

    def leftover_pids(self) -> list[int]:
        """Processes this cluster started that are still alive (same pid and same start time)."""
        return sorted(p for p, st in self._started.items() if st is not None and _start_time(p) == st)

    def stop(self) -> None:
        """Node 2, then head: SIGTERM to `ray start --block`, bounded wait, SIGKILL sweep of its group."""
        self._stop_node(self.node2_proc, "node2")
        self._stop_node(self.head_proc, "head")
        self._gcs = None
        self._collect_logs()

    def _collect_logs(self) -> None:
        temp = self._short_tmp
        if temp is None or temp.parent == self.workdir or not temp.exists():
            return
        for node_dir in temp.iterdir():
            logs = node_dir / "session_latest" / "logs"
            if logs.is_dir():
                shutil.copytree(logs, self.workdir / f"{node_dir.name}-logs", dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.sock"))
        shutil.rmtree(temp, ignore_errors=True)
        link = self.workdir / "ray-temp"
        if link.is_symlink():
            link.unlink()
        self._short_tmp = None

    def __enter__(self) -> "TwoNodeCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
