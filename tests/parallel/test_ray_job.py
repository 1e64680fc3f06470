"""`ray job submit` against a head node this test starts (`ray start --head --block`) and stops by PID."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from compressor.execution.local_cluster import free_ports

ROOT = Path(__file__).resolve().parents[2]

RAY = Path(sys.executable).parent / "ray"




def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to `ray start` lets it drain and stop its children (~3 s); then the group, then SIGKILL."""
    for sig, grace in ((None, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if sig is None:
            proc.terminate()
        else:
            try:
                os.killpg(proc.pid, sig)  # the head was started in its own session: pgid == pid
            except ProcessLookupError:
                return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue
        try:  # ray start is gone; anything left in its group goes too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


@pytest.fixture
def ray_head():
    """A private head node: every port chosen free, its own temp dir (so nobody's `ray.init()` finds it)."""
    gcs, dashboard, *others = free_ports(9)
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's unix socket paths must fit 107 chars
    log_path = Path(temp_dir) / "head.log"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{RAY.parent}:{os.environ.get('PATH', '')}"}
    cmd = [str(RAY), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--num-cpus=2",
           "--object-store-memory=500000000", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           *[f"--{name}={port}" for name, port in zip(names, others)]]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the dashboard at {url} did not come up:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
        yield {"dashboard": url, "env": env}
    finally:
        _stop(proc)
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def launch_args(tiny_llama_dir: Path, wikitext_dir: Path, output: Path) -> list[str]:
    """The tiny TP=2 recipe, shortened; absolute paths, since a job runs in a copy of its working dir."""
    sets = [f"model.source={tiny_llama_dir}", f"train.data.source={wikitext_dir / 'wiki.valid.tokens'}",
            "train.steps=2", "train.seq_len=64", "train.micro_batch_size=2", "train.log_every=1",
            "train.checkpoint_every=2", "evaluation.enabled=false"]
    return ["configs/distributed/tiny_tp2.yaml", "--output", str(output), *[a for s in sets for a in ("--set", s)]]


@pytest.mark.ray
@pytest.mark.distributed
def test_ray_job_submit_runs_compressor_launch(ray_head, tiny_llama_dir, wikitext_dir, tmp_path):
    output = tmp_path / "run"
    job = subprocess.run(
        [str(RAY), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", str(ROOT), "--",
         "python", "-m", "compressor.launch", *launch_args(tiny_llama_dir, wikitext_dir, output)],
        env=ray_head["env"], capture_output=True, text=True, timeout=300,
    )
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-4000:]
    assert "succeeded" in log and "maskllm 2:4 on 2 ranks (TP=2 PP=1 DP=1)" in log
    report = json.loads((output / "report.json").read_text())
    assert report["parallel"]["world_size"] == 2 and len(report["history"]["logs"]) == 2


@pytest.mark.ray
@pytest.mark.distributed
def test_train_sh_starts_a_head_runs_and_stops_it(tiny_llama_dir, wikitext_dir, tmp_path):
    output = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(
        ["bash", str(ROOT / "launch" / "train.sh"), *launch_args(tiny_llama_dir, wikitext_dir, output)],
        cwd=ROOT, env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "starting a head node" in log and "maskllm 2:4 on 2 ranks" in log
    assert (output / "report.json").is_file()
    pid = int(re.search(r"head node up \(pid (\d+)\)", log).group(1))
    assert f"stopping the head node this script started (pid {pid})" in log
    deadline = time.monotonic() + 15
    while _group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = subprocess.run(["ps", "-o", "pid,stat,cmd", "-g", str(pid)], capture_output=True, text=True).stdout
    assert not _group_alive(pid), f"processes of the head's group are left:\n{left}"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
