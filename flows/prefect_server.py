"""Start and stop a local Prefect server on 127.0.0.1 (SQLite in its own PREFECT_HOME).

`shared_local_server(home)` is what `rca run` uses when no PREFECT_API_URL is set: commands started from one
directory (one PREFECT_HOME) share one server instead of starting two on one SQLite file. The first starts it
(detached, its address in PREFECT_HOME/server.json), each registers itself in PREFECT_HOME/users/, and the last to
leave stops it; a server whose command was killed is found alive and reused, or found dead and replaced. The
decisions are taken under a file lock (PREFECT_HOME/server.lock). `local_prefect_server` (one server for one
block) serves the tests.
Prefect calls happen only in the flow (driver) process; Ray workers never talk to Prefect, so one
server serves a whole run.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(home: Path, port: int) -> dict[str, str]:
    url = f"http://127.0.0.1:{port}/api"
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_UI_API_URL": url,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
    }


def server_process_env(home: Path, port: int) -> dict[str, str]:
    """The server process's own environment: server_env plus quiet logging (its log is
    PREFECT_HOME/server.log). Clients keep their own PREFECT_LOGGING_LEVEL, so that their run logs reach
    the API and the UI at INFO (tasks.console keeps Prefect's console output off the terminal)."""
    return {**server_env(home, port), "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_LOGGING_LEVEL": os.environ.get("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")}


def wait_healthy(api_url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"Prefect server exited with code {proc.returncode} before it became healthy")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.5)
    raise RuntimeError(f"Prefect server at {api_url} not healthy after {timeout:.0f} s ({last})")


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """These environment variables for the block, the previous values (or their absence) back after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:  # a server this command started is its child: once it exits it is a zombie until reaped here
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:  # another command's server (or already reaped)
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _healthy(api: str) -> bool:
    try:
        wait_healthy(api, timeout=3)
        return True
    except RuntimeError:
        return False


def _users(home: Path) -> list[Path]:
    """The commands using the shared server now (dead ones' entries removed)."""
    d = home / "users"
    d.mkdir(exist_ok=True)
    live = []
    for f in d.iterdir():
        if f.name.isdigit() and _alive(int(f.name)):
            live.append(f)
        else:
            f.unlink(missing_ok=True)
    return live


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.time() + 20
    while time.time() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def shared_local_server(home: str | Path, set_env: bool = True):
    """A local server for PREFECT_HOME=`home` for the block, shared with every other command that uses the same
    home at the same time; yields (API URL, whether this command started it)."""
    import json

    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    state_file, me = home / "server.json", home / "users" / str(os.getpid())
    with _locked(home / "server.lock"):
        state = json.loads(state_file.read_text()) if state_file.exists() else None
        started = not (state and _alive(state["pid"]) and _healthy(state["api"]))
        if started:
            if state and _alive(state["pid"]):  # alive but not answering: not usable, not ours to keep
                _stop(state["pid"])
            port = free_port()
            env = {**os.environ, **server_process_env(home, port)}
            log = open(home / "server.log", "ab")
            proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                                     "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            log.close()
            try:
                wait_healthy(env["PREFECT_API_URL"], proc=proc)
            except BaseException:
                _stop(proc.pid)
                raise
            state = {"pid": proc.pid, "port": port, "api": env["PREFECT_API_URL"]}
            state_file.write_text(json.dumps(state))
        _users(home)
        me.write_text(str(time.time()))
    try:
        with _environment(server_env(home, state["port"]) if set_env else {}):
            yield state["api"], started
    finally:
        with _locked(home / "server.lock"):
            me.unlink(missing_ok=True)
            if not _users(home):  # the last one out stops the server
                _stop(state["pid"])
                state_file.unlink(missing_ok=True)


@contextlib.contextmanager
def local_prefect_server(home: str | Path, port: int | None = None, log_file: str | Path | None = None,
                         set_env: bool = True):
    """Run `prefect server start` on 127.0.0.1 for the duration of the block; yields the API URL."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {**os.environ, **server_process_env(home, port)}
    from tasks.console import PREFECT_LOGGING_YML

    if env.get("PREFECT_LOGGING_SETTINGS_PATH") == str(PREFECT_LOGGING_YML):
        del env["PREFECT_LOGGING_SETTINGS_PATH"]  # the command's console settings: the server keeps Prefect's own
    log = open(log_file or home / "server.log", "ab")
    prefect_bin = str(Path(sys.executable).with_name("prefect"))
    proc = subprocess.Popen([prefect_bin, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(env["PREFECT_API_URL"], proc=proc)
        with _environment(server_env(home, port) if set_env else {}):
            yield env["PREFECT_API_URL"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
