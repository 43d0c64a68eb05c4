"""The stage runner's bookkeeping: finished images verified and kept, damaged ones recomputed, manifest
rows for images finished before an interruption."""
import numpy as np

from rca_core.stages import KEPT, new_manifest_rows, process_images
from rca_core.store import ArtifactStore


class Toy:
    def __init__(self, out):
        self.out, self.calls = out, []

    def process(self, image_id):
        self.calls.append(image_id)
        self.out.write(image_id, {"m": np.full((2, 2), 7, np.uint8)})
        return {"value": 7}


def test_finished_images_are_verified_and_kept_damaged_ones_recomputed(tmp_path):
    out = ArtifactStore(tmp_path / "s").stage("toy", "f").prepare(["m"])
    ids = ["a", "b", "c", "d"]
    for i in ("a", "b", "c"):
        out.write(i, {"m": np.zeros((2, 2), np.uint8)})
    # c: data changed after its checksum marker was written -> damaged
    import zarr

    zarr.open_array(out.store.zstore, path=f"{out.key}/m/c", mode="r+")[0, 0] = 9
    out.write_manifest([{"image_id": "a", "status": "done", "seconds": 0.1}])
    worker = Toy(out)
    rows = process_images(worker, ids, out=out, maybe_done=set(out.done_ids()))
    assert worker.calls == ["c", "d"]
    status = {r["image_id"]: r["status"] for r in rows}
    assert status == {"a": KEPT, "b": KEPT, "c": "done", "d": "done"}
    new = new_manifest_rows(out, rows)
    assert sorted(r["image_id"] for r in new) == ["b", "c", "d"]  # a is in the manifest already
    out.write_manifest(new)
    man = {r["image_id"]: r for r in out.manifest().to_pylist()}
    assert sorted(man) == ids and man["a"]["seconds"] == 0.1 and man["d"]["value"] == 7
    assert out.read("c", "m")[0].tolist() == [[7, 7], [7, 7]]
