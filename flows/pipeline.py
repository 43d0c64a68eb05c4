"""The pipeline flow: data -> CAM training -> memory bank -> CAM inference/eval -> CRF -> AffinityNet
-> random walk pseudo-masks -> segmenter -> evaluation. Each stage is its own (sub)flow with a cached
task; a re-run of the same config shows finished stages as Cached and resumes unfinished images."""
from __future__ import annotations

import time

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from rca_core.config import RunConfig
from rca_core.config.run import config_notes
from rca_core.stages.local import record_run
from rca_core.stages.planning import plan, run_order
from rca_core.store import ArtifactStore
from tasks import console, progress
from tasks.cluster_fit import check_cluster_fits
from tasks.ray_runtime import ray_session

from .stage_flows import STAGE_FLOWS, prepare_config

METRIC_KEYS = ("miou", "miou_all", "miou_confident", "kept_fraction", "best_threshold", "map", "val_miou",
               "miou_single_scale", "gflop_per_s", "flop_utilisation")


@task(name="prepare-data")
def prepare_data(config: RunConfig) -> dict:
    """Generate the demo set if needed and validate every split the pipeline reads."""
    from rca_core.data import make_dataset

    splits = {config.data.train_split, config.data.eval_split, config.data.val_split}
    return {s: len(make_dataset(config.data, s, storage_options=config.storage).ids) for s in sorted(splits)}


@task(name="write-report")
def write_run_report(config: RunConfig) -> str:
    """The HTML report (with PNGs): runs/<name>/report/index.html next to a local store, <store>/_report/
    inside a remote one."""
    from rca_core.report import default_location, write_report

    return str(write_report(config.store, default_location(config), config))


def stage_row(name: str, res: dict, seconds: float) -> dict:
    s = res.get("summary", {})
    row = {"stage": name, "status": "cached" if res.get("cached") else "ran", "seconds": round(seconds, 1)}
    for k in METRIC_KEYS:
        if isinstance(s.get(k), (int, float)):
            row[k] = round(float(s[k]), 4)
    if s.get("scored_on"):
        row["scored_on"] = s["scored_on"]
    row["stage_seconds"] = round(float(s.get("seconds", 0.0)), 1)
    row["key"] = res.get("key", "")
    return row


@flow(name="rca-pipeline", log_prints=True,
      description="RCA weakly supervised segmentation: image tags -> CAMs -> pseudo-masks -> segmenter.")
def pipeline(config: RunConfig = RunConfig(), stages: list[str] | None = None) -> dict:
    """Run the stages (default: all) of the run config; returns per-stage pointers and a metrics table."""
    cfg = prepare_config(config)
    order = run_order(cfg, stages)
    t_all = time.time()
    with console.Phase("data: checking the data set (generating the demo set if needed)"):
        counts = prepare_data(cfg)
    record_run(cfg, ArtifactStore.for_config(cfg))
    _tell(f"data: {', '.join(f'{s} {n}' for s, n in counts.items())} images ({cfg.data.root}, "
          f"{time.time() - t_all:.0f} s); stages: {', '.join(order)}")
    for note in config_notes(cfg):
        _tell(f"note: {note}")
    results, rows = {}, []
    with ray_session(cfg.ray):
        check_cluster_fits(cfg, order)  # within seconds, not after the stages before the one that would wait
        for name in order:
            t = time.time()
            progress.forget(name)
            with _no_heartbeat():
                res = STAGE_FLOWS[name](config=cfg)
            results[name] = res
            rows.append(stage_row(name, res, time.time() - t))
            _tell(progress.summary_line(name, rows[-1]["status"], rows[-1]["seconds"], rows[-1],
                                        progress.finished(name)))
    from rca_core import report as run_report

    report = write_run_report(cfg) if run_report.wanted(order) else ""
    total = time.time() - t_all
    create_table_artifact(key="rca-metrics", table=rows,
                          description=f"Per-stage metrics and wall time of run {cfg.name} ({total:.0f} s)")
    keys = {n: p.key for n, p in plan(cfg).items() if n in order}
    create_markdown_artifact(key="rca-outputs", markdown=_outputs_md(cfg, keys, total, report),
                             description="Where this run's outputs are")
    return {"stages": results, "table": rows, "seconds": total, "store": cfg.store, "keys": keys, "report": report}


def _no_heartbeat():
    """A stage's subflow run sends no heartbeats of its own: the pipeline's flow run, in the same process, keeps
    sending them (Prefect's crashed-run detection), and every flow run's heartbeat thread is joined at its end,
    which cost up to a second per stage (the thread sleeps in 1 s steps)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def _tell(msg: str) -> None:
    """A line on the console (and the run log) that also goes to the flow run's log in the UI."""
    console.say(msg, log=False)
    try:
        from prefect import get_run_logger

        get_run_logger().info(msg)
    except Exception:  # noqa: BLE001 - outside a flow run: console only
        console.log_line("console", msg)


def _outputs_md(cfg: RunConfig, keys: dict, total: float, report: str) -> str:
    lines = [f"# Run {cfg.name}", "", f"Wall time: {total:.0f} s", "", f"Artifact store: `{cfg.store}`", ""]
    if report:
        lines += [f"Report: `{report}` (open in a browser)", ""]
    lines += [f"- {n}: `{cfg.store}/{k}`" for n, k in keys.items()]
    if "random_walk" in keys:
        lines += ["", f"Pseudo-mask PNGs: `{cfg.store}/{keys['random_walk']}/files/png/`"]
    return "\n".join(lines)
