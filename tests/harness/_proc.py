"""Small helpers shared by the harness: free loopback ports, log tails, bounded process-group stops."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

# Ports are drawn from 20000-32767: below Linux's ephemeral range (32768-60999, where outgoing
# connections get their local ports) and above Ray's default worker range (10002-19999), so neither
# a client socket nor another test's default-configured Ray takes them between the check and the bind.
_LOW, _HIGH = 20000, 32767


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(offsets: list[int], span: int = 1, low: int = _LOW, high: int = _HIGH,
                    avoid: set[int] | None = None, tries: int = 500) -> int:
    """A base port B such that every B+o+k (o in offsets, 0 <= k < span) is free on 127.0.0.1."""
    avoid = avoid or set()
    rng = random.Random()
    top = high - max(offsets) - span
    for _ in range(tries):
        base = rng.randint(low, top)
        wanted = [base + o + k for o in offsets for k in range(span)]
        if not avoid.intersection(wanted) and all(port_is_free(p) for p in wanted):
            return base
    raise RuntimeError(f"no free port block with offsets {offsets} (span {span}) in {low}-{high}")


def free_ports(n: int, avoid: set[int] | None = None) -> list[int]:
    """n distinct free ports (not necessarily contiguous), none of them in `avoid`."""
    got: list[int] = []
    taken = set(avoid or ())
    for _ in range(n):
        p = free_port_block([0], avoid=taken)
        got.append(p)
        taken.add(p)
    return got


def tail(path: Path, n: int = 60) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(lines[-n:])


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A group whose only members are zombies still answers signal 0; look for a live member.
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_process(proc: subprocess.Popen, timeout: float, group: bool, signal_group_first: bool) -> None:
    """SIGTERM (to the process, or to its whole group), wait up to `timeout`, then SIGKILL its group.

    `proc` must have been started with start_new_session=True, so its pid is its process group id and
    the group holds only what it started.
    """
    pgid = proc.pid
    if proc.poll() is None:
        try:
            if signal_group_first:
                os.killpg(pgid, signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    if group:
        deadline = time.monotonic() + timeout
        # Children may still be finishing after the leader left; give them the rest of the grace time.
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if group:
        deadline = time.monotonic() + 10
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)


def pids_in_group(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (by parent links in /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []
