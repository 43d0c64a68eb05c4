"""The cluster's Prefect server on PostgreSQL, with the very scripts the cluster runs.

deploy/prefect-db.sh starts a real PostgreSQL on 127.0.0.1 (a temporary data directory, a free port; as the
`postgres` OS user when the tests run as root, since PostgreSQL refuses root) and writes the database URL;
deploy/prefect-server.sh starts Prefect's server on that URL and says so; a small flow runs against the server;
its flow run and task runs are then read from PostgreSQL's own tables (asyncpg, Prefect's driver), and no SQLite
file exists. Then the KubeRay container's command (`deploy/prefect-server.sh run`, the URL from the environment as
the Secret gives it) serves the same flow run from the same database. Every server is stopped at the end. The
rest checks the script's choice of database (`db`) without starting anything: the URL from the environment, from
a file, SQLite only when none is given.
"""
from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DB_SH = ROOT / "deploy" / "prefect-db.sh"
SERVER_SH = ROOT / "deploy" / "prefect-server.sh"
VENV_BIN = Path(sys.executable).parent
DB_VARS = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_DB_URL_FILE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any database setting, the venv's `prefect` first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in DB_VARS and not k.startswith("PREFECT_API_URL")}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(extra)
    return env


def postgres_runner() -> tuple[list[str], pwd.struct_passwd | None]:
    """How to run deploy/prefect-db.sh: directly, or as the `postgres` OS user when this is root. Skips (with the
    reason) only when PostgreSQL cannot run here: no server binaries, or root without a user to run them as."""
    if not (glob.glob("/usr/lib/postgresql/*/bin/pg_ctl") or shutil.which("pg_ctl")):
        pytest.skip("PostgreSQL's server binaries (pg_ctl, initdb) are not installed: apt-get install postgresql")
    if os.geteuid() != 0:
        return [], None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root (PostgreSQL refuses root) and there is no `postgres` OS user to run it as")
    runuser = shutil.which("runuser")
    if not runuser:
        pytest.skip("running as root (PostgreSQL refuses root) and there is no runuser to switch to `postgres`")
    return [runuser, "-u", "postgres", "--"], user


def pg_rows(url: str, flow_name: str) -> list[dict]:
    """The flow runs of `flow_name` with their task runs, read from Prefect's tables in PostgreSQL."""
    import asyncpg

    async def q():
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1), timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT fr.id, fr.state_type, fr.state_name, "
                "(SELECT count(*) FROM task_run t WHERE t.flow_run_id = fr.id AND t.state_type = 'COMPLETED') AS tasks "
                "FROM flow_run fr JOIN flow f ON f.id = fr.flow_id WHERE f.name = $1", flow_name)
            return [dict(r) for r in rows]
        finally:
            await conn.close()

    return asyncio.run(q())


FLOW = """
import sys
from prefect import flow, task

@task
def square(x: int) -> int:
    return x * x

@flow(name=sys.argv[1])
def probe() -> int:
    return square(3) + square(4)

assert probe() == 25
print("flow done")
"""


@pytest.mark.timeout(240)
def test_cluster_prefect_server_runs_on_postgresql():
    runner, pg_user = postgres_runner()
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="rca-pg-test-"))  # /tmp: a folder the `postgres` user may enter
    tmp.chmod(0o755)
    db_home, server_home = tmp / "db-home", tmp / "server-home"
    pg_port, api_port = free_port(), free_port()
    db_env = clean_env(HOME=str(tmp), PREFECT_HOME=str(db_home), PREFECT_PG_DATA=str(tmp / "pg" / "data"),
                       PREFECT_PG_PORT=str(pg_port), PREFECT_PG_PASSWORD_FILE=str(tmp / "pg" / "password"),
                       PREFECT_DB_MANAGED_URL_FILE=str(tmp / "no-managed-url"))
    server_env = clean_env(PREFECT_HOME=str(server_home), PREFECT_PORT=str(api_port),
                           PREFECT_DB_URL_FILE=str(db_home / "db_url"), PREFECT_BIN=str(VENV_BIN / "prefect"))
    api = f"http://127.0.0.1:{api_port}/api"
    if pg_user is not None:
        os.chown(tmp, pg_user.pw_uid, pg_user.pw_gid)

    def db_sh(cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([*runner, "bash", str(DB_SH), cmd], env=db_env, cwd=tmp, capture_output=True,
                              text=True, timeout=180)

    def server_sh(cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SERVER_SH), cmd], env=server_env, capture_output=True, text=True,
                              timeout=200)

    started_server = False
    try:
        # 1) PostgreSQL on 127.0.0.1, as on the cluster's head; a second start is a no-op (idempotent)
        r = db_sh("start")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"on 127.0.0.1:{pg_port}" in r.stdout
        url = (db_home / "db_url").read_text().strip()
        assert url.startswith(f"postgresql+asyncpg://prefect:") and url.endswith(f"@127.0.0.1:{pg_port}/prefect")
        assert oct((db_home / "db_url").stat().st_mode & 0o777) == "0o600"
        password = (tmp / "pg" / "password").read_text().strip()
        r2 = db_sh("start")
        assert r2.returncode == 0 and "already running" in r2.stdout, r2.stdout + r2.stderr
        assert (db_home / "db_url").read_text().strip() == url
        # PostgreSQL listens on loopback only
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{pg_port}"], capture_output=True, text=True).stdout \
            if shutil.which("ss") else ""
        if listening.strip():
            assert all("127.0.0.1:" in ln for ln in listening.strip().splitlines()), listening

        # 2) the cluster's Prefect server script, on that URL (it says which database, password masked)
        started_server = True
        r = server_sh("start")
        assert r.returncode == 0, r.stdout + r.stderr + (server_home / "server.log").read_text()[-3000:]
        assert f"database: PostgreSQL postgresql+asyncpg://prefect:***@127.0.0.1:{pg_port}/prefect" in r.stdout
        assert password not in r.stdout + r.stderr
        t_up = time.monotonic() - t0

        # 3) a flow run (two task runs) against it, as a client process
        flow_name = f"rca-postgres-probe-{uuid.uuid4().hex[:8]}"
        r = subprocess.run([sys.executable, "-c", FLOW, flow_name], env=clean_env(PREFECT_API_URL=api), cwd=tmp,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "flow done" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]

        # 4) the rows are in PostgreSQL, and no SQLite database exists anywhere the server could have used
        rows = pg_rows(url, flow_name)
        assert len(rows) == 1 and rows[0]["state_type"] == "COMPLETED" and rows[0]["tasks"] == 2, rows
        sqlite = [p for p in tmp.rglob("*") if p.suffix in (".db", ".db-wal", ".db-journal", ".sqlite")]
        assert not sqlite, sqlite
        r = server_sh("stop")
        started_server = False
        assert r.returncode == 0, r.stdout + r.stderr

        # 5) the KubeRay container's command: `run` in the foreground, the URL from the environment (as the Secret
        # gives it); the same database, so the same flow run, through the API this time
        run_port = free_port()
        run_env = clean_env(PREFECT_HOME=str(tmp / "run-home"), PREFECT_PORT=str(run_port),
                            PREFECT_BIN=str(VENV_BIN / "prefect"), PREFECT_API_DATABASE_CONNECTION_URL=url)
        run_proc = subprocess.Popen(["bash", str(SERVER_SH), "run"], env=run_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            from flows.prefect_server import wait_healthy

            wait_healthy(f"http://127.0.0.1:{run_port}/api", timeout=90, proc=run_proc)
            runs = httpx.post(f"http://127.0.0.1:{run_port}/api/flow_runs/filter", timeout=30,
                              json={"flows": {"name": {"any_": [flow_name]}}}).json()
            assert [fr["state"]["type"] for fr in runs] == ["COMPLETED"], runs
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run_proc.pid, signal.SIGTERM)  # `run` exec's the server: this is its process
            out = run_proc.communicate(timeout=60)[0]
        assert (f"database: PostgreSQL postgresql+asyncpg://prefect:***@127.0.0.1:{pg_port}/prefect "
                "(from PREFECT_API_DATABASE_CONNECTION_URL)") in out, out[-3000:]
        assert password not in out
        print(f"[postgres test] PostgreSQL + Prefect server up in {t_up:.1f} s; whole test "
              f"{time.monotonic() - t0:.1f} s")
    finally:
        if started_server:
            server_sh("stop")
        stop = db_sh("stop")
        shutil.rmtree(tmp, ignore_errors=True)
    assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
    for port in (api_port, pg_port):  # both gone
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"


# ------------------------------------------------------------------------------------ the choice of database
def server_db(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SERVER_SH), "db"], env=clean_env(PREFECT_HOME=str(tmp_path / "home"), **env),
                          capture_output=True, text=True, timeout=30)


def test_server_script_uses_sqlite_only_without_a_url(tmp_path):
    r = server_db(tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"database: SQLite {tmp_path / 'home'}/prefect.db (no PREFECT_API_DATABASE_CONNECTION_URL" in r.stdout


def test_server_script_takes_the_url_from_the_environment(tmp_path):
    r = server_db(tmp_path, PREFECT_API_DATABASE_CONNECTION_URL="postgres://prefect:s3cr%40t@db.internal:6543/prefect")
    assert r.returncode == 0, r.stderr
    # the async driver added, the password masked
    assert ("database: PostgreSQL postgresql+asyncpg://prefect:***@db.internal:6543/prefect "
            "(from PREFECT_API_DATABASE_CONNECTION_URL)") in r.stdout
    assert "s3cr" not in r.stdout + r.stderr


def test_server_script_takes_the_url_from_a_file(tmp_path):
    f = tmp_path / "db_url"
    f.write_text("# the head's database\npostgresql+asyncpg://prefect:pw@127.0.0.1:5432/prefect\n")
    r = server_db(tmp_path, PREFECT_DB_URL_FILE=str(f))
    assert r.returncode == 0, r.stderr
    assert f"database: PostgreSQL postgresql+asyncpg://prefect:***@127.0.0.1:5432/prefect (from {f})" in r.stdout
    # the default file: $PREFECT_HOME/db_url (what deploy/prefect-db.sh writes)
    (tmp_path / "home").mkdir()
    shutil.copy(f, tmp_path / "home" / "db_url")
    r = server_db(tmp_path)
    assert f"(from {tmp_path / 'home' / 'db_url'})" in r.stdout and "PostgreSQL" in r.stdout
    # the environment wins over the file
    r = server_db(tmp_path, PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://a:b@other:5432/x")
    assert "@other:5432/x (from PREFECT_API_DATABASE_CONNECTION_URL)" in r.stdout


def test_server_script_refuses_what_it_cannot_use(tmp_path):
    r = server_db(tmp_path, PREFECT_DB_URL_FILE=str(tmp_path / "missing"))
    assert r.returncode == 1 and "no such file" in r.stderr
    r = server_db(tmp_path, PREFECT_API_DATABASE_CONNECTION_URL="mysql://u:pw@h/db")
    assert r.returncode == 1 and "unsupported database URL mysql://u:***@h/db" in r.stderr
    # `run` (the KubeRay container's command) listens beyond loopback only with basic auth configured
    r = subprocess.run(["bash", str(SERVER_SH), "run"], capture_output=True, text=True, timeout=30,
                       env=clean_env(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_HOST="0.0.0.0",
                                     PREFECT_BIN="/bin/false"))
    assert r.returncode == 1 and "without PREFECT_SERVER_API_AUTH_STRING" in r.stderr
    # a database that does not answer: a bounded wait, then a clear failure (the server is never started)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    t = time.monotonic()
    env = clean_env(PREFECT_HOME=str(tmp_path / "home"), PREFECT_BIN="/bin/false", PREFECT_DB_WAIT_S="2",
                    PREFECT_API_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://u:pw@127.0.0.1:{closed}/d")
    r = subprocess.run(["bash", str(SERVER_SH), "run"], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 1 and f"127.0.0.1:{closed} did not accept connections within 2 s" in r.stderr, r.stderr
    assert time.monotonic() - t < 15


def test_db_script_copies_a_managed_url_and_starts_nothing(tmp_path):
    managed = tmp_path / "prefect_db_url"
    managed.write_text("postgresql+asyncpg://rca:pw@mydb.abc.us-west-2.rds.amazonaws.com:5432/prefect\n")
    env = clean_env(HOME=str(tmp_path), PREFECT_HOME=str(tmp_path / "home"), PREFECT_DB_MANAGED_URL_FILE=str(managed),
                    PREFECT_PG_DATA=str(tmp_path / "pg" / "data"))
    for cmd in ("install", "start"):
        r = subprocess.run(["bash", str(DB_SH), cmd], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert "managed database" in r.stdout and ":pw@" not in r.stdout
    assert (tmp_path / "home" / "db_url").read_text() == managed.read_text()
    assert not (tmp_path / "pg").exists()
