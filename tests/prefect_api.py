"""Small helpers over the Prefect REST API (what the UI calls), used by the orchestration tests."""
from __future__ import annotations

import time

import httpx


def _post(api: str, path: str, body: dict) -> list | dict:
    r = httpx.post(f"{api}{path}", json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def flow_runs(api: str, flow_name: str) -> list[dict]:
    return _post(api, "/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}}, "sort": "EXPECTED_START_TIME_DESC"})


def created_ts(obj: dict) -> float:
    from datetime import datetime

    return datetime.fromisoformat(obj["created"].replace("Z", "+00:00")).timestamp()


def task_runs_since(api: str, t0: float) -> list[dict]:
    runs = _post(api, "/task_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 200})
    return [r for r in runs if created_ts(r) >= t0]


def artifacts(api: str, key: str) -> list[dict]:
    return _post(api, "/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}})


def flow_run(api: str, run_id: str) -> dict:
    r = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30)
    r.raise_for_status()
    return r.json()


def wait_flow_run(api: str, run_id: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        fr = flow_run(api, run_id)
        if fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return fr
        time.sleep(2)
    raise TimeoutError(f"flow run {run_id} not finished after {timeout} s (state {fr['state']['name']})")


def deployment(api: str, flow: str, name: str) -> dict:
    r = httpx.get(f"{api}/deployments/name/{flow}/{name}", timeout=30)
    r.raise_for_status()
    return r.json()


def create_run(api: str, deployment_id: str, parameters: dict | None = None) -> dict:
    body = {"state": {"type": "SCHEDULED"}}
    if parameters is not None:
        body["parameters"] = parameters
    r = httpx.post(f"{api}/deployments/{deployment_id}/create_flow_run", json=body, timeout=30)
    r.raise_for_status()
    return r.json()
