"""Growth: peak memory and time of the pipeline on the demo data set at 1x and 4x the images.

Goals (issue 7): memory flat (peak RSS at 4x within 1.2x of 1x) and time linear (time at 4x no
more than 1.2 x 4 = 4.8x the time at 1x). Every step runs in its own fresh subprocess (the plain
runner rca_core.stages.run_stage, one torch thread), so its peak RSS (from os.wait4) is its own:
first generating the demo set, then each stage in dependency order into a fresh store per scale.
Train and val images are both scaled. The training stages run --train-epochs epochs (default 1) at
both scales, so their work grows with the images like every other stage's. "stage s" is the time
inside the subprocess after its imports (the linearity figure); "wall s" includes start-up.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, goal, report  # noqa: E402
from stage_throughput import BENCH_RUNS, add_config_args, bench_config, describe, setup_env  # noqa: E402

MEM_GOAL, TIME_GOAL = 1.2, 1.2


def child(cfg_path: str, step: str) -> None:
    setup_env()
    import torch

    torch.set_num_threads(1)
    from rca_core.config import RunConfig

    cfg = RunConfig.model_validate(json.loads(Path(cfg_path).read_text()))
    t = time.perf_counter()
    if step == "data":
        from rca_core.data import make_dataset

        n = sum(len(make_dataset(cfg.data, s, progress=False).ids)
                for s in sorted({cfg.data.train_split, cfg.data.val_split}))
    else:
        from rca_core.stages.local import run_stage

        summary = run_stage(step, cfg, cfg.store, with_upstream=False, show_progress=False)
        n = summary.get("images")
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - t, "images": n}), flush=True)


def run_step(cfg_path: Path, step: str, log: Path) -> dict:
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n=== {step}\n")
        f.flush()
        p = subprocess.Popen([sys.executable, __file__, "--child", str(cfg_path), step], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=f, text=True)
        stdout = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        raise SystemExit(f"step {step} failed (rc {p.returncode}); see {log}:\n" + log.read_text()[-3000:])
    res = json.loads(line[-1][7:])
    return {"step": step, "stage_s": res["seconds"], "wall_s": wall, "peak_rss_mib": ru.ru_maxrss / 1024.0,
            "images": res["images"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--scales", type=int, nargs=2, default=[1, 4], metavar=("LOW", "HIGH"))
    ap.add_argument("--stages", nargs="+", default=None, help="stages to run (default: all, in order)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    setup_env()
    from rca_core.config import load_config
    from rca_core.stages.registry import STAGE_NAMES as STAGES
    from rca_core.stages.planning import upstream_closure

    base_n = args.images or load_config(args.config).data.demo.n_train
    wanted = args.stages or STAGES
    probe = bench_config(args.config, base_n, args.train_epochs)
    order = [s for s in STAGES if any(s in upstream_closure(w, probe) for w in wanted)]
    steps = ["data"] + order
    work = BENCH_RUNS / "growth" / f"{probe.name}-{base_n}"
    res: dict[int, dict[str, dict]] = {}
    cfgs = {}
    for scale in args.scales:
        d = work / f"x{scale}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        cfg = bench_config(args.config, base_n * scale, args.train_epochs, store=d / "store", scale_val=True,
                           data_root=d / "data")
        cfgs[scale] = cfg
        cfg_path = d / "config.json"
        cfg_path.write_text(cfg.model_dump_json())
        res[scale] = {}
        for step in steps:
            r = run_step(cfg_path, step, d / "steps.log")
            res[scale][step] = r
            print(f"[bench] x{scale} {step}: {r['stage_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        shutil.rmtree(d / "data", ignore_errors=True)
        shutil.rmtree(d / "store", ignore_errors=True)
    lo, hi = args.scales
    k = hi / lo
    rows = []
    for step in steps:
        a, b = res[lo][step], res[hi][step]
        rows.append({"step": step, f"s_{lo}x": a["stage_s"], f"s_{hi}x": b["stage_s"], "time_ratio": b["stage_s"] / a["stage_s"],
                     f"rss_mib_{lo}x": a["peak_rss_mib"], f"rss_mib_{hi}x": b["peak_rss_mib"],
                     "rss_ratio": b["peak_rss_mib"] / a["peak_rss_mib"]})
    t_lo = sum(r["stage_s"] for r in res[lo].values())
    t_hi = sum(r["stage_s"] for r in res[hi].values())
    m_lo = max(r["peak_rss_mib"] for r in res[lo].values())
    m_hi = max(r["peak_rss_mib"] for r in res[hi].values())
    rows.append({"step": "all (time: sum, RSS: max)", f"s_{lo}x": t_lo, f"s_{hi}x": t_hi, "time_ratio": t_hi / t_lo,
                 f"rss_mib_{lo}x": m_lo, f"rss_mib_{hi}x": m_hi, "rss_ratio": m_hi / m_lo})
    worst_step = max(rows[:-1], key=lambda r: r["rss_ratio"])
    result = {"config": args.config, "train_images": {str(s): cfgs[s].data.demo.n_train for s in args.scales},
              "val_images": {str(s): cfgs[s].data.demo.n_val for s in args.scales}, "train_epochs": args.train_epochs,
              "rows": rows, "steps": {str(s): res[s] for s in args.scales},
              "memory_goal": goal(f"peak RSS at {hi}x <= {MEM_GOAL}x of {lo}x (largest step)", round(m_hi / m_lo, 3),
                                  m_hi / m_lo <= MEM_GOAL),
              "memory_goal_per_step": goal(f"every step's peak RSS at {hi}x <= {MEM_GOAL}x of {lo}x",
                                           f"{worst_step['step']} {worst_step['rss_ratio']:.3f}",
                                           worst_step["rss_ratio"] <= MEM_GOAL),
              "time_goal": goal(f"time at {hi}x <= {TIME_GOAL} x {k:g} x time at {lo}x (linear)",
                                round(t_hi / t_lo / k, 3), t_hi / t_lo / k <= TIME_GOAL)}
    notes = (f"{describe(cfgs[lo])} at {lo}x ({cfgs[lo].data.demo.n_val} val); {cfgs[hi].data.demo.n_train} train / "
             f"{cfgs[hi].data.demo.n_val} val at {hi}x. Training stages {args.train_epochs or 'as configured'} epoch(s). "
             f"Each row is one subprocess (plain runner); time ratio {hi}x/{lo}x of the sum = {t_hi / t_lo:.2f} "
             f"(linear = {k:g}); largest peak RSS {m_lo:.0f} -> {m_hi:.0f} MiB.")
    report(f"Growth: {lo}x -> {hi}x images, peak memory and time per step", rows, result, args.json,
           append=not args.no_append, notes=notes + (f" {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()
