"""Artifact store vs one .npy file per image (IRN's layout) for the same CAMs: write/read time, size.

Goals (issue 15): at most 1.5x the time, at least 3x smaller on disk (issue 7 asked 1.2x). CAMs are realistic: smooth maps
in [0,1] with most of the area near zero (as normalised CAMs are), stored as cam_infer.dtype does (uint8 by
default, float16 too) and read back as the stages read them (checksum verified, decoded to float32); IRN saves
float32 .npy (high-res CAMs as float32 in a dict per image), so that is the baseline.
Also measures the padded single-array layout (one (N, Cmax, Hmax, Wmax) array, one chunk per image)
that NOTES.md found faster for masks, to justify the layout choice. And the file-system part alone: the same
entries without bytes (one file per image for .npy; a folder and two files for a Zarr v3 array per image), which
bounds from below what any encoding work can reach. `--dir` picks where the rounds' folders are made.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, goal, report  # noqa: E402

from rca_core.cam_ops import decode_cam, encode_cam  # noqa: E402
from rca_core.store import COMPRESSORS, ArtifactStore  # noqa: E402


def make_cams(n: int, seed: int = 0, voc_like: bool = True):
    rng = np.random.default_rng(seed)
    cams = []
    for i in range(n):
        h, w = (int(rng.integers(300, 501)), int(rng.integers(300, 501))) if voc_like else (96, 96)
        c = int(rng.integers(1, 4))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        maps = []
        for _ in range(c):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            s = rng.uniform(0.1, 0.3) * max(h, w)
            m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
            m += 0.02 * rng.standard_normal((h, w)).astype(np.float32)
            m = np.clip(m, 0, None)
            maps.append(m / m.max())
        cams.append(np.stack(maps).astype(np.float32))
    return cams


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_layouts(cams, ids, tmp: Path) -> list[dict]:
    """One round: every layout writes then reads the same CAMs into a fresh folder under tmp."""
    import zarr

    rows = []
    # IRN layout: one .npy per image (float32, {"keys", "high_res"} dict in IRN; plain array here)
    d = tmp / "npy"; d.mkdir()
    with Timer() as tw:
        for i, c in zip(ids, cams):
            np.save(d / f"{i}.npy", c)
    with Timer() as tr:
        _ = [np.load(d / f"{i}.npy") for i in ids]
    rows.append({"layout": "npy per image (float32)", "write_s": tw.seconds, "read_s": tr.seconds, "disk_mib": du(d) / 2**20})
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
        rows.append({"layout": f"store, array per image ({dtype}, verified)", "write_s": tw.seconds, "read_s": tr.seconds,
                     "disk_mib": du(tmp / f"zarr_{dtype}") / 2**20, "max_abs_error": err})
    # padded single array, one chunk per image (no per-image metadata, no checksum), through zarr-python
    cmax = max(c.shape[0] for c in cams); hmax = max(c.shape[1] for c in cams); wmax = max(c.shape[2] for c in cams)
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
                 "disk_mib": du(tmp / "padded") / 2**20})
    # the file-system part alone: the same entries with no bytes in them, created then opened, in each layout
    for name, per_image in (("file entries only: npy's layout (1 file per image)", ("{i}.npy",)),
                            ("file entries only: the store's layout (folder + 2 files per image)",
                             ("{i}/", "{i}/c.0.0.0", "{i}/zarr.json"))):
        d = tmp / f"entries-{len(per_image)}"; d.mkdir()
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


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5, help="rounds of every layout; the table shows medians")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--note", default="", help="a remark appended to the notes")
    ap.add_argument("--dir", default=None, help="where the rounds' folders are made (default: the system's temp "
                                                "folder); e.g. runs/bench, beside the store's default location")
    args = ap.parse_args()
    cams = make_cams(args.images)
    ids = [f"img_{i:05d}" for i in range(len(cams))]
    raw_mib = sum(c.nbytes for c in cams) / 2**20
    rounds = []
    for r in range(args.repeats):
        if args.dir:
            Path(args.dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="store_vs_npy_", dir=args.dir))
        try:
            rounds.append(run_layouts(cams, ids, tmp))
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

    def ratios(row):
        return ((row["write_s"] + row["read_s"]) / (npy["write_s"] + npy["read_s"]), npy["disk_mib"] / row["disk_mib"])

    t8, s8 = ratios(rows[1])
    t16, s16 = ratios(rows[2])
    total = lambda r: r["write_s"] + r["read_s"]  # noqa: E731
    entries_npy, entries_store = total(rows[4]), total(rows[5])
    # the store's time if everything but its file-system entries cost what .npy's whole write+read costs beyond
    # its one entry: a lower bound that no encoding work can go under
    floor = (entries_store + max(0.0, total(npy) - entries_npy)) / total(npy)
    result = {
        "images": len(cams), "repeats": args.repeats, "raw_float32_mib": raw_mib, "rows": rows, "rounds": rounds,
        "time_ratio_uint8_over_npy": t8, "size_ratio_npy_over_uint8": s8,
        "time_ratio_float16_over_npy": t16, "size_ratio_npy_over_float16": s16,
        "entries_seconds_npy_layout": entries_npy, "entries_seconds_store_layout": entries_store,
        "time_ratio_floor_of_the_layout": floor,
        "speed_goal": goal("store (uint8, the default) write+read time <= 1.5x npy", round(t8, 3), t8 <= 1.5),
        "size_goal": goal("store (uint8, the default) at least 3x smaller than npy", round(s8, 2), s8 >= 3.0),
        "speed_goal_float16": goal("store (float16) write+read time <= 1.5x npy", round(t16, 3), t16 <= 1.5),
        "size_goal_float16": goal("store (float16) at least 3x smaller than npy", round(s16, 2), s16 >= 3.0),
    }
    report("Artifact store vs .npy per image (CAMs)", rows, result, args.json, append=not args.no_append,
           notes=f"{len(cams)} VOC-sized CAMs (300-500 px, 1-3 classes), {raw_mib:.0f} MiB as float32; medians of "
                 f"{args.repeats} rounds (total_min_s/total_max_s: the spread of write+read). Time ratio (write+read) "
                 f"store/npy: uint8 {t8:.2f}, float16 {t16:.2f}; size ratio npy/store: uint8 {s8:.1f}, float16 {s16:.1f}. "
                 f"File-system entries alone (no bytes): npy's layout {1000 * entries_npy / len(cams):.2f} ms per image, "
                 f"the store's {1000 * entries_store / len(cams):.2f} ms; with the store's entries and everything else at "
                 f".npy's cost, the ratio would still be {floor:.2f} (the layout's floor). Folders made in "
                 f"{args.dir or tempfile.gettempdir()}." + (f" {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()
