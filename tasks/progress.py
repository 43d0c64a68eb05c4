"""Stage progress as a Prefect progress artifact (driver process only), plus a tqdm bar locally."""
from __future__ import annotations

import time

from tqdm.auto import tqdm


class StageProgress:
    """callable(done, total): updates the run page's progress artifact at most every `every` seconds."""

    def __init__(self, stage: str, every: float = 2.0):
        self.stage, self.every = stage, every
        self._id = None
        self._last = 0.0
        self._bar: tqdm | None = None
        try:
            from prefect.artifacts import create_progress_artifact

            self._id = create_progress_artifact(progress=0.0, key=f"rca-{stage.replace('_', '-')}-progress",
                                                description=f"stage {stage}: starting")
        except Exception:  # no flow run context (plain call): tqdm only
            self._id = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.stage, leave=False, mininterval=self.every)
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()
        now = time.time()
        if self._id is not None and (now - self._last >= self.every or done >= total):
            self._last = now
            from prefect.artifacts import update_progress_artifact

            pct = 100.0 * done / max(1, total)
            update_progress_artifact(self._id, progress=pct, description=f"stage {self.stage}: {done}/{total}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._id is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._id, progress=100.0, description=f"stage {self.stage}: done")
