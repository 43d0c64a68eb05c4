"""CAM quality on 1 vs 2 training workers: the same recipe must give the same CAMs (issue 14 "Show").

    python bench/workers_equivalence.py --config configs/demo.yaml --seeds 3 --json OUT.json

For each seed it trains the CAM network twice from scratch, in separate stores: once in one process
(no torch.distributed, the `rca stage --local` path) and once on 2 ranks of torch.distributed (gloo,
one process per rank, as Ray Train runs it), with the config's global `cam.train.batch_size`
(each rank half of it). Then memory_build -> cam_infer -> cam_eval score both on the same first
--subset training images (bench/cam_ablation.py's forked-child runner). It prints CAM mIoU per seed
and worker count, the per-seed difference, and compares the mean |difference| with the spread over
seeds. Also checked per run: global batch, optimizer steps and the lr of every epoch (must be equal).
Budget: --epochs 3 (CAMs peak early, NOTES.md; the contrast warm-up scaled to 1 epoch as in
cam_ablation.py), 1 torch thread per process. On the 2-core machine one seed is about 6-7 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cam_ablation import run_part  # noqa: E402
from bench.common import goal, markdown_table, report  # noqa: E402
from rca_core.config import load_config, parse_overrides  # noqa: E402
from rca_core.config.base import deep_update  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, cfg_dict: dict, store: str, port: int, out_json: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RCA_NO_PROGRESS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from rca_core.config import config_from_dict
    from rca_core.stages import cam_train
    from rca_core.stages.context import make_context
    from rca_core.store import ArtifactStore

    cfg = config_from_dict(cfg_dict)
    s = ArtifactStore(store, create=False)
    ctx = make_context("cam_train", cfg, s, generate=False)
    if rank == 0:
        ctx.out.prepare(())
    if world > 1:
        dist.barrier()
    t = time.perf_counter()
    summary = cam_train.train(cfg, ctx)
    seconds = time.perf_counter() - t
    if rank == 0:
        ctx.out.mark_complete(summary)
        Path(out_json).write_text(json.dumps({"summary": summary, "seconds": seconds}, default=str))
    if world > 1:
        dist.destroy_process_group()


def train_cam(cfg_dict: dict, store: str, world: int, work: Path) -> dict:
    """cam_train on `world` ranks (1 = a plain process without torch.distributed)."""
    import torch.multiprocessing as mp

    out_json = str(work / f"cam_train_w{world}.json")
    if world == 1:
        p = mp.get_context("spawn").Process(target=_rank_main, args=(0, 1, cfg_dict, store, 0, out_json))
        p.start()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"cam_train (1 worker) failed with exit code {p.exitcode}")
    else:
        mp.spawn(_rank_main, args=(world, cfg_dict, store, _free_port(), out_json), nprocs=world)
    return json.loads(Path(out_json).read_text())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-list", default=None, help="comma list of seeds instead of range(--seeds)")
    ap.add_argument("--epochs", type=float, default=3, help="cam.train.epochs (0 = the config's)")
    ap.add_argument("--warmup-epochs", type=float, default=1, help="cam.contrast.warmup_epochs (negative = config's)")
    ap.add_argument("--subset", type=int, default=200, help="memory build / CAM inference / eval on the first N images")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare")
    ap.add_argument("--work", default="bench/out/workers_equivalence")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides key.sub=value")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    args = ap.parse_args(argv)
    t0 = time.time()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    worlds = [int(w) for w in args.workers.split(",")]
    seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    over = parse_overrides(args.set)
    if args.epochs:
        over = deep_update(over, {"cam": {"train": {"epochs": args.epochs}}})
    if args.warmup_epochs >= 0:
        over = deep_update(over, {"cam": {"contrast": {"warmup_epochs": args.warmup_epochs}}})
    runs = []
    for seed in seeds:
        for world in worlds:
            store = str(work / f"store_s{seed}_w{world}")
            cfg = load_config(args.config, deep_update(over, {"seed": seed, "store": store}))
            cfg_dict = cfg.model_dump(mode="json")
            from rca_core.data import make_dataset

            from rca_core.store import ArtifactStore

            make_dataset(cfg.data, cfg.data.train_split, progress=False)  # the driver generates the demo set
            ArtifactStore(store)  # the driver creates the store; the ranks open it
            tr = train_cam(cfg_dict, store, world, work)
            s = tr["summary"]
            run = {"seed": seed, "workers": world, "global_batch": s["global_batch"],
                   "per_rank_batch": s["per_rank_batch"], "steps": s["steps"],
                   "epoch_lrs": [h["lr"] for h in s["history"]], "final_map": s["final_map"],
                   "cam_train_s": round(tr["seconds"], 1)}
            for name in ("memory_build", "cam_infer", "cam_eval"):
                summary, seconds, _, _ = run_part(name, cfg_dict, store, 1, args.subset)
                run[f"{name}_s"] = round(seconds, 1)
                if name == "cam_eval":
                    run["miou"] = summary["miou"]
                    run["threshold"] = summary["best_threshold"]
            runs.append(run)
            print(f"[workers_equivalence] seed {seed}, {world} worker(s): CAM mIoU {run['miou']:.4f} "
                  f"(t={run['threshold']}), steps {run['steps']}, global batch {run['global_batch']}, "
                  f"train {run['cam_train_s']} s", flush=True)
    rows = [{k: r[k] for k in ("seed", "workers", "global_batch", "per_rank_batch", "steps", "final_map", "miou",
                                "threshold", "cam_train_s", "memory_build_s", "cam_infer_s", "cam_eval_s")}
            for r in runs]
    by = {(r["seed"], r["workers"]): r for r in runs}
    diffs = [by[(s, worlds[1])]["miou"] - by[(s, worlds[0])]["miou"] for s in seeds] if len(worlds) > 1 else []
    miou = {w: [by[(s, w)]["miou"] for s in seeds] for w in worlds}
    spread = statistics.stdev(miou[worlds[0]]) if len(seeds) > 1 else float("nan")
    same_recipe = all(by[(s, w)]["global_batch"] == by[(s, worlds[0])]["global_batch"]
                      and by[(s, w)]["steps"] == by[(s, worlds[0])]["steps"]
                      and by[(s, w)]["epoch_lrs"] == by[(s, worlds[0])]["epoch_lrs"] for s in seeds for w in worlds)
    mean_abs = statistics.fmean(abs(d) for d in diffs) if diffs else float("nan")
    summary_rows = [{"workers": w, "seeds": len(seeds), "miou_mean": statistics.fmean(miou[w]),
                     "miou_std": statistics.stdev(miou[w]) if len(seeds) > 1 else 0.0,
                     "cam_train_s_mean": statistics.fmean(by[(s, w)]["cam_train_s"] for s in seeds)} for w in worlds]
    result = {"runs": runs, "miou": {str(w): v for w, v in miou.items()}, "diff_per_seed": diffs,
              "mean_abs_diff": mean_abs, "seed_std": spread, "seconds": time.time() - t0,
              "same_batch_steps_lr": goal("same global batch, steps and per-epoch lr on every worker count",
                                          same_recipe, same_recipe),
              "within_seed_noise": goal(f"mean |mIoU({worlds[-1]} workers) - mIoU({worlds[0]})| below the seed std",
                                        f"{mean_abs:.4f} vs std {spread:.4f}", bool(diffs) and mean_abs < spread)}
    notes = (f"Total {result['seconds']:.0f} s. Each run from scratch in its own store; cam_train with "
             f"{args.epochs or 'the config'} epochs (warm-up {args.warmup_epochs}), 1 torch thread per process "
             f"(the 2-worker run uses both cores); memory_build / cam_infer / cam_eval on the first {args.subset} "
             f"training images. Per-seed difference (2 - 1 workers): "
             + ", ".join(f"{d:+.4f}" for d in diffs) + ".\n\nPer run:\n\n" + markdown_table(rows))
    report("CAM mIoU on 1 vs 2 training workers (bench/workers_equivalence.py)", summary_rows, result, args.json,
           notes=notes, append=not args.no_append)
    return result


if __name__ == "__main__":
    main()
