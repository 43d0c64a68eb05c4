"""deploy/: every file parses, the security settings the cluster files promise are there, and every `rca` and
`ray` command that deploy/README.md and the scripts spell out names options those commands really have."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
README = DEPLOY / "README.md"


def _yaml_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]


def test_every_yaml_file_parses():
    files = sorted(DEPLOY.glob("*.yaml")) + sorted(DEPLOY.glob("*.yml"))
    assert {f.name for f in files} >= {"ray-cluster.yaml", "kuberay-raycluster.yaml"}
    for f in files:
        assert list(yaml.safe_load_all(f.read_text())), f


@pytest.mark.parametrize("script", sorted(p.name for p in DEPLOY.glob("*.sh")))
def test_shell_scripts_parse(script):
    res = subprocess.run(["bash", "-n", str(DEPLOY / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_ray_cluster_yaml_is_a_valid_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_yaml_docs("ray-cluster.yaml")[0]))


def test_ray_cluster_yaml_keeps_auth_on_and_the_dashboard_local():
    text = (DEPLOY / "ray-cluster.yaml").read_text()
    cfg = _yaml_docs("ray-cluster.yaml")[0]
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                              "head_start_ray_commands", "worker_start_ray_commands", "initialization_commands")
                for c in cfg.get(key) or []]
    joined = "\n".join(commands)
    assert "|| true" not in joined and "mount " not in joined
    assert "RAY_AUTH_MODE=disabled" not in text
    assert "--dashboard-host=127.0.0.1" in joined and "0.0.0.0" not in joined
    assert all("node-env.sh" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "'.[s3]'" in joined
    env = (DEPLOY / "node-env.sh").read_text()
    assert "export RAY_AUTH_MODE=token" in env and "RAY_AUTH_TOKEN_PATH=" in env
    assert "/home/ubuntu/.rca/cluster" in cfg["file_mounts"]
    for t in cfg["available_node_types"].values():  # S3 credentials through instance profiles
        assert "IamInstanceProfile" in t["node_config"]


def test_ray_cluster_head_runs_prefect_on_postgresql():
    """The head installs PostgreSQL (deploy/prefect-db.sh install), starts the database (a managed one's URL, or
    its own PostgreSQL on 127.0.0.1) before the Prefect server, which then reads the URL file; no secret in YAML."""
    cfg = _yaml_docs("ray-cluster.yaml")[0]
    assert any("deploy/prefect-db.sh install" in c for c in cfg["head_setup_commands"])
    start = cfg["head_start_ray_commands"]
    i_db = next(i for i, c in enumerate(start) if "deploy/prefect-db.sh start" in c)
    i_srv = next(i for i, c in enumerate(start) if "deploy/prefect-server.sh start" in c)
    assert i_db < i_srv and all("node-env.sh" in start[i] for i in (i_db, i_srv))
    assert not any("prefect-db.sh" in c for c in cfg["setup_commands"] + cfg["worker_start_ray_commands"])
    text = (DEPLOY / "ray-cluster.yaml").read_text()
    assert "DATABASE_CONNECTION_URL" not in text and "postgresql+asyncpg://" not in text
    db_sh = (DEPLOY / "prefect-db.sh").read_text()
    assert "listen_addresses=127.0.0.1" in db_sh and "$PREFECT_HOME/db_url" in db_sh
    assert "$PREFECT_HOME/db_url" in (DEPLOY / "prefect-server.sh").read_text()


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_kuberay_manifest():
    docs = _yaml_docs("kuberay-raycluster.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert {"RayCluster", "Deployment", "Service", "NetworkPolicy"} <= set(kinds)
    rc = kinds["RayCluster"]
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    head_c = head["template"]["spec"]["containers"][0]
    containers = [head_c] + [g["template"]["spec"]["containers"][0] for g in rc["spec"]["workerGroupSpecs"]]
    for c in containers:  # token auth on every Ray container, token and S3 keys from Secrets
        env = _env(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "rca-ray-token"
        assert {"secretRef": {"name": "rca-s3"}} in c["envFrom"]
        assert not any(k.startswith("AWS_SECRET") or k.startswith("AWS_ACCESS") for k in env)
    # the head runs `rca serve` (deploy/kuberay-head.sh) against the Prefect Service of the same manifest
    assert "kuberay-head.sh" in " ".join(head_c["args"])
    assert head["template"]["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    svc = kinds["Service"]["metadata"]["name"]
    port = kinds["Service"]["spec"]["ports"][0]["port"]
    assert _env(head_c)["PREFECT_API_URL"]["value"] == f"http://{svc}:{port}/api"
    assert "rca serve" in (DEPLOY / "kuberay-head.sh").read_text() or "serve.sh" in (DEPLOY / "kuberay-head.sh").read_text()
    prefect_env = _env(kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0])
    assert "secretKeyRef" in prefect_env["PREFECT_SERVER_API_AUTH_STRING"]["valueFrom"]


def test_kuberay_prefect_server_reads_its_database_url_from_a_secret():
    """The Prefect container runs deploy/prefect-server.sh (the script the test of tests/test_prefect_postgres.py
    runs on a real PostgreSQL) with the database URL from the Secret rca-prefect-db; no SQLite volume is left."""
    docs = _yaml_docs("kuberay-raycluster.yaml")
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "rca-prefect")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["bash", "/app/deploy/prefect-server.sh", "run"]
    env = _env(c)
    ref = env["PREFECT_API_DATABASE_CONNECTION_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "rca-prefect-db", "key": "connection_url"}
    assert "value" not in env["PREFECT_API_DATABASE_CONNECTION_URL"]
    # listening beyond the pod's loopback, which the script allows only with basic auth from a Secret
    assert env["PREFECT_SERVER_HOST"]["value"] == "0.0.0.0"
    assert env["PREFECT_SERVER_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["name"] == "rca-prefect-auth"
    assert int(env["PREFECT_PORT"]["value"]) == c["ports"][0]["containerPort"]
    assert not any("persistentVolumeClaim" in v for v in pod.get("volumes", []))
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}


def test_kuberay_postgres_manifest():
    """deploy/kuberay-postgres.yaml: PostgreSQL (Deployment + PVC + Service + NetworkPolicy), its password from the
    Secret rca-prefect-db, reachable by the Prefect server's pods only; the URL that deploy/README.md puts into the
    Secret names that Service, port, role and database."""
    docs = _yaml_docs("kuberay-postgres.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = _env(c)
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "rca-prefect-db", "key": "password"}
    assert not any("PASSWORD" in k and "value" in e for k, e in env.items())
    major = int(c["image"].split(":")[1].split(".")[0].split("-")[0])
    assert c["image"].startswith("postgres:") and major >= 15  # Prefect 3 needs PostgreSQL 14.9+
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    svc = kinds["Service"]
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    # only the Prefect server's pods (their labels in kuberay-raycluster.yaml) may connect
    prefect = next(d for d in _yaml_docs("kuberay-raycluster.yaml") if d["kind"] == "Deployment")
    netpol = kinds["NetworkPolicy"]["spec"]
    assert netpol["podSelector"]["matchLabels"] == svc["spec"]["selector"]
    prefect_labels = prefect["spec"]["template"]["metadata"]["labels"]
    assert netpol["ingress"][0]["from"] == [{"podSelector": {"matchLabels": prefect_labels}}]
    # deploy/README.md's `kubectl create secret generic rca-prefect-db ...` names this database
    text = README.read_text()
    m = re.search(r"kubectl create secret generic rca-prefect-db .*?connection_url=\"postgresql\+asyncpg://"
                  r"([a-z_]+):\$DB_PASSWORD@([a-z0-9-]+):(\d+)/([a-z_]+)\"", text, re.S)
    assert m, "deploy/README.md: no `kubectl create secret generic rca-prefect-db` with the in-cluster URL"
    user, host, port, db = m.groups()
    assert (host, int(port)) == (svc["metadata"]["name"], svc["spec"]["ports"][0]["port"])
    assert (user, db) == (env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"])


def test_no_database_password_in_the_deploy_files():
    """Database URLs with a password appear only as placeholders (USER:PASSWORD, $DB_PASSWORD, <...>)."""
    for f in [*DEPLOY.glob("*.yaml"), *DEPLOY.glob("*.sh"), README]:
        for m in re.finditer(r"postgres(?:ql)?(?:\+asyncpg)?://([^:@/\s]+):([^@\s]+)@", f.read_text()):
            assert m.group(2) in ("PASSWORD", "***") or m.group(2).startswith(("<", "$")), \
                f"{f.name}: a database URL with a literal password: {m.group(0)}"


# ------------------------------------------------------------------------------ commands named in the docs
def _command_lines(text: str) -> list[str]:
    """Lines of fenced code blocks (continuations joined) and inline code spans."""
    lines, block, buf = [], False, ""
    for raw in text.splitlines():
        if raw.strip().startswith("```"):
            block = not block
            continue
        if block:
            buf += raw.rstrip()
            if buf.endswith("\\"):
                buf = buf[:-1] + " "
                continue
            lines.append(buf)
            buf = ""
        else:
            lines += re.findall(r"`([^`]+)`", raw)
    return lines


SEPARATORS = re.compile(r"\s(?:&&|\|\||\||;)\s|['\");]|$")


def _invocations(lines: list[str], prog: str, depth: int) -> list[tuple[list[str], list[str]]]:
    """(subcommand words, options) of every `prog sub [sub] ... --opt` in the lines."""
    out = []
    for line in lines:
        for m in re.finditer(rf"(?:^|[\s/(]){re.escape(prog)} ((?:[a-z][a-z-]* ?){{1,{depth}}})(.*)", line):
            words = m.group(1).split()
            rest = SEPARATORS.split(m.group(2), maxsplit=1)[0]
            rest = rest.split(" -- ", 1)[0]  # what follows `--` is another program's command line
            opts = [t.split("=", 1)[0] for t in rest.split() if re.fullmatch(r"--?[a-zA-Z][\w-]*(=.*)?", t)]
            out.append((words, opts))
    return out


def _click_options(group, words: list[str]):
    """The click command reached by `words` (as far as they name subcommands) and all its option strings."""
    cmd = group
    for w in words:  # duck-typed: typer may bring its own copy of click
        if hasattr(cmd, "commands") and w in cmd.commands:
            cmd = cmd.commands[w]
        else:
            break
    opts = {"--help"}
    for p in getattr(cmd, "params", []):
        opts.update(p.opts)
        opts.update(p.secondary_opts)
    return cmd, opts


def _docs_text() -> str:
    return "\n".join(p.read_text() for p in [README, *sorted(DEPLOY.glob("*.sh")), *sorted(DEPLOY.glob("*.yaml"))])


def test_rca_commands_in_the_docs_exist():
    import typer.main

    from flows.cli import app

    group = typer.main.get_command(app)
    seen = 0
    for words, opts in _invocations(_command_lines(_docs_text()), "rca", 2):
        if words[0] not in group.commands:
            continue  # prose such as "rca serve's ..." is filtered by the subcommand check below
        cmd, known = _click_options(group, words)
        assert not hasattr(cmd, "commands"), f"`rca {' '.join(words)}` names no command"
        unknown = [o for o in opts if o not in known]
        assert not unknown, f"`rca {' '.join(words)}`: no such option(s) {unknown}"
        seen += 1
    assert seen >= 8


def test_ray_commands_in_the_docs_exist():
    from ray.scripts.scripts import cli

    seen = 0
    for words, opts in _invocations(_command_lines(_docs_text()), "ray", 2):
        if words[0] not in cli.commands:
            continue
        cmd, known = _click_options(cli, words)
        assert not hasattr(cmd, "commands"), f"`ray {' '.join(words)}` names no command"
        unknown = [o for o in opts if o not in known]
        assert not unknown, f"`ray {' '.join(words)}`: no such option(s) {unknown}"
        seen += 1
    assert seen >= 10


def test_submit_sh_builds_the_documented_job(tmp_path):
    """deploy/submit.sh with a stand-in `ray`: the job is `bash -c '<cd> && exec env ... rca run ...'` with
    ray.address=auto and the store, and the token settings reach the submitting `ray`."""
    fake = tmp_path / "ray"
    fake.write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"RAY_AUTH_MODE=$RAY_AUTH_MODE\" "
                    "\"RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH\" \"$@\"\n")
    fake.chmod(0o755)
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAY_BIN": str(fake), "RCA_STORE": "s3://b/runs/demo",
           "RAY_AUTH_TOKEN_PATH": str(token), "RCA_JOB_ID": "rca-test-1"}
    res = subprocess.run(["bash", str(DEPLOY / "submit.sh"), "configs/tiny.yaml", "--set", "ray.num_workers=3"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert "RAY_AUTH_MODE=token" in out and f"RAY_AUTH_TOKEN_PATH={token}" in out
    args = out[out.index("job"):]
    assert args[:6] == ["job", "submit", "--address", "http://127.0.0.1:8265", "--submission-id", "rca-test-1"]
    assert "--no-wait" in args and args[args.index("--") + 1:args.index("--") + 3] == ["bash", "-c"]
    entry = args[args.index("--") + 3]
    assert entry.startswith("cd /home/ubuntu/rca && exec env ")
    assert "PREFECT_API_URL=http://127.0.0.1:4200/api" in entry
    assert ("rca run --config configs/tiny.yaml --set store=s3://b/runs/demo --set ray.address=auto "
            "--set ray.num_workers=3") in entry
    # without a token file it refuses before submitting
    res = subprocess.run(["bash", str(DEPLOY / "submit.sh"), "configs/tiny.yaml"], cwd=ROOT,
                         env={**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, capture_output=True, text=True)
    assert res.returncode == 2 and "no Ray auth token" in res.stderr


def test_config_keys_in_the_docs_exist():
    """Every `--set KEY=...` and every `ray.KEY` the docs name is a key of the run config."""
    from rca_core.config import RunConfig
    from rca_core.config.run import get_key

    text = _docs_text()
    keys = set(re.findall(r"--set[ =]['\"]?([a-z_][a-z0-9_.]*)=", text))
    keys |= {k.rstrip(".") for k in re.findall(r"`(ray\.[a-z_]+)", text)}
    keys -= {"ray.X", "ray.init", "ray.io"}  # the table placeholder, a Ray API, KubeRay labels
    assert {"store", "data.root", "ray.address", "ray.num_workers"} <= keys
    cfg = RunConfig()
    for key in sorted(keys):
        try:
            get_key(cfg, key)
        except AttributeError:
            pytest.fail(f"deploy docs name config key {key!r}, which RunConfig does not have")
