"""CPU per store entry on S3: the store's obstore path vs its s3fs path (issue 12: per-image stages over S3).

Starts a real SeaweedFS on 127.0.0.1 (tests/harness/s3_server.py) and writes, then reads back (checksum verified),
--entries one-chunk entries of a VOC-sized uint8 CAM through StageOutput, 4 threads at a time as the stages' I/O
threads do, once per path: obstore (rca_core.storage.object_store, the default with a key in the environment)
and s3fs (the fallback). Reports wall time, this process's CPU (user + system, all threads) and the server's, per
entry. On a node whose cores also compute, the client's CPU is taken from the stage.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import report  # noqa: E402


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_of(pids: list[int]) -> float:
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--entries", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    from harness.s3_server import SeaweedS3
    from rca_core.cam_ops import encode_cam
    from rca_core.store import ArtifactStore

    from store_vs_npy import make_cams

    cams = [encode_cam(c, "uint8") for c in make_cams(20)]
    work = Path(tempfile.mkdtemp(prefix="rca-bench-s3cpu-"))
    s3 = SeaweedS3(work / "s3")
    runs: dict[tuple[str, str], list[dict]] = {}
    try:
        s3.start()
        os.environ.update(s3.env)
        s3.make_bucket("cpu")
        weed = [int(p) for p in subprocess.run(["pgrep", "-f", str(work / "s3")], capture_output=True,
                                                text=True).stdout.split()]
        pool = ThreadPoolExecutor(4)
        for r in range(args.rounds):
            for path in ("obstore", "s3fs"):
                out = ArtifactStore("s3://cpu/run").stage("cam_infer", f"{path}{r}").prepare(["cam"])
                if path == "s3fs":
                    out.object_fast_path = False
                elif out._entries.client() is None:
                    raise SystemExit("obstore is not installed (pip install -e '.[s3]')")
                ids = [f"img_{i:05d}" for i in range(args.entries)]
                for op, fn in (("write", lambda i: out.write(i, {"cam": cams[int(i[4:]) % len(cams)]}, attrs={"classes": [1]})),
                               ("read", lambda i: out.read(i, "cam"))):
                    c0, w0, t0 = cpu_self(), cpu_of(weed), time.perf_counter()
                    list(pool.map(fn, ids))
                    runs.setdefault((path, op), []).append({"wall": time.perf_counter() - t0, "cpu": cpu_self() - c0,
                                                            "server": cpu_of(weed) - w0})
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for (path, op), rs in runs.items():
        med = {k: float(np.median([x[k] for x in rs])) for k in ("wall", "cpu", "server")}
        rows.append({"path": path, "op": op, "entries": args.entries, "wall_s": med["wall"],
                     "client_cpu_ms_per_entry": 1e3 * med["cpu"] / args.entries,
                     "server_cpu_ms_per_entry": 1e3 * med["server"] / args.entries})
    result = {"rows": rows, "runs": {f"{k[0]}/{k[1]}": v for k, v in runs.items()}}
    report("S3 client CPU per store entry: obstore vs s3fs", rows, result, args.json, append=not args.no_append,
           notes=f"SeaweedFS on 127.0.0.1; {args.entries} entries (one uint8 CAM of 300-500 px, zarr.json + one chunk) "
                 f"per round, 4 threads; medians of {args.rounds} rounds. Client CPU: this process, all threads.")


if __name__ == "__main__":
    main()
