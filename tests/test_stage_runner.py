"""The stage runner's bookkeeping: manifest rows for images finished before an interruption."""
import numpy as np

from rca_core.stages import backfill_manifest
from rca_core.store import ArtifactStore


def test_backfill_manifest_adds_rows_only_for_finished_unreported_images(tmp_path):
    out = ArtifactStore(tmp_path / "s").stage("toy", "f").prepare(["m"])
    ids = ["a", "b", "c", "d"]
    for i in ("a", "b", "c"):
        out.write(i, {"m": np.zeros((2, 2), np.uint8)})
    out.write_manifest([{"image_id": "a", "status": "done", "seconds": 0.1}])
    todo = out.pending(ids)
    assert todo == ["d"]
    assert backfill_manifest(out, ids, todo) == 2
    rows = {r["image_id"]: r for r in out.manifest().to_pylist()}
    assert sorted(rows) == ["a", "b", "c"] and rows["a"]["seconds"] == 0.1
    assert backfill_manifest(out, ids, todo) == 0
