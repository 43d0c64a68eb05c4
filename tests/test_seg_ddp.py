"""seg_train under torch.distributed (gloo, 2 CPU processes): each rank sees half the images at half the
global batch (DistributedSampler), the per-epoch loss table agrees on both ranks, only rank 0 writes the
model, and the synchronised max_seconds check does not deadlock."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, {root!r})
    import torch, torch.distributed as dist, torch.multiprocessing as mp

    def run(rank, world, tmp, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RCA_NO_PROGRESS="1")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from rca_core.config import load_config
        from rca_core.stages.context import make_context
        from rca_core.stages import seg_train
        from rca_core.store import ArtifactStore
        cfg = load_config({tiny!r}, {{"store": tmp + "/store", "data": {{"root": tmp + "/data"}},
            "compute": {{"device": "cpu"}}, "segmenter": {{"labels": "gt", "width": 8, "epochs": 1,
            "optimizer": "adamw", "max_seconds": 10000}}}})
        ctx = make_context("seg_train", cfg, ArtifactStore(cfg.store))
        if rank == 0:
            ctx.out.prepare(())
        dist.barrier()
        s = seg_train.train(cfg, ctx)
        with open(f"{{tmp}}/rank{{rank}}.json", "w") as f:
            json.dump({{"steps": s["steps"], "losses": s["epoch_losses"], "world": s["world_size"]}}, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        tmp, port = sys.argv[1], int(sys.argv[2])
        from rca_core.config import load_config
        from rca_core.data import make_dataset
        make_dataset(load_config({tiny!r}, {{"data": {{"root": tmp + "/data"}}}}).data, "train", progress=False)
        mp.spawn(run, args=(2, tmp, port), nprocs=2)
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_training(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT.format(root=str(ROOT), tiny=str(ROOT / "configs" / "tiny.yaml")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), str(tmp_path), str(free_port())], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # 24 images, global batch 8 -> 4 per rank; each rank sees 12 images -> 3 steps
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 3
    assert r0["losses"] == r1["losses"]  # the per-epoch loss is averaged over ranks
    models = list((tmp_path / "store").glob("seg_train/*/files/segmenter.pt"))
    assert len(models) == 1 and not list(models[0].parent.glob("*.tmp"))
