"""Preflight: before a stage fans out, every node proves it can see the store and the data.

The driver writes a fresh marker into the store; one tiny task per alive node (pinned to it) reads the
marker back through the store's URL and checks the data root (the stage's split file; for the demo set,
its meta.json) and any local file the config names (pretrained weights, labels file, saliency folder).
A node that cannot see one of them, or does not answer within `ray.preflight_timeout_s`, fails the stage
in seconds, naming the node and the path, before any work is sent out (the check itself:
tasks.remote.node_check). Nodes already checked in this
driver process for the same store and data are not checked again.
"""
from __future__ import annotations

import json
import time
import uuid

from rca_core.config import RunConfig
from rca_core.store import ArtifactStore

from .remote import node_check

_CHECKED: dict[tuple, set[str]] = {}


class PreflightError(RuntimeError):
    """A node cannot see the artifact store or the data a stage needs."""


def preflight(cfg: RunConfig, stage: str, split: str) -> dict:
    """Check every alive node (not yet checked) for the stage; raises PreflightError naming the node and path."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    t0 = time.time()
    key = (cfg.store, cfg.data.root, split)
    checked = _CHECKED.setdefault(key, set())
    nodes = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0}
    todo = [nid for nid in nodes if nid not in checked]
    if not todo:
        return {"nodes": len(nodes), "checked": 0, "seconds": 0.0}
    store = ArtifactStore.for_config(cfg)
    token = uuid.uuid4().hex
    marker = store.file("_preflight", f"{token}.json")
    marker.write_text(json.dumps({"token": token, "stage": stage, "time": time.time()}))
    cfg_json = cfg.model_dump(mode="json")
    check = ray.remote(num_cpus=0, max_retries=0)(node_check)
    refs = {check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False)).remote(
        marker.uri, token, cfg_json, split): nid for nid in todo}
    try:
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=cfg.ray.preflight_timeout_s)
        problems = []
        for ref in ready:
            nid = refs[ref]
            where = f"node {nid[:12]} ({nodes[nid].get('NodeManagerAddress', '?')})"
            try:
                res = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the node died or the task could not run there
                problems.append(f"{where}: the check failed: {type(e).__name__}: {str(e).splitlines()[0]}")
                continue
            problems += [f"{where}, host {res['host']}: {p}" for p in res["problems"]]
            if not res["problems"]:
                checked.add(nid)
        for ref in late:
            nid = refs[ref]
            problems.append(f"node {nid[:12]} ({nodes[nid].get('NodeManagerAddress', '?')}): no answer within "
                            f"{cfg.ray.preflight_timeout_s:.0f} s (ray.preflight_timeout_s)")
            ray.cancel(ref, force=True)
    finally:
        marker.remove()
    if problems:
        raise PreflightError(f"stage {stage}: {len(problems)} problem(s) before fan-out; every node must see the "
                             f"store ({cfg.store}) and the data ({cfg.data.root}):\n  " + "\n  ".join(problems))
    return {"nodes": len(nodes), "checked": len(todo), "seconds": time.time() - t0}
