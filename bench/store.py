"""The artifact store: its cost against plain files, on S3 against local disk, and its S3 client's CPU.

    python bench/store.py BENCHMARK [options]      (python bench/store.py BENCHMARK --help)

vs-npy         the store vs one .npy file per image (IRN's layout) for the same CAMs: time and size
               (goals: at most 1.5x the time, at least 3x smaller)
s3             per-image stages with the store on S3 (SeaweedFS on 127.0.0.1) vs on local disk (goal: <= 1.3x)
s3-client-cpu  CPU per store entry on S3: the store's obstore path vs its s3fs path

Each run writes its record to bench/results/store.BENCHMARK.json (docs/benchmarks.md: python scripts/bench_table.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._lib.cli import Benchmark, Subject  # noqa: E402
from bench._lib.common import Timer  # noqa: E402
from bench._lib.demo import DEMO_CONFIG, config_file, make_cams  # noqa: E402
from bench._lib.records import Result, goal, slug  # noqa: E402


# ============================================================================================ vs-npy
def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _layouts(cams, ids, tmp: Path) -> list[dict]:
    """One round: every layout writes then reads the same CAMs into a fresh folder under tmp."""
    import numpy as np
    import zarr

    from rca_core.cam_ops import decode_cam, encode_cam
    from rca_core.store import COMPRESSORS, ArtifactStore

    rows = []
    # IRN layout: one .npy per image (float32, {"keys", "high_res"} dict in IRN; plain array here)
    d = tmp / "npy"
    d.mkdir()
    with Timer() as tw:
        for i, c in zip(ids, cams):
            np.save(d / f"{i}.npy", c)
    with Timer() as tr:
        _ = [np.load(d / f"{i}.npy") for i in ids]
    rows.append({"layout": "npy per image (float32)", "write_s": tw.seconds, "read_s": tr.seconds,
                 "disk_mib": _du(d) / 2**20})
    # the artifact store (one Zarr array per image, COMPRESSORS, checksum marker), as cam_infer.dtype stores CAMs:
    # uint8 (the default) and float16; read back as the stages do, checksum verified and decoded to float32
    for dtype in ("uint8", "float16"):
        store = ArtifactStore(tmp / f"zarr_{dtype}").stage("cam_infer", "bench").prepare(["cam"])
        with Timer() as tw:
            for i, c in zip(ids, cams):
                store.write(i, {"cam": encode_cam(c, dtype)}, attrs={"classes": [1]})
        with Timer() as tr:
            back = [decode_cam(store.read(i, "cam")[0]) for i in ids]
        err = max(float(np.abs(a - b).max()) for a, b in zip(back, cams))
        rows.append({"layout": f"store, array per image ({dtype}, verified)", "write_s": tw.seconds,
                     "read_s": tr.seconds, "disk_mib": _du(tmp / f"zarr_{dtype}") / 2**20, "max_abs_error": err})
    # padded single array, one chunk per image (no per-image metadata, no checksum), through zarr-python
    cmax = max(c.shape[0] for c in cams)
    hmax = max(c.shape[1] for c in cams)
    wmax = max(c.shape[2] for c in cams)
    z = zarr.create_array(str(tmp / "padded"), shape=(len(cams), cmax, hmax, wmax), dtype=np.uint8,
                          chunks=(1, cmax, hmax, wmax), compressors=COMPRESSORS, fill_value=0)
    with Timer() as tw:
        for k, c in enumerate(cams):
            buf = np.zeros((cmax, hmax, wmax), np.uint8)
            buf[: c.shape[0], : c.shape[1], : c.shape[2]] = encode_cam(c, "uint8")
            z[k] = buf
    with Timer() as tr:
        _ = [z[k][: c.shape[0], : c.shape[1], : c.shape[2]] for k, c in enumerate(cams)]
    rows.append({"layout": "zarr padded (N,Cmax,Hmax,Wmax) uint8", "write_s": tw.seconds, "read_s": tr.seconds,
                 "disk_mib": _du(tmp / "padded") / 2**20})
    # the file-system part alone: the same entries with no bytes in them, created then opened, in each layout
    for name, per_image in (("file entries only: npy's layout (1 file per image)", ("{i}.npy",)),
                            ("file entries only: the store's layout (folder + 2 files per image)",
                             ("{i}/", "{i}/c.0.0.0", "{i}/zarr.json"))):
        d = tmp / f"entries-{len(per_image)}"
        d.mkdir()
        files = [rel.format(i=i) for i in ids for rel in per_image]
        with Timer() as tw:
            for rel in files:
                if rel.endswith("/"):
                    os.mkdir(d / rel)
                else:
                    with open(d / rel, "wb"):
                        pass
        with Timer() as tr:
            for rel in files:
                if not rel.endswith("/"):
                    with open(d / rel, "rb") as f:
                        f.read()
        rows.append({"layout": name, "write_s": tw.seconds, "read_s": tr.seconds, "disk_mib": 0.0})
    return rows


def vs_npy_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5, help="rounds of every layout; the table shows medians")
    ap.add_argument("--dir", default=None, help="where the rounds' folders are made (default: the system's temp "
                                                "folder); e.g. runs/bench, beside the store's default location")


def vs_npy(args) -> Result:
    """Artifact store vs one .npy file per image (IRN's layout) for the same CAMs: write/read time, size.

Goals: at most 1.5x the time, at least 3x smaller on disk, for the default uint8 CAMs (float16 shown too). CAMs are
realistic: smooth maps in [0,1] with most of the area near zero (as normalised CAMs are), stored as cam_infer.dtype
does and read back as the stages read them (checksum verified, decoded to float32); IRN saves float32 .npy, so
that is the baseline. Also measures the padded single-array layout (one (N, Cmax, Hmax, Wmax) array, one chunk per
image), to justify the layout choice, and the file-system part alone: the same entries without bytes (one file
per image for .npy; a folder and two files for a Zarr v3 array per image), which bounds from below what any
encoding work can reach. --dir picks where the rounds' folders are made."""
    import numpy as np

    cams = make_cams(args.images)
    ids = [f"img_{i:05d}" for i in range(len(cams))]
    raw_mib = sum(c.nbytes for c in cams) / 2**20
    rounds = []
    for _ in range(args.repeats):
        if args.dir:
            Path(args.dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="store_vs_npy_", dir=args.dir))
        try:
            rounds.append(_layouts(cams, ids, tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for k, first in enumerate(rounds[0]):
        row = dict(first)
        for col in ("write_s", "read_s"):
            row[col] = float(np.median([rd[k][col] for rd in rounds]))
        totals = [rd[k]["write_s"] + rd[k]["read_s"] for rd in rounds]
        row["total_min_s"], row["total_max_s"] = min(totals), max(totals)
        rows.append(row)
    npy = rows[0]

    def total(r):
        return r["write_s"] + r["read_s"]

    def ratios(row):
        return total(row) / total(npy), npy["disk_mib"] / row["disk_mib"]

    t8, s8 = ratios(rows[1])
    t16, s16 = ratios(rows[2])
    entries_npy, entries_store = total(rows[4]), total(rows[5])
    # the store's time if everything but its file-system entries cost what .npy's whole write+read costs beyond
    # its one entry: a lower bound that no encoding work can go under
    floor = (entries_store + max(0.0, total(npy) - entries_npy)) / total(npy)
    goals = [goal("store (uint8, the default) write+read time <= 1.5x npy", round(t8, 3), t8 <= 1.5),
             goal("store (uint8, the default) at least 3x smaller than npy", round(s8, 2), s8 >= 3.0),
             goal("store (float16) write+read time <= 1.5x npy", round(t16, 3), t16 <= 1.5, counts=False),
             goal("store (float16) at least 3x smaller than npy", round(s16, 2), s16 >= 3.0, counts=False)]
    notes = (f"{len(cams)} VOC-sized CAMs (300-500 px, 1-3 classes), {raw_mib:.0f} MiB as float32; medians of "
             f"{args.repeats} rounds (total_min_s/total_max_s: the spread of write+read). Time ratio (write+read) "
             f"store/npy: uint8 {t8:.2f}, float16 {t16:.2f}; size ratio npy/store: uint8 {s8:.1f}, float16 {s16:.1f}. "
             f"File-system entries alone (no bytes): npy's layout {1000 * entries_npy / len(cams):.2f} ms per image, "
             f"the store's {1000 * entries_store / len(cams):.2f} ms; with the store's entries and everything else at "
             f".npy's cost, the ratio would still be {floor:.2f} (the layout's floor). Folders made in "
             f"{args.dir or tempfile.gettempdir()}.")
    return Result(f"Artifact store vs .npy per image (CAMs, folders in {args.dir or tempfile.gettempdir()})", rows,
                  goals=goals, goal_text="uint8 store: write+read <= 1.5x npy and >= 3x smaller",
                  headline={"time store/npy (uint8)": round(t8, 2), "size npy/store (uint8)": round(s8, 2),
                            "layout's floor": round(floor, 2)}, notes=notes,
                  details={"images": len(cams), "repeats": args.repeats, "raw_float32_mib": raw_mib, "rounds": rounds,
                           "time_ratio_uint8_over_npy": t8, "size_ratio_npy_over_uint8": s8,
                           "time_ratio_float16_over_npy": t16, "size_ratio_npy_over_float16": s16,
                           "entries_seconds_npy_layout": entries_npy, "entries_seconds_store_layout": entries_store,
                           "time_ratio_floor_of_the_layout": floor})


# ============================================================================================ s3
S3_GOAL = 1.3


def s3_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", default=DEMO_CONFIG)
    ap.add_argument("--images", type=int, default=200, help="training images of the demo set")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--stages", nargs="+", default=["cam_infer", "crf_labels"])
    ap.add_argument("--data-on-s3", action="store_true", help="also time S3 runs with data.root in the bucket")


def s3(args) -> Result:
    """A per-image stage with its artifact store on S3 vs on local disk (goal: at most 1.3x the time).

Starts a real SeaweedFS S3 server on 127.0.0.1 (the test harness's), runs cam_train and memory_build of the demo
config once into a local store, copies those stages into an S3 store (same keys), then times cam_infer and
crf_labels in each store, in this process (1 torch thread, rca_core.stages.local.run_planned_stage: the one
per-image lifecycle with concurrent verification, prefetch, write-behind), alternating local and S3 runs; the
best of --repeat runs counts. The data set stays on local disk in both runs unless --data-on-s3, which also times
S3-store runs with the data tree in the bucket. Each timed run starts from an empty stage folder."""
    import torch

    from bench._lib.harness import s3_bucket
    from rca_core import storage
    from rca_core.config import load_config
    from rca_core.stages.local import run_planned_stage, run_stage
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="rca-bench-s3-"))
    rows = []
    times: dict[tuple[str, str], list[float]] = {}
    try:
        with s3_bucket(work, "bench") as srv:
            ov = {"store": str(work / "local-store"), "data": {"root": str(work / "data"),
                                                             "demo": {"n_train": args.images, "n_val": 8}},
                  "cam": {"train": {"epochs": 1}}}
            local = load_config(config_file(args.config), ov)
            remote = local.model_copy(update={"store": "s3://bench/store"}, deep=True)
            t = time.perf_counter()
            run_stage("memory_build", local, show_progress=False)  # + cam_train
            setup_s = time.perf_counter() - t
            plans = plan(local)
            fs = srv.filesystem()
            for name in ("cam_train", "memory_build"):
                storage.upload_tree(Path(local.store) / plans[name].key, f"s3://bench/store/{plans[name].key}")
                fs.pipe(f"bench/store/{name}/zarr.json", (Path(local.store) / name / "zarr.json").read_bytes())
            fs.pipe("bench/store/zarr.json", (Path(local.store) / "zarr.json").read_bytes())
            variants = [("local", local), ("s3", remote)]
            if args.data_on_s3:
                storage.upload_tree(local.data.root, "s3://bench/data")
                remote_data = remote.model_copy(deep=True)
                remote_data.data.root = "s3://bench/data"
                variants.append(("s3 + data on s3", remote_data))

            def clear(cfg, name):
                key = plan(cfg)[name].key
                if storage.is_url(cfg.store):
                    path = f"bench/store/{key}"
                    if fs.exists(path):
                        fs.rm(path, recursive=True)
                else:
                    shutil.rmtree(Path(cfg.store) / key, ignore_errors=True)

            for name in args.stages:
                for _ in range(args.repeat):
                    for label, cfg in variants:
                        clear(cfg, name)
                        store = ArtifactStore.for_config(cfg)
                        t = time.perf_counter()
                        run_planned_stage(name, cfg, store, plan(cfg), show_progress=False)
                        times.setdefault((name, label), []).append(time.perf_counter() - t)
                base = min(times[(name, "local")])
                for label, _ in variants:
                    best = min(times[(name, label)])
                    rows.append({"stage": name, "store": label, "images": args.images,
                                 f"seconds (best of {args.repeat})": round(best, 2),
                                 "ms/image": round(1000 * best / args.images, 1),
                                 "ratio vs local": round(best / base, 3)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    worst = max(r["ratio vs local"] for r in rows if r["store"] == "s3")
    notes = ("SeaweedFS on 127.0.0.1 (one process, loopback: no network latency beyond the HTTP round trip, and the "
             "server shares the machine's cores with the stage); the stage runner verifies finished images "
             "concurrently, reads the next images' inputs ahead and writes behind, so request latency overlaps "
             "compute. In-process, 1 torch thread.")
    return Result("Per-image stages: S3 store vs local store", rows,
                  goals=[goal(f"per-image stage over an S3 store <= {S3_GOAL}x the local store's time", worst,
                              worst <= S3_GOAL)],
                  headline={"worst S3 / local": worst}, notes=notes,
                  details={"setup_seconds": setup_s, "times": {f"{k[0]}/{k[1]}": v for k, v in times.items()}})


# ============================================================================================ s3-client-cpu
def s3_client_cpu_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--entries", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)


def s3_client_cpu(args) -> Result:
    """CPU per store entry on S3: the store's obstore path vs its s3fs path (per-image stages over S3).

Starts a real SeaweedFS on 127.0.0.1 (the test harness's) and writes, then reads back (checksum verified),
--entries one-chunk entries of a VOC-sized uint8 CAM through StageOutput, 4 threads at a time as the stages' I/O
threads do, once per path: obstore (rca_core.storage.object_store, the default with a key in the environment) and
s3fs (the fallback). Reports wall time, this process's CPU (user + system, all threads) and the server's, per
entry (medians of --rounds). On a node whose cores also compute, the client's CPU is taken from the stage. No goal:
the figure that chose obstore."""
    import numpy as np

    from bench._lib.cpu import cpu_of, cpu_self
    from bench._lib.harness import s3_bucket
    from rca_core.cam_ops import encode_cam
    from rca_core.store import ArtifactStore

    cams = [encode_cam(c, "uint8") for c in make_cams(20)]
    work = Path(tempfile.mkdtemp(prefix="rca-bench-s3cpu-"))
    runs: dict[tuple[str, str], list[dict]] = {}
    try:
        with s3_bucket(work, "cpu") as srv:
            weed = [srv.pid] if srv.pid else []
            pool = ThreadPoolExecutor(4)
            for r in range(args.rounds):
                for path in ("obstore", "s3fs"):
                    out = ArtifactStore("s3://cpu/run").stage("cam_infer", f"{path}{r}").prepare(["cam"])
                    if path == "s3fs":
                        out.object_fast_path = False  # the store's own switch: per-image entries through s3fs
                    elif out._entries.client() is None:
                        raise SystemExit("obstore is not installed (pip install -e '.[s3]')")
                    ids = [f"img_{i:05d}" for i in range(args.entries)]
                    for op, fn in (("write", lambda i: out.write(i, {"cam": cams[int(i[4:]) % len(cams)]},
                                                                 attrs={"classes": [1]})),
                                   ("read", lambda i: out.read(i, "cam"))):
                        c0, w0, t0 = cpu_self(), cpu_of(weed), time.perf_counter()
                        list(pool.map(fn, ids))
                        runs.setdefault((path, op), []).append({"wall": time.perf_counter() - t0,
                                                                "cpu": cpu_self() - c0, "server": cpu_of(weed) - w0})
            pool.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for (path, op), rs in runs.items():
        med = {k: float(np.median([x[k] for x in rs])) for k in ("wall", "cpu", "server")}
        rows.append({"path": path, "op": op, "entries": args.entries, "wall_s": med["wall"],
                     "client_cpu_ms_per_entry": 1e3 * med["cpu"] / args.entries,
                     "server_cpu_ms_per_entry": 1e3 * med["server"] / args.entries})
    by = {(r["path"], r["op"]): r["client_cpu_ms_per_entry"] for r in rows}
    return Result("S3 client CPU per store entry: obstore vs s3fs", rows,
                  headline={"client CPU ms per entry write / read, obstore": f"{by[('obstore', 'write')]:.2f} / "
                                                                             f"{by[('obstore', 'read')]:.2f}",
                            "s3fs": f"{by[('s3fs', 'write')]:.2f} / {by[('s3fs', 'read')]:.2f}"},
                  notes=(f"SeaweedFS on 127.0.0.1; {args.entries} entries (one uint8 CAM of 300-500 px, zarr.json + "
                         f"one chunk) per round, 4 threads; medians of {args.rounds} rounds. Client CPU: this "
                         "process, all threads. No goal."),
                  details={"runs": {f"{k[0]}/{k[1]}": v for k, v in runs.items()}})


SUBJECT = Subject("store", __doc__, [
    Benchmark("vs-npy", "the store vs one .npy per image: time (goal <= 1.5x) and size (goal >= 3x smaller)",
              vs_npy_args, vs_npy, lambda a: f"dir-{slug(a.dir)}" if a.dir else None, "--dir D (dir-D)"),
    Benchmark("s3", "per-image stages with the store on S3 vs local disk (goal <= 1.3x)", s3_args, s3),
    Benchmark("s3-client-cpu", "client CPU per store entry on S3: obstore vs s3fs", s3_client_cpu_args,
              s3_client_cpu),
])

if __name__ == "__main__":
    sys.exit(SUBJECT.main())
