"""The `rca` command line. Imports are lazy so that `rca --help` and data commands stay quick."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="RCA weakly supervised semantic segmentation: data, pipeline, stages, UI, prediction.")
data_app = typer.Typer(no_args_is_help=True, help="Data sets: make the demo set, check a tree, convert COCO.")
config_app = typer.Typer(no_args_is_help=True, help="Configuration: show the resolved config and its fingerprints.")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

ConfigOpt = typer.Option("configs/demo.yaml", "--config", "-c", help="YAML run config")
SetOpt = typer.Option(None, "--set", "-s", help="override a config key, e.g. --set cam.train.epochs=2 (repeatable)")
VerboseOpt = typer.Option(False, "--verbose", "-v", envvar="RCA_VERBOSE",
                          help="also show Ray worker output, Ray and Prefect logs and every warning live "
                               "(always in the run log, whose path is printed)")


def _load(config: str, overrides: Optional[List[str]]):
    from rca_core.config import ConfigError, load_config, parse_overrides, resolve_paths

    try:
        cfg = resolve_paths(load_config(config, parse_overrides(overrides or [])))
    except ConfigError as e:
        msg = str(e)
        if overrides:
            msg = msg.replace(f"invalid config {config}:", f"invalid config {config} with --set {' '.join(overrides)}:")
        typer.secho(msg, fg="red", err=True)
        raise typer.Exit(2)
    if cfg.ray.address:  # fail in seconds, before Prefect starts, on a dead cluster address
        from tasks.ray_runtime import check_reachable

        try:
            check_reachable(cfg.ray.address)
        except RuntimeError as e:
            typer.secho(str(e), fg="red", err=True)
            raise typer.Exit(2)
    return cfg


# ------------------------------------------------------------------------------------------ data
@data_app.command("make-demo")
def data_make_demo(out: Path = typer.Option(..., "--out", help="directory to write the demo tree into"),
                   config: str = typer.Option(None, "--config", "-c", help="take DemoConfig from this run config"),
                   n_train: Optional[int] = None, n_val: Optional[int] = None, size: Optional[int] = None,
                   seed: Optional[int] = None):
    """Write the built-in synthetic data set (VOC layout, known masks)."""
    from rca_core.config import DemoConfig
    from rca_core.data.demo import make_demo

    demo = _load(config, None).data.demo if config else DemoConfig()
    upd = {k: v for k, v in dict(n_train=n_train, n_val=n_val, size=size, seed=seed).items() if v is not None}
    demo = demo.model_copy(update=upd)
    path = make_demo(out, demo)
    typer.echo(f"demo data set written to {path}")


@data_app.command("check")
def data_check(root: Path, num_classes: Optional[int] = typer.Option(None, help="default: from meta.json or 21"),
               splits: Optional[List[str]] = typer.Option(None, "--split", help="splits to check (default: all listed)")):
    """Validate a VOC-layout tree; lists every problem with the image id; exit 1 if any."""
    from rca_core.data.check import check_dataset, format_problems

    problems = check_dataset(root, num_classes=num_classes, splits=splits or None)
    if problems:
        typer.echo(format_problems(problems))
        raise typer.Exit(1)
    typer.echo(f"{root}: OK")


@data_app.command("coco-convert")
def data_coco_convert(instances: Path = typer.Option(..., help="instances_{split}2014.json"),
                      images: Path = typer.Option(..., help="folder with the split's images"),
                      out: Path = typer.Option(..., help="VOC-layout output root"),
                      split: str = typer.Option("train", help="split name written to ImageSets")):
    """Convert COCO 2014 instance annotations to VOC-style semantic PNGs (81 classes)."""
    from rca_core.data.coco import convert_coco

    n = convert_coco(instances, images, out, split)
    typer.echo(f"converted {n} images into {out}")


# ---------------------------------------------------------------------------------------- config
@config_app.command("show")
def config_show(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Print the resolved config and each stage's fingerprint."""
    from rca_core.stages.planning import plan

    cfg = _load(config, set_)
    typer.echo(cfg.resolved_yaml())
    typer.echo(f"# config fingerprint: {cfg.fingerprint()}")
    for name, p in plan(cfg).items():
        typer.echo(f"# {name:15s} {p.fingerprint}  inputs={list(p.inputs)}  split={p.split}")


# ---------------------------------------------------------------------------------------- stages
@app.command("stage")
def stage(name: str = typer.Argument(..., help="stage name (see `rca config show`)"),
          config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt,
          local: bool = typer.Option(False, help="plain local loop, no Prefect/Ray"),
          with_upstream: bool = typer.Option(True, help="also run unfinished upstream stages"),
          verbose: bool = VerboseOpt):
    """Run one stage (as its Prefect flow over Ray, or --local)."""
    import os
    import time

    cfg = _load(config, set_)
    from tasks.console import CONSOLE

    # --local runs the library's plain loop with its own progress bars: shown on a terminal only
    with _console(cfg, verbose, f"stage {name}", quiet_bars=not (local and CONSOLE.is_tty())):
        if local:
            from rca_core.stages.local import run_stage
            from tasks import progress

            t0 = time.time()
            summary = run_stage(name, cfg, with_upstream=with_upstream)
            _say(progress.summary_line(name, "ran", time.time() - t0, summary))
        else:
            with _prefect(None, need_server=bool(os.environ.get("PREFECT_API_URL"))):
                t0 = time.time()
                from tasks import progress

                progress.forget(name)
                if with_upstream:  # the pipeline restricted to the stage and what it needs
                    from flows.pipeline import pipeline

                    res = pipeline(config=cfg, stages=[name])["stages"][name]
                else:
                    from flows.stage_flows import STAGE_FLOWS

                    res = STAGE_FLOWS[name](config=cfg)
                if not with_upstream:  # the pipeline prints the summary lines when it runs the stages
                    row = res.get("summary") or {}
                    _say(progress.summary_line(name, "cached" if res.get("cached") else "ran", time.time() - t0,
                                               row, progress.finished(name)))
                summary = res
        typer.echo(json.dumps(_short(summary), indent=1, default=str))


@app.command("run")
def run(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt,
        stages: Optional[List[str]] = typer.Option(None, "--stage", help="only these stages (+ upstream)"),
        prefect_home: Path = typer.Option(Path("runs/prefect"), help="PREFECT_HOME of the local server"),
        verbose: bool = VerboseOpt):
    """Run the whole pipeline as a Prefect flow over Ray. Without PREFECT_API_URL a local Prefect
    server (SQLite, 127.0.0.1) is started for the run and stopped afterwards."""
    import os

    cfg = _load(config, set_)
    with _console(cfg, verbose, f"run {cfg.name}") as log_path:
        with _prefect(prefect_home, need_server=bool(os.environ.get("PREFECT_API_URL"))):
            res = _run_pipeline(cfg, stages)
        _print_table(res, cfg)
        summary_path = _write_run_summary(res, cfg, config, set_, Path(log_path))
        # one line for both (the console of a run stays within 40 lines)
        _say(f"report: {res['report']}  run summary: {summary_path}" if res.get("report")
             else f"run summary: {summary_path}")


def _write_run_summary(res: dict, cfg, config: str, set_: Optional[List[str]], log_path: Path) -> Path:
    """The run's table as JSON beside its log (<log>.summary.json): what scripts/readme_figures.py reads."""
    import platform
    import time as time_

    path = log_path.with_suffix(".summary.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"name": cfg.name, "config": config, "set": list(set_ or []), "store": cfg.store,
           "seconds": round(float(res["seconds"]), 1), "stages": res["table"],
           "finished": time_.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
           "cpus": os.cpu_count()}
    path.write_text(json.dumps(doc, indent=1, default=str))
    return path


def _say(msg: str) -> None:
    from tasks import console

    console.say(msg)


@contextlib.contextmanager
def _console(cfg, verbose: bool, what: str, quiet_bars: bool = True, log: Optional[Path] = None,
             announce: bool = True):
    """The run log and the console for one command: prints the log's path first (`announce`) and last;
    a failure is the error's message on stderr (its traceback in the log), exit code 1."""
    import os

    from tasks import console

    path = console.setup(log if log is not None else console.run_log_location(cfg.store, cfg.name), verbose=verbose)
    if quiet_bars:  # progress bars of library code in this process: the live lines replace them
        os.environ["TQDM_DISABLE"] = os.environ["RCA_NO_PROGRESS"] = "1"
    if announce:
        console.say(f"{what}: log {path}" + (" (shown live: --verbose)" if verbose else
                                            " (Ray workers, Prefect, warnings; --verbose shows them here)"))
    failed = False
    try:
        yield path
    except (typer.Exit, typer.Abort, click.exceptions.ClickException):
        raise
    except Exception as e:  # noqa: BLE001
        failed = True
        console.say(console.failure(e), err=True, log=False)
        raise typer.Exit(1)
    finally:
        console.say(f"log: {path}" + (" (the traceback and the workers' output)" if failed else ""), err=failed)
        console.teardown()


@contextlib.contextmanager
def _prefect(prefect_home: Optional[Path], need_server: bool):
    """The Prefect API for a command: PREFECT_API_URL if set (checked), else a local server for the
    duration of the block (its own log in PREFECT_HOME/server.log), or with no PREFECT_HOME Prefect's
    temporary in-process server."""
    import os
    import time

    from tasks import console

    if need_server or prefect_home is None:
        api = os.environ.get("PREFECT_API_URL")
        if api:
            _require_prefect(api)
            console.say(f"Prefect: API {api}" + (f" (UI {api[:-4]})" if api.endswith("/api") else ""))
        else:
            console.say("Prefect: temporary in-process server (set PREFECT_API_URL to see this run in a UI)")
        try:
            yield api
        finally:
            console.drain_prefect()
        return
    from flows.prefect_server import shared_local_server

    t0 = time.time()
    with contextlib.ExitStack() as stack:
        with console.Phase(f"Prefect: starting a local server (PREFECT_HOME={prefect_home})"):
            api, started = stack.enter_context(shared_local_server(prefect_home))
        if started:
            console.say(f"Prefect: local server up in {time.time() - t0:.0f} s, UI {api[:-4]} "
                        f"(server log {Path(prefect_home) / 'server.log'})")
        else:
            console.say(f"Prefect: the local server of PREFECT_HOME={prefect_home} is already running (another "
                        f"command started it), UI {api[:-4]}")
        try:
            yield api
        finally:
            console.drain_prefect()


@app.command("serve")
def serve(config: str = ConfigOpt, set_: Optional[List[str]] = SetOpt,
          name: str = typer.Option("demo", help="deployment name (flows are rca-pipeline, rca-stage-*)"),
          limit: int = typer.Option(1, help="flow runs at a time")):
    """Serve the pipeline and stage flows as deployments against PREFECT_API_URL (start runs from the UI)."""
    import os

    cfg = _load(config, set_)
    if os.environ.get("PREFECT_API_URL"):
        _require_prefect(os.environ["PREFECT_API_URL"])
    else:
        typer.secho("PREFECT_API_URL is not set: start a server (`prefect server start --host 127.0.0.1`) "
                    "and export PREFECT_API_URL=http://127.0.0.1:4200/api", fg="red", err=True)
        raise typer.Exit(2)
    from flows.serve import serve as do_serve

    typer.echo(f"[rca] serving deployments rca-pipeline/{name} and rca-stage-*/{name} on {os.environ['PREFECT_API_URL']}")
    do_serve(cfg, name=name, limit=limit)


def _require_prefect(api: str) -> None:
    from flows.prefect_server import wait_healthy

    try:
        wait_healthy(api, timeout=10)
    except RuntimeError as e:
        typer.secho(f"Prefect server unreachable (PREFECT_API_URL={api}): {e}. Start it, or unset "
                    "PREFECT_API_URL to let `rca run` start a local one.", fg="red", err=True)
        raise typer.Exit(2)


def _run_pipeline(cfg, stages):
    from flows.pipeline import pipeline

    return pipeline(config=cfg, stages=stages or None)


def _print_table(res: dict, cfg) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = res["table"]
    cols = ["stage", "status", "seconds"] + [k for k in ("miou", "miou_all", "miou_confident", "kept_fraction",
                                                         "best_threshold", "map", "val_miou", "miou_single_scale",
                                                         "scored_on")
                                             if any(k in r for r in rows)]
    t = Table(title=f"run {cfg.name}: {res['seconds']:.0f} s wall time")
    for c in cols:
        t.add_column(c, justify="left" if c in ("stage", "status") else "right")
    for r in rows:
        t.add_row(*[("" if r.get(c) is None else str(r.get(c))) for c in cols])
    Console(width=max(140, Console().width)).print(t)
    _say(f"wall time per stage above; total {res['seconds']:.0f} s")
    _say(f"outputs: artifact store {cfg.store}")
    for name, key in res["keys"].items():
        _say(f"  {name:15s} {cfg.store}/{key}")


@app.command("predict")
def predict(checkpoint: Path = typer.Argument(..., help="segmenter.pt in the seg_train stage's files/ folder"),
            inputs: List[Path] = typer.Argument(..., help="image files and/or folders"),
            out: Path = typer.Option(..., "--out", "-o", help="output folder (masks/ and overlays/)"),
            batch_size: int = typer.Option(8, help="images per forward pass"),
            device: str = typer.Option("auto", help="auto, cpu or cuda"),
            overlays: bool = typer.Option(True, help="also write colour overlays"),
            verbose: bool = VerboseOpt):
    """Segment new images: VOC palette PNG masks (+ overlays). Unreadable files are named; the rest still run."""
    import time

    if not checkpoint.is_file():
        typer.secho(f"checkpoint not found: {checkpoint}", fg="red", err=True)
        raise typer.Exit(2)
    from tasks import console

    files = inputs[0] if len(inputs) == 1 and inputs[0].is_dir() else list(inputs)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with _console(None, verbose, "predict", log=out / "logs" / f"predict-{stamp}.log", announce=False):
        from rca_core.predict import list_inputs, predict_folder

        t0 = time.time()
        listed, _ = list_inputs(files)
        # a terminal shows predict_folder's own progress bar (it disappears at the end); a pipe gets none
        errors = predict_folder(checkpoint, files, out, batch_size=batch_size,
                                device=None if device == "auto" else device, overlays=overlays,
                                show_progress=console.CONSOLE.is_tty())
        n = max(0, len(listed) - sum(1 for e in errors if "cannot read" in e or "cannot write" in e))
        _say(f"predict: {n} masks in {out / 'masks'}" + (f", overlays in {out / 'overlays'}" if overlays else "")
             + f" ({time.time() - t0:.1f} s)" + (f"; {len(errors)} input(s) failed:" if errors else ""))
        for e in errors:
            typer.secho(f"error: {e}", fg="red", err=True)
    if errors:
        raise typer.Exit(1)


@app.command("report")
def report(run: str = typer.Argument(..., help="a run config YAML, or an artifact store (folder or URL)"),
           out: Optional[str] = typer.Option(None, help="output folder or URL (default: <store>/../report for a "
                                                      "local store, <store>/_report for a bucket)")):
    """Write the HTML run report (tables, per-class bars, curves, sample grid) and print its path."""
    from rca_core import storage
    from rca_core.config import config_from_dict, load_config, resolve_paths

    if run.endswith((".yaml", ".yml")) and not storage.is_url(run):
        cfg = resolve_paths(load_config(run))
    else:
        import yaml

        store = storage.absolute(run)
        fs, root = storage.filesystem(store)
        runs = [p for p in fs.glob(storage.join(root, "_runs", "*", "run.json"))]
        if not runs:
            typer.secho(f"{run}: no recorded run (no _runs/*/run.json): not an artifact store?", fg="red", err=True)
            raise typer.Exit(2)
        newest = max(runs, key=lambda p: json.loads(fs.cat_file(p)).get("recorded_at", 0))
        text = fs.cat_file(newest.rsplit("/", 1)[0] + "/config.yaml").decode()
        cfg = config_from_dict(yaml.safe_load(text), newest).model_copy(update={"store": store})
    from rca_core.report import default_location, write_report

    path = write_report(cfg.store, out or default_location(cfg), cfg)
    typer.echo(str(path))


def _short(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not isinstance(v, (list, dict)) or k in ("best",)}


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
