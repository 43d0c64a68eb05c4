"""Connecting to Ray: a local instance by default, or the cluster at cfg.ray.address."""
from __future__ import annotations

import contextlib
import os

from rca_core.config import RayConfig

from . import console

# Set for every Ray process of a run. Token auth is switched off only for a local Ray the pipeline starts
# itself (loopback only); a cluster keeps its own auth settings (deploy/README.md).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
LOCAL_RAY_ENV = {**RAY_ENV, "RAY_AUTH_MODE": "disabled"}


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear message: ray.init on a dead address otherwise retries for minutes."""
    import socket

    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeError(f"ray.address {address!r} is not of the form host:port or ray://host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise RuntimeError(f"cannot reach the Ray cluster at {address} (ray.address): {e}") from e


def worker_env(local: bool = True) -> dict[str, str]:
    """Environment for every Ray worker of a run: RAY_ENV (LOCAL_RAY_ENV for a local Ray). Credentials are not
    forwarded: nodes get them from their own environment."""
    return dict(LOCAL_RAY_ENV if local else RAY_ENV)


@contextlib.contextmanager
def ray_session(rc: RayConfig, num_cpus: int | None = None):
    """ray.init for the block unless Ray is already initialised (then reuse it and leave it running)."""
    import ray

    for k, v in (RAY_ENV if rc.address else LOCAL_RAY_ENV).items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        yield ray
        return
    if rc.address:
        check_reachable(rc.address)
    # With a run log (tasks.console: `rca run/stage`), the workers' stdout/stderr reach the driver as usual
    # (log_to_driver, from every node), where Ray prints them to sys.stdout/sys.stderr: console.ray_output
    # sends those to the run log instead of the console.
    env = {"env_vars": {**worker_env(local=not rc.address), **console.worker_log_env()}}
    try:
        if rc.address:
            ctx = ray.init(address=rc.address, runtime_env=env, log_to_driver=True, logging_level="WARNING")
        else:
            ctx = ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env,
                           log_to_driver=True, configure_logging=True, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = rc.address or "a local Ray instance"
        raise RuntimeError(f"cannot connect to Ray at {where} (ray.address): {e}") from e
    with console.ray_output(session_dir=(getattr(ctx, "address_info", None) or {}).get("session_dir")):
        if console.active():
            res = ray.cluster_resources()
            nodes = len([n for n in ray.nodes() if n.get("Alive")])
            console.say(f"Ray: {'cluster ' + rc.address if rc.address else 'local'}, {nodes} node(s), "
                        f"{res.get('CPU', 0):g} CPUs" + (f", {res['GPU']:g} GPUs" if res.get("GPU") else "")
                        + ("" if console.verbose() else " (worker output: run log)"))
        try:
            yield ray
        finally:
            try:
                from .actor_pool import release_pools

                release_pools()  # the run's pooled actors
            finally:
                ray.shutdown()
