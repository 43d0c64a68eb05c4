"""Subprocess used by test_store.py: writes deterministic per-image data into a store stage,
resuming with only the pending images. Slow per image so the test can kill it mid-stage."""
import sys
import time

import numpy as np

from rca_core.store import ArtifactStore


def data_for(image_id: str) -> dict:
    seed = sum(map(ord, image_id))
    rng = np.random.default_rng(seed)
    h, w = 20 + seed % 13, 30 + seed % 7
    return {"cam": rng.random((2, h, w)).astype(np.float16), "mask": rng.integers(0, 4, (h, w)).astype(np.uint8)}


def main(url: str, n: int, delay: float) -> None:
    out = ArtifactStore(url).stage("toy", "fp0")
    out.prepare(["cam", "mask"])
    ids = [f"img_{i:03d}" for i in range(n)]
    todo = out.pending(ids, verify=True)
    print(f"pending {len(todo)}", flush=True)
    for i in todo:
        out.write(i, data_for(i), attrs={"classes": [1, 2]})
        print(f"wrote {i}", flush=True)
        time.sleep(delay)
    out.write_manifest([{"image_id": i, "status": "done"} for i in todo])
    out.mark_complete({"images": n})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
