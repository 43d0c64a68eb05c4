"""One Prefect flow per registered stage (rca_core/stages/registry.py). Each runs its stage's cached task over
Ray; the pipeline (flows/pipeline.py) chains them."""
from __future__ import annotations

from prefect import flow

from rca_core.config import RunConfig, check_paths, resolve_paths, stage_weights
from rca_core.stages.planning import check_active, plan
from rca_core.stages.registry import STAGE_NAMES
from rca_core.store import ArtifactStore
from tasks.cluster_fit import require_fit
from tasks.ray_runtime import ray_session
from tasks.stage_task import cache_key, result_storage_for, run_stage_task


def run_stage_in_flow(name: str, cfg: RunConfig) -> dict:
    """Submit the stage task with the right cache options; returns its pointer + whether it was cached."""
    check_active(name, cfg)  # a stage this config does not run (cam.source picks another CAM source)
    out = ArtifactStore.for_config(cfg).stage(name, plan(cfg)[name].fingerprint)
    complete = out.is_complete()
    if not complete:
        require_fit(cfg, [name])  # fail now rather than wait for resources no node has
    opts = dict(task_run_name=name, refresh_cache=not complete, result_storage=result_storage_for(cfg))
    state = run_stage_task.with_options(**opts)(name, cfg, cache_key(name, cfg), return_state=True)
    result = state.result()
    # found complete after waiting for another run's lease: nothing computed here, as for a cached stage
    return {**result, "cached": state.name == "Cached" or bool(result.get("found_complete")), "state": state.name}


def prepare_config(config: RunConfig) -> RunConfig:
    """The flow's config as workers must see it: local paths absolute, every named path checked, local
    pretrained weights staged into a remote store (stage keys do not change)."""
    cfg = resolve_paths(config)
    check_paths(cfg, "flow parameter 'config'")
    return stage_weights(cfg)


def _make_stage_flow(name: str):
    @flow(name=f"rca-stage-{name.replace('_', '-')}", log_prints=True,
          description=f"Run the {name} stage (and nothing else) for a run config; cached by fingerprint.")
    def stage_flow(config: RunConfig) -> dict:
        cfg = prepare_config(config)
        with ray_session(cfg.ray):
            return run_stage_in_flow(name, cfg)

    stage_flow.__name__ = f"{name}_flow"
    return stage_flow


STAGE_FLOWS = {name: _make_stage_flow(name) for name in STAGE_NAMES}  # one per registered stage
