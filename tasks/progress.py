"""Stage progress (driver process only): the console's live line and the run page's progress artifact.

`StageProgress(stage)` is the `on_progress(done, total)` callable handed to run_per_image_stage /
run_training_stage. Each call updates
- the live line on the console (tasks.console: redrawn in place on a terminal, a plain line every
  RCA_PROGRESS_INTERVAL seconds otherwise, default 60): `stage  [####....]  3/10 epochs  30%  0.21 epochs/s  ETA 0:33`;
- the Prefect progress artifact `rca-<stage>-progress` (at most every `every` seconds).
`close()` ends the live line and records the stage's figures for its summary line (`finished(stage)`,
`summary_line`). Units: "images" for per-image stages, "epochs" for training stages, unless the caller
says otherwise with `set_unit("steps")`; `epoch_metrics(row)` keeps per-epoch rows (rank 0) for the run
log and a Prefect table artifact.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from . import console as con

_FINISHED: dict[str, dict] = {}
_FINISHED_LOCK = threading.Lock()


def default_unit(stage: str) -> str:
    try:
        from rca_core.stages import registry

        kind = registry.get(stage).kind
    except Exception:  # noqa: BLE001 - an unknown name: generic unit
        return "items"
    return {"per_image": "images", "training": "steps"}.get(kind, "images")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_rate(rate: float | None, unit: str) -> str:
    if not rate:
        return f"- {unit}/s"
    if rate >= 1:
        return f"{rate:.1f} {unit}/s"
    one = unit[:-1] if unit.endswith("s") else unit
    return f"{1 / rate:.1f} s/{one}"


class StageProgress:
    """callable(done, total): the stage's live console line and its Prefect progress artifact."""

    def __init__(self, stage: str, every: float = 2.0, unit: str | None = None,
                 console: con.Console | None = None, clock: Callable[[], float] | None = None,
                 artifact: bool = True):
        self.stage, self.every = stage, every
        self.unit = unit or default_unit(stage)
        self.console = console or con.CONSOLE
        self.clock = clock or self.console.clock
        self.t0 = self.clock()
        self.done, self.total = 0, None
        self._first: tuple[float, int] | None = None  # (time, done) of the first update
        self._last_update: tuple[float, int] | None = None
        self._epochs: list[dict] = []
        self._closed = False
        self._id = None
        self._last_artifact = 0.0
        if artifact:
            try:
                from prefect.artifacts import create_progress_artifact

                self._id = create_progress_artifact(progress=0.0, key=f"rca-{stage.replace('_', '-')}-progress",
                                                    description=f"stage {stage}: starting")
            except Exception:  # noqa: BLE001 - no flow run context (plain call): console only
                self._id = None
        con.log_line("rca", f"stage {stage}: started")
        self.console.set_live(self)

    # -- what the stage code calls
    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        done, total = int(done), int(total)
        if self._first is None:
            self._first = (now, done)
        self._last_update = (now, done)
        self.done, self.total = done, total
        self.console.refresh()
        if self._id is not None and (now - self._last_artifact >= self.every or done >= total):
            self._last_artifact = now
            try:
                from prefect.artifacts import update_progress_artifact

                pct = 100.0 * done / max(1, total)
                update_progress_artifact(self._id, progress=pct,
                                         description=f"stage {self.stage}: {done}/{total} {self.unit}")
            except Exception as e:  # noqa: BLE001 - the artifact is a view; never fail the stage for it
                con.log_line("rca", f"progress artifact of {self.stage}: {type(e).__name__}: {e}")

    def state(self) -> tuple:
        return (self.done, self.total, self.unit)

    @property
    def finished(self) -> bool:
        return self.total is not None and self.done >= self.total

    def set_unit(self, unit: str) -> None:
        """What (done, total) count: "images", "steps", "epochs", ..."""
        self.unit = unit

    def epoch_metrics(self, row: dict) -> None:
        """One per-epoch row (from rank 0): kept for the run log and the stage's table artifact at close."""
        self._epochs.append(dict(row))
        con.log_line(f"stage {self.stage}", "epoch " + ", ".join(f"{k} {_short(v)}" for k, v in row.items()))

    # -- figures
    def rate(self, now: float | None = None) -> float | None:
        """Units per second: since the first update when there was progress after it (leaves start-up and
        resumed units out), else the average since the stage started."""
        now = self.clock() if now is None else now
        if self._first is not None and self._last_update is not None and self._last_update[1] > self._first[1]:
            t, d = self._last_update
            if t > self._first[0]:
                return (d - self._first[1]) / (t - self._first[0])
        if self.done and now > self.t0:
            return self.done / (now - self.t0)
        return None

    def eta(self, now: float | None = None) -> float | None:
        if self.total is None:
            return None
        left = max(0, self.total - self.done)
        if left == 0:
            return 0.0
        r = self.rate(now)
        if not r:
            return None
        since = 0.0
        if self._last_update is not None:
            since = max(0.0, (self.clock() if now is None else now) - self._last_update[0])
        return max(0.0, left / r - since)

    def render(self, now: float, width: int) -> str:
        elapsed = fmt_duration(now - self.t0)
        if self.total is None:
            return f"{self.stage:<15} running, {elapsed} elapsed (no {self.unit} done yet)"
        pct = 100.0 * self.done / max(1, self.total)
        bar_w = 20
        fill = int(round(bar_w * min(1.0, self.done / max(1, self.total))))
        bar = "[" + "#" * fill + "." * (bar_w - fill) + "]"
        eta = self.eta(now)
        text = (f"{self.stage:<15} {bar} {self.done}/{self.total} {self.unit} {pct:3.0f}%  "
                f"{fmt_rate(self.rate(now), self.unit)}  elapsed {elapsed}  ETA {fmt_duration(eta)}")
        if len(text) > width:  # narrow terminal: drop the bar first
            text = text.replace(bar + " ", "")
        return text

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        now = self.clock()
        seconds = now - self.t0
        stats = {"done": self.done, "total": self.total, "unit": self.unit, "seconds": seconds,
                 "rate": (self.done / seconds) if self.done and seconds > 0 else None, "epochs": list(self._epochs)}
        with _FINISHED_LOCK:
            _FINISHED[self.stage] = stats
        self.console.clear_live(self)
        con.log_line("rca", f"stage {self.stage}: {self.done}/{self.total} {self.unit} in {seconds:.1f} s")
        if self._epochs:
            con.log_line(f"stage {self.stage}", _epoch_table(self._epochs))
        if self._id is not None:
            try:
                from prefect.artifacts import create_table_artifact, update_progress_artifact

                update_progress_artifact(self._id, progress=100.0, description=f"stage {self.stage}: done")
                if self._epochs:
                    create_table_artifact(key=f"rca-{self.stage.replace('_', '-')}-epochs", table=self._epochs,
                                          description=f"stage {self.stage}: per-epoch metrics (rank 0)")
            except Exception as e:  # noqa: BLE001
                con.log_line("rca", f"progress artifact of {self.stage}: {type(e).__name__}: {e}")


def finished(stage: str) -> dict | None:
    """The figures of the last StageProgress of `stage` that was closed in this process."""
    with _FINISHED_LOCK:
        return _FINISHED.get(stage)


def forget(stage: str) -> None:
    with _FINISHED_LOCK:
        _FINISHED.pop(stage, None)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _epoch_table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_short(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


METRIC_NAMES = (("miou", "mIoU"), ("val_miou", "val mIoU"), ("miou_all", "mIoU"), ("miou_confident", "confident mIoU"),
                ("kept_fraction", "kept"), ("best_threshold", "bg threshold"), ("map", "mAP"),
                ("miou_single_scale", "single-scale mIoU"))


def summary_line(stage: str, status: str, seconds: float, metrics: dict | None = None,
                 stats: dict | None = None) -> str:
    """`cam_eval        ran        1.4 s   24 images  17 images/s   mIoU 0.244  bg threshold 0.5`"""
    parts = [f"{stage:<15} {status:<7} {seconds:7.1f} s"]
    if stats and stats.get("total") is not None and status != "cached":
        parts.append(f"{stats['done']}/{stats['total']} {stats['unit']}")
        if stats.get("rate"):
            parts.append(fmt_rate(stats["rate"], stats["unit"]))
    shown = []
    for key, label in METRIC_NAMES:
        v = (metrics or {}).get(key)
        if isinstance(v, (int, float)) and label not in shown:
            shown.append(label)
            parts.append(f"{label} {v:.3f}" if isinstance(v, float) else f"{label} {v}")
    if shown and (metrics or {}).get("scored_on"):
        parts.append(f"(on {metrics['scored_on']})")
    rate, util = (metrics or {}).get("gflop_per_s"), (metrics or {}).get("flop_utilisation")
    if isinstance(rate, (int, float)) and status != "cached":  # model FLOPs per worker against its matmul peak
        parts.append(f"{rate:.3g} GFLOP/s per worker" + (f" ({util:.0%} of peak)" if isinstance(util, float) else ""))
    retries, gave_up = (metrics or {}).get("storage_retries") or 0, (metrics or {}).get("storage_gave_up") or 0
    if retries or gave_up:  # object storage answered with errors the policy rode out (or did not)
        parts.append(f"storage: {retries} retries" + (f", {gave_up} gave up" if gave_up else "")
                     + f" of {metrics.get('storage_requests', '?')} requests")
    return "  ".join(parts)
