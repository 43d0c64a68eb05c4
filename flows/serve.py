"""`rca serve`: register the pipeline and every stage flow as deployments (flow.serve) so that runs
can be started from the Prefect UI with a typed parameter form (the RunConfig model)."""
from __future__ import annotations

from rca_core.config import RunConfig, resolve_paths


def build_deployments(cfg: RunConfig, name: str):
    from flows.pipeline import pipeline
    from flows.stage_flows import STAGE_FLOWS

    params = {"config": resolve_paths(cfg).model_dump(mode="json")}
    deps = [pipeline.to_deployment(name=name, parameters=params, tags=["rca", cfg.name],
                                   description=f"Full RCA pipeline; defaults from the {cfg.name} config.")]
    for stage, fl in STAGE_FLOWS.items():
        deps.append(fl.to_deployment(name=name, parameters=params, tags=["rca", "stage", cfg.name]))
    return deps


def serve(cfg: RunConfig, name: str = "demo", limit: int = 1) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*build_deployments(cfg, name), limit=limit)
