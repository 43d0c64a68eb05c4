"""The stage contract: the registry's records are checked when it is imported, importing it pulls in neither
torch, zarr nor Ray, a stage reads its inputs by role, a stage's GPU use is a config choice, and no module of
the project imports itself back through others (an import circle)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ("rca_core", "tasks", "flows")


def test_registry_import_pulls_in_no_torch_zarr_or_ray():
    code = ("import sys, rca_core.stages.registry, rca_core.stages.planning\n"
            "print(sorted(m for m in ('torch', 'zarr', 'ray', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def _record(**kw):
    from rca_core.stages.registry import Stage

    base = dict(name="x", kind="per_image", module="m", code_version="1", config=lambda c: {})
    return Stage(**{**base, **kw})


@pytest.mark.parametrize("stages, says", [
    (lambda S: [S(name="a"), S(name="b", inputs={"cams": "nope"})], "input 'cams' names 'nope', which is not a registered stage"),
    (lambda S: [S(name="b", inputs={"cams": "a"}), S(name="a")], "registered after it"),
    (lambda S: [S(name="a", inputs={"me": "a"})], "names the stage itself (a cycle)"),
    (lambda S: [S(name="a"), S(name="a")], "registered twice"),
    (lambda S: [S(name="a", fields=("cam",)), S(name="b", inputs={"cams": "a"}, prefetch=("cam/cam",))],
     "prefetch 'cam/cam' must be 'image', 'mask' or '<role>/<field>'"),
    (lambda S: [S(name="a", fields=("cam",)), S(name="b", inputs={"cams": "a"}, prefetch=("cams/emb",))],
     "stage 'a' writes no field 'emb'"),
    (lambda S: [S(name="a", kind="driver")], "kind 'driver' is not one of per_image, training"),
    (lambda S: [S(name="a", split="test_split")], "split 'test_split' is not one of"),
    (lambda S: [S(name="a", kind="training", fields=("w",))], "a training stage writes no per-image fields"),
])
def test_inconsistent_registry_fails_naming_the_stage(stages, says):
    from rca_core.stages.registry import RegistryError, validate

    with pytest.raises(RegistryError) as e:
        validate(stages(_record))
    assert says in str(e.value) and "stage registry, stage " in str(e.value), str(e.value)


def test_the_registry_lists_every_stage_module_and_inputs_by_role():
    import importlib

    from rca_core.stages import registry

    assert registry.STAGE_NAMES == ["cam_train", "memory_build", "cam_infer", "clip_cam", "cam_import", "cam_eval",
                                    "crf_labels", "affinity_train", "random_walk", "seg_train", "seg_eval"]
    for rec in registry.STAGES:
        mod = importlib.import_module(rec.module)
        assert hasattr(mod, "Worker" if rec.kind == "per_image" else "train"), rec.name
        assert hasattr(mod, "finalize") or rec.kind == "training", rec.name
    assert registry.get("random_walk").uses() == {"cams": "cam_infer", "affinity": "affinity_train"}
    with pytest.raises(KeyError, match="unknown stage 'cam_inferr'; stages are: cam_train"):
        registry.get("cam_inferr")


def test_conditional_input_and_stage_keys_follow_the_config():
    from rca_core.config import RunConfig
    from rca_core.stages.planning import plan

    cfg = RunConfig()
    gt = cfg.model_copy(deep=True)
    gt.segmenter.labels = "gt"
    p, q = plan(cfg), plan(gt)
    assert p["seg_train"].roles == {"masks": "random_walk"} and q["seg_train"].roles == {}
    assert p["seg_train"].key != q["seg_train"].key and p["random_walk"].key == q["random_walk"].key


def test_the_cam_source_picks_the_cam_stages_and_keeps_every_other_key():
    """cam.source swaps cam_train + memory_build + cam_infer for clip_cam or cam_import; the consumers read
    `cams` from it; an rca run's keys do not move with the other sources' settings, and no consumer key is
    shared between sources (nothing of one source is reused for another)."""
    from rca_core.config import ConfigError, RunConfig, load_config
    from rca_core.stages.planning import plan, run_order, upstream_closure

    tiny = ROOT / "configs/tiny.yaml"
    rca = load_config(tiny)
    clip = load_config(tiny, {"cam": {"source": "clip", "clip": {"weights": "random"}}})
    ext = load_config(tiny, {"cam": {"source": "external", "external": {"dir": str(ROOT)}}})
    tweaked = load_config(tiny, {"cam": {"clip": {"weights": "random", "templates": ["a photo of a {}."]},
                                         "external": {"dir": "elsewhere"}}})
    p, c, e = plan(rca), plan(clip), plan(ext)
    assert list(p) == ["cam_train", "memory_build", "cam_infer", "cam_eval", "crf_labels", "affinity_train",
                       "random_walk", "seg_train", "seg_eval"]
    assert list(c) == ["clip_cam"] + list(p)[3:] and list(e) == ["cam_import"] + list(p)[3:]
    assert run_order(clip) == list(c)
    for q, src in ((p, "cam_infer"), (c, "clip_cam"), (e, "cam_import")):
        assert q["crf_labels"].roles == {"cams": src} and q["random_walk"].roles["cams"] == src
        assert q["cam_eval"].roles == {"cams": src}
    assert {n: x.key for n, x in plan(tweaked).items()} == {n: x.key for n, x in p.items()}
    for n in list(p)[3:]:
        assert len({p[n].key, c[n].key, e[n].key}) == 3, n
    assert upstream_closure("random_walk", clip) == ["clip_cam", "crf_labels", "affinity_train", "random_walk"]
    with pytest.raises(ConfigError, match=r"stage cam_train is off: cam.source is 'clip' \(it runs when cam.source "
                                          r"is 'rca'\); this config's stages: clip_cam, cam_eval"):
        upstream_closure("cam_train", clip)
    with pytest.raises(ValueError, match="cam.source clip needs cam.clip.weights"):
        RunConfig.model_validate({"cam": {"source": "clip"}})
    with pytest.raises(ValueError, match="cam.source external needs cam.external.dir"):
        RunConfig.model_validate({"cam": {"source": "external"}})


def test_an_undeclared_input_role_is_named(tmp_path):
    from rca_core.stages.context import Inputs

    inputs = Inputs("crf_labels", {"cams": object()})
    with pytest.raises(KeyError, match="stage crf_labels has no input role 'cam' for this config; its roles: cams"):
        inputs["cam"]
    assert inputs.get("cam") is None


def test_gpu_use_is_chosen_per_stage_in_the_config():
    from rca_core.config import ConfigError, RunConfig
    from rca_core.stages import registry
    from rca_core.stages.planning import plan

    cfg = RunConfig()
    assert registry.get("cam_infer").wants_gpu(cfg) and not registry.get("crf_labels").wants_gpu(cfg)
    cfg.ray.stage_gpus = {"cam_infer": False, "crf_labels": True}
    assert not registry.get("cam_infer").wants_gpu(cfg) and registry.get("crf_labels").wants_gpu(cfg)
    before = {n: p.key for n, p in plan(RunConfig()).items()}
    assert {n: p.key for n, p in plan(cfg).items()} == before  # where a stage runs is not part of its key
    cfg.ray.stage_gpus = {"cam_infr": True}
    with pytest.raises(ConfigError, match="ray.stage_gpus names unknown stage"):
        plan(cfg)


# ------------------------------------------------------------------------------------------ import circles
def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, at any level of the file (function-level imports included)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        for t in targets:
            while t and t not in mods:  # `from a.b import c`: the module a.b.c if it is one, else a.b
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_anywhere():
    """No module of rca_core, tasks or flows reaches itself through its imports (function-level ones too), except
    a package and its own submodules (importing a submodule always runs its package first)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = _imports(name, path, mods)
        # a submodule -> its own package (or an ancestor) is not an edge: Python runs the package first anyway
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    assert _cycles(graph) == []


def test_the_circle_finder_finds_circles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_layers_library_knows_no_orchestration_and_workers_no_prefect():
    """rca_core imports neither Prefect nor Ray nor tasks/flows; tasks/remote.py (the code that runs inside Ray
    workers) imports no Prefect, flows or other tasks module."""
    mods = _modules()
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        roots = {n.split(".")[0] for n in names}
        if name.startswith("rca_core"):
            assert not roots & {"prefect", "ray", "tasks", "flows"}, (name, roots)
        if name == "tasks.remote":
            assert not roots & {"prefect", "flows"}, roots
            assert not {d for d in _imports(name, path, mods) if d.startswith(("tasks.", "flows."))}, name


# ------------------------------------------------------------------------------------------ adding a stage
NEW_STAGE = '''"""Stage cam_area (a throwaway stage of the test): per image, the share of pixels where each tag's CAM is
above cam_area.threshold."""
import numpy as np

from rca_core.cam_ops import decode_cam


class Worker:
    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.areas = []

    def process(self, image_id):
        cam, attrs = self.ctx.inputs["cams"].read(image_id, "cam")
        area = (decode_cam(cam) > self.cfg.cam_area.threshold).mean(axis=(1, 2)).astype(np.float32)
        self.ctx.out.write(image_id, {"area": area}, attrs={"classes": attrs["classes"]})
        self.areas += area.tolist()
        return {"tags": len(area)}

    def account(self, image_id):
        self.areas += self.ctx.out.read(image_id, "area")[0].tolist()

    def partial(self):
        part, self.areas = self.areas, []
        return part


def finalize(cfg, ctx, parts):
    areas = [a for p in parts for a in p]
    return {"mean_area": float(np.mean(areas)) if areas else None, "regions": len(areas)}
'''
CONFIG_SECTION = '''

class CamAreaConfig(StrictModel):
    threshold: float = Field(0.5, ge=0, le=1, description="CAM value above which a pixel counts")
'''
RECORD = '''
STAGES.append(Stage("cam_area", "per_image", "rca_core.stages.cam_area", "1", lambda c: {"area": c.cam_area},
                    inputs={"cams": "cam_infer"}, fields=("area",), prefetch=("cams/cam",)))
'''


def _add_throwaway_stage(repo: Path) -> None:
    """What a researcher writes to add a stage: its module, its config section, one registry record."""
    (repo / "rca_core/stages/cam_area.py").write_text(NEW_STAGE)
    run = repo / "rca_core/config/run.py"
    text = run.read_text()
    anchor = "\n\nclass RunConfig(StrictModel):"
    text = text.replace(anchor, CONFIG_SECTION + anchor, 1)
    text = text.replace("    ray: RayConfig = RayConfig()\n",
                        "    ray: RayConfig = RayConfig()\n    cam_area: CamAreaConfig = CamAreaConfig()\n", 1)
    run.write_text(text)
    reg = repo / "rca_core/stages/registry.py"
    text = reg.read_text()
    anchor = "\n\ndef validate("
    reg.write_text(text.replace(anchor, "\n" + RECORD + anchor, 1))


@pytest.mark.slow
def test_a_new_stage_is_its_file_its_config_section_and_one_record(reference_run, prefect_server, tmp_path):
    """A throwaway per-image stage added to a copy of the project touches three files (none in tasks/ or flows/)
    and runs through the real orchestration: `rca stage` (Prefect flow + Ray actor pool) from another working
    directory, its upstream found Cached, its images written, its summary merged from the workers' parts."""
    import os
    import shutil

    import yaml

    from conftest import RCA, copy_stages, write_config
    from rca_core.config import load_config

    repo = tmp_path / "repo"
    for part in ("rca_core", "tasks", "flows"):
        shutil.copytree(ROOT / part, repo / part, ignore=shutil.ignore_patterns("__pycache__"))
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True, text=True).stdout
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "the project as it is")
    _add_throwaway_stage(repo)
    git("add", "-A")
    touched = sorted(git("diff", "--cached", "--name-only").split())
    assert touched == ["rca_core/config/run.py", "rca_core/stages/cam_area.py", "rca_core/stages/registry.py"]

    assert reference_run["rc"] == 0
    cfg_path = write_config(tmp_path / "run")
    n = load_config(cfg_path).data.demo.n_train
    copy_stages(load_config(reference_run["config"]), load_config(cfg_path), ["cam_train", "memory_build", "cam_infer"])
    data = yaml.safe_load(cfg_path.read_text())  # the new section: only the copy of the project knows it
    data["cam_area"] = {"threshold": 0.3}
    cfg_path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PYTHONPATH": str(repo)}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    res = subprocess.run([RCA, "stage", "cam_area", "-c", str(cfg_path)], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "cam_area        ran" in out, out[-3000:]
    code = ("import json, sys\nfrom rca_core.config import load_config\nfrom rca_core.stages.planning import plan\n"
            "from rca_core.store import ArtifactStore\ncfg = load_config(sys.argv[1])\np = plan(cfg)\n"
            "out = ArtifactStore(cfg.store).stage('cam_area', p['cam_area'].fingerprint)\n"
            "up = ArtifactStore(cfg.store).stage('cam_infer', p['cam_infer'].fingerprint)\n"
            "print(json.dumps({'summary': out.summary(), 'listed': len(out.listed_ids()), 'fields': out.fields,\n"
            "                  'upstream': up.summary()['completed_at']}))")
    import json

    got = json.loads(subprocess.run([sys.executable, "-c", code, str(cfg_path)], cwd=cwd, env=env, check=True,
                                    capture_output=True, text=True).stdout)
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    ref = load_config(reference_run["config"])
    ref_infer = ArtifactStore(ref.store).stage("cam_infer", plan(ref)["cam_infer"].fingerprint).summary()
    assert got["upstream"] == ref_infer["completed_at"]  # the copied CAMs were found complete, not recomputed
    assert got["fields"] == ["area"] and got["listed"] == n, got
    s = got["summary"]
    assert s["images"] == n and s["recomputed_images"] == n and s["regions"] >= n and 0 < s["mean_area"] < 1, s
    assert s["actors"] >= 1, s  # on the Ray actor pool


def test_the_paths_checked_are_those_the_configs_stages_read():
    """check_paths (and the node preflight and weight staging, through input_keys) look only at the files the
    config's CAM source reads; 'random' names no file only for cam.clip.weights."""
    from rca_core.config import ConfigError, load_config
    from rca_core.config.run import WEIGHT_KEYS, input_keys

    tiny = ROOT / "configs/tiny.yaml"
    stale = {"cam": {"backbone": {"pretrained": "/nowhere/resnet.pth"}}}
    with pytest.raises(ConfigError, match=r"cam.backbone.pretrained: path not found: /nowhere/resnet.pth"):
        load_config(tiny, stale)
    clip = load_config(tiny, {**stale, "cam": {**stale["cam"], "source": "clip", "clip": {"weights": "random"}}})
    assert input_keys(clip, WEIGHT_KEYS) == []  # the RCA network's weights are not read by a clip run
    with pytest.raises(ConfigError, match=r"segmenter.pretrained: path not found: random"):
        load_config(tiny, {"segmenter": {"pretrained": "random"}})
    with pytest.raises(ConfigError, match=r"cam.checkpoint is a trained RCA network: it is read with cam.source rca"):
        load_config(tiny, {"cam": {"source": "clip", "clip": {"weights": "random"}, "checkpoint": str(tiny)}})
