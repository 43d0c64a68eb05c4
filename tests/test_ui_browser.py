"""The user's path through the Prefect UI in a real browser (headless Chromium via playwright).

Starts a Prefect server on 127.0.0.1 (session fixture) and `rca serve`; opens the deployment in the
UI; Custom run with one parameter edited in the form; waits for completion; checks through the API
that the run used the edited value; checks the metrics artifact on the run page; saves screenshots
to runs/test-output/ui/. The custom run's stages before the segmenter come back Cached from the run that
`rca serve` was started for (the deployment's cache is the command line's). The run report opened in the same
browser renders (no broken image, no console error).
Installs Debian's chromium (apt-get) when missing; the playwright package comes with the test extra.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
import prefect_api

pytestmark = [pytest.mark.slow, pytest.mark.browser]
OUT = Path(os.environ.get("RCA_TEST_OUTPUT", ROOT / "runs" / "test-output")) / "ui"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def ensure_browser() -> None:
    if not Path(CHROMIUM).exists():
        apt = ["apt-get"] if os.geteuid() == 0 else ["sudo", "-n", "apt-get"]
        subprocess.run(apt + ["update", "-qq"], check=False, capture_output=True, timeout=300)
        r = subprocess.run(apt + ["install", "-y", "-qq", "chromium"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and Path(CHROMIUM).exists(), f"installing chromium failed: {r.stderr[-2000:]}"


@pytest.fixture(scope="module")
def served(prefect_server, reference_run, tmp_path_factory):
    """`rca serve` of the reference run's config: the UI run reuses its finished stages."""
    ensure_browser()
    assert reference_run["rc"] == 0, reference_run["stdout"][-2000:]
    cfg = reference_run["config"]
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    log = open(tmp_path_factory.mktemp("serve_log") / "serve.log", "w")
    # one training worker: the custom run retrains the segmenter, and what this test shows is the UI's path
    # (two-worker training is the reference run's); where stages run is not part of their keys: the rest is Cached
    proc = subprocess.Popen([str(Path(sys.executable).with_name("rca")), "serve", "-c", str(cfg), "--name", "ui",
                             "--set", "ray.num_workers=1"],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dep = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            dep = prefect_api.deployment(prefect_server, "rca-pipeline", "ui")
            break
        except Exception:
            time.sleep(1)
    assert dep is not None, f"rca serve did not register its deployment: {Path(log.name).read_text()[-3000:]}"
    yield {"api": prefect_server, "deployment": dep, "config": cfg}
    os.killpg(proc.pid, 15)
    proc.wait(timeout=60)
    log.close()


def test_custom_run_from_the_ui(served):
    from playwright.sync_api import sync_playwright

    api, dep = served["api"], served["deployment"]
    ui = api[: -len("/api")]
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    console_errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"{ui}/deployments/deployment/{dep['id']}")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run").click()
        page.wait_for_url("**/run?**", timeout=30000)
        # the typed form: nested sections with descriptions; edit the segmenter's epochs (1 -> 2)
        page.get_by_text("Store (Optional)", exact=True).wait_for(timeout=30000)
        assert page.get_by_text("artifact store: local dir or URL (s3://bucket/run, gs://...)").count() >= 1
        seg = page.get_by_text("Segmenter (Optional)", exact=True)
        seg.scroll_into_view_if_needed()
        epochs = seg.locator("xpath=following::*[normalize-space(text())='Epochs (Optional)'][1]/following::input[1]")
        assert epochs.input_value() == "1"
        epochs.fill("2")
        epochs.scroll_into_view_if_needed()
        page.screenshot(path=str(OUT / "custom_run_form.png"), full_page=False)
        t0 = time.time()
        page.get_by_role("button", name="Submit").click()
        # the UI creates the run and goes back to the deployment page; find the run it created
        run_id = None
        deadline = time.time() + 120  # a loaded 2-core CI machine can take a while to render and post
        while run_id is None and time.time() < deadline:
            mine = [r for r in prefect_api.flow_runs(api, "rca-pipeline")
                    if r["deployment_id"] == dep["id"] and prefect_api.created_ts(r) >= t0]
            run_id = mine[0]["id"] if mine else None
            time.sleep(1)
        if run_id is None:  # keep what the page showed, for the failure message and the artifacts
            page.screenshot(path=str(OUT / "custom_run_submit_failed.png"), full_page=True)
        assert run_id, (f"the custom-run form created no flow run (page {page.url}; "
                        f"screenshot {OUT / 'custom_run_submit_failed.png'})")
        fr = prefect_api.wait_flow_run(api, run_id, timeout=900)
        assert fr["state"]["type"] == "COMPLETED", fr["state"]
        assert fr["parameters"]["config"]["segmenter"]["epochs"] == 2
        # only the segmenter stages recomputed; everything before them came from the cache
        states = {t["name"]: t["state"]["name"] for t in prefect_api.task_runs_since(api, t0)}
        assert states.get("seg_train") == "Completed" and states.get("seg_eval") == "Completed", states
        for stage in ["cam_train", "cam_infer", "crf_labels", "random_walk"]:
            assert states.get(stage) == "Cached", states
        # the run page after completion, with its artifacts tab
        page.goto(f"{ui}/runs/flow-run/{run_id}")
        page.get_by_text("Completed").first.wait_for(timeout=30000)
        page.wait_for_timeout(4000)
        page.screenshot(path=str(OUT / "finished_run.png"), full_page=False)
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("rca-metrics").first.wait_for(timeout=30000)
        page.screenshot(path=str(OUT / "run_artifacts.png"), full_page=True)

        # the run report (written by the pipeline) renders: tables and images, no console error
        from rca_core.config import load_config
        report = Path(load_config(served["config"]).store).parent / "report" / "index.html"
        assert report.exists(), f"no report at {report}"
        rpage = browser.new_page(viewport={"width": 1400, "height": 1100})
        rpage.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        rpage.on("pageerror", lambda e: console_errors.append(str(e)))
        rpage.goto(report.as_uri())
        rpage.wait_for_load_state("load")
        assert rpage.locator("table").count() >= 1
        broken = rpage.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)")
        assert rpage.evaluate("document.images.length") >= 1
        assert broken == [], broken
        rpage.screenshot(path=str(OUT / "report.png"), full_page=True)
        browser.close()
    assert console_errors == [], console_errors


def test_wrong_value_is_refused_naming_the_field(served):
    """What the form does on submit: the server validates the typed parameters and refuses a bad one."""
    import httpx

    api, dep = served["api"], served["deployment"]
    params = dict(dep["parameters"])
    params["config"] = {**params["config"], "cam": {**params["config"]["cam"],
                                                    "train": {**params["config"]["cam"]["train"], "batch_size": "many"}}}
    r = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": params}, timeout=30)
    assert r.status_code == 409, r.text
    assert "config.cam.train.batch_size" in r.text, r.text
    # a bound of the model (lr > 0) is in the schema too: refused before any run exists, naming the field
    params["config"]["cam"]["train"]["batch_size"] = 8
    params["config"]["cam"]["train"]["lr"] = -1.0
    r = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": params}, timeout=30)
    assert r.status_code == 409, r.text
    assert "config.cam.train.lr" in r.text and "minimum of 0" in r.text, r.text
