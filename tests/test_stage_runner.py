"""The stage runner's bookkeeping: finished images verified and kept, damaged ones recomputed, manifest
rows for images finished before an interruption."""
import numpy as np

from rca_core.stages.runner import KEPT, new_manifest_rows, process_images
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
    rows = process_images(worker, ids, out=out, maybe_done=set(out.listed_ids()))
    assert worker.calls == ["c", "d"]
    status = {r["image_id"]: r["status"] for r in rows}
    assert status == {"a": KEPT, "b": KEPT, "c": "done", "d": "done"}
    new = new_manifest_rows(rows, set(out.manifest().column("image_id").to_pylist()))
    assert sorted(r["image_id"] for r in new) == ["b", "c", "d"]  # a is in the manifest already
    out.write_manifest(new)
    man = {r["image_id"]: r for r in out.manifest().to_pylist()}
    assert sorted(man) == ids and man["a"]["seconds"] == 0.1 and man["d"]["value"] == 7
    assert out.read("c", "m")[0].tolist() == [[7, 7], [7, 7]]


def test_only_ids_listed_in_the_store_are_verified(tmp_path, monkeypatch):
    """A stage lists its folder once; ids not listed are computed without a read (a fresh stage reads nothing),
    listed ones are verified; an id stored under one field only is listed for that field, not for the stage."""
    from rca_core.store import StageOutput

    out = ArtifactStore(tmp_path / "s").stage("toy", "f").prepare(["m", "n"])
    fresh = ArtifactStore(tmp_path / "s").stage("toy", "g").prepare(["m"])
    assert fresh.listed_ids() == []
    out.write("a", {"m": np.zeros((2, 2), np.uint8), "n": np.ones(3, np.float32)})
    out.write("b", {"m": np.zeros((2, 2), np.uint8)})
    assert out.listed_ids() == ["a"] and out.listed_ids("m") == ["a", "b"]
    checked = []
    orig = StageOutput.is_done
    monkeypatch.setattr(StageOutput, "is_done", lambda self, i, verify=False: (checked.append(i), orig(self, i, verify))[1])

    class Both(Toy):
        def process(self, image_id):
            self.calls.append(image_id)
            self.out.write(image_id, {"m": np.full((2, 2), 7, np.uint8), "n": np.zeros(3, np.float32)})

    worker = Both(out)
    rows = process_images(worker, ["a", "b", "c"], out=out, maybe_done=set(out.listed_ids()))
    assert checked == ["a"] and worker.calls == ["b", "c"]
    assert [r["status"] for r in rows] == [KEPT, "done", "done"]
    checked.clear()
    rows = process_images(Both(fresh), ["x", "y"], out=fresh, maybe_done=set(fresh.listed_ids()))
    assert checked == [] and [r["status"] for r in rows] == ["done", "done"]


def test_model_flops_are_counted_on_the_first_images_of_a_shard(tmp_path):
    """The first COUNT_FLOPS_IMAGES computed images carry their counted model GFLOP (a known matmul: 2*m*k*n),
    the others none; the stage's summary has GFLOP per image, GFLOP/s and the share of this worker's matmul peak."""
    import torch

    from rca_core.stages import runner

    out = ArtifactStore(tmp_path / "s").stage("toy", "f").prepare(["m"])

    class Mm(Toy):
        def process(self, image_id):
            torch.mm(torch.ones(100, 200), torch.ones(200, 300))  # 2 * 100 * 200 * 300 = 0.012 GFLOP
            return super().process(image_id)

    rows = process_images(Mm(out), ["a", "b", "c", "d"], out=out)
    counted = [r["gflop"] for r in rows]
    assert counted[:runner.COUNT_FLOPS_IMAGES] == [0.012] * runner.COUNT_FLOPS_IMAGES, counted
    assert counted[runner.COUNT_FLOPS_IMAGES:] == [None] * (4 - runner.COUNT_FLOPS_IMAGES), counted


def test_flop_utilisation_figures():
    import torch

    from rca_core import flops

    with flops.counting() as c:  # a sparse x dense product counts zero (torch's formula would call it dense)
        torch.sparse.mm(torch.eye(300).to_sparse(), torch.ones(300, 4))
        torch.mm(torch.ones(10, 20), torch.ones(20, 30))
    assert c.flops == 2 * 10 * 20 * 30
    u = flops.utilisation(120.0, 2.0, 100.0)
    assert u == {"gflop": 120.0, "gflop_per_s": 60.0, "peak_gflop_per_s": 100.0, "flop_utilisation": 0.6}
    assert flops.utilisation(0.0, 2.0, 100.0)["flop_utilisation"] is None  # nothing counted: no figure
    peak = flops.matmul_peak_gflops("cpu", n=256, seconds=0.05)
    assert peak > 0 and flops.matmul_peak_gflops("cpu", n=256, seconds=0.05) == peak  # measured once, cached
