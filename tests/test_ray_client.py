"""Issue 19: `[distributed] address = "ray://host:port"`, a cluster this process only reaches as a Ray client: a
head node started apart (`ray start --head`, its own ports and temp dir), `wb search` run as a user runs it
(another process, the cluster's token in its environment's default place), and the serial run's results."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from test_ray import _config, _same_results, serial_run  # noqa: E402,F401 - the serial run to compare with
from test_task_search import project  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A one-node cluster in its own processes (`ray start --block`), stopped at the end by its process group
    (`ray stop` would stop every cluster of this machine)."""
    pytest.importorskip("grpc")  # the ray[client] extra (CI installs it): without it no client can connect
    gcs, client, agent = _free_port(), _free_port(), _free_port()
    tmp = Path("/tmp") / f"wbray-{os.getpid()}"  # Ray's socket paths must stay short
    tmp.mkdir(parents=True, exist_ok=True)
    # the head's client server waits 30 s (Ray's default) for the per-client server it starts; on 2 busy cores that
    # start took longer once in four runs ("Starting Ray client server failed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "180"}
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             f"--port={gcs}", f"--ray-client-server-port={client}", "--num-cpus=2",
                             f"--dashboard-agent-listen-port={agent}", "--include-dashboard=false",
                             "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={tmp}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120  # the client server listens once the head is up (slow on 2 busy cores)
    while True:
        try:
            socket.create_connection(("127.0.0.1", client), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.close()
                pytest.fail(f"the Ray head did not start: {(tmp / 'head.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield {"port": client, "dir": tmp}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _head_log(head: dict) -> str:
    """The head's output and its client server's logs (what says why a client was refused)."""
    files = [head["dir"] / "head.log"] + sorted(head["dir"].glob("session_latest/logs/ray_client_server*"))
    return "".join(f"\n--- {f.name}:\n{f.read_text(errors='replace')[-1500:]}" for f in files if f.is_file())


def test_search_through_a_ray_client_address_gives_the_serial_result(project, head, serial_run):  # noqa: F811
    cfg = _config(project, "client.toml", "ray")
    cfg.write_text(cfg.read_text().replace('address = "auto"', f'address = "ray://127.0.0.1:{head["port"]}"'))
    runs = project / "runs-client"
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "workbench.cli", "search", "--config", "client.toml", "--runs-root", "runs-client",
           "--run-dir", "runs-client/r"]  # relative paths: the workers run elsewhere and must get absolute ones
    res = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:] + _head_log(head)
    run = json.loads((runs / "r" / "run.json").read_text())
    _same_results(serial_run, run)
    assert run["config"]["distributed"]["address"].startswith("ray://")
    assert (runs / "r" / "ray" / "session.txt").read_text().strip() == "remote cluster"
    assert "FP32" in res.stdout and "not run" not in res.stdout.split("FP32", 1)[1].splitlines()[0]
