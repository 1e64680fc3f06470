"""A Ray cluster of several nodes on this machine: one raylet per node, for tests and for trying multi-node runs.

    python -m compressor.execution.local_cluster --node-cpus 2 1   # prints the address; Ctrl-C stops it

Node 0 is the head (``ray start --head --block``), the others join it (``ray start --address --block``).
Each node runs in its own session (process group) with its own temp dir and free ports, and carries a
custom resource ``sim_node_<i>: 1`` so work can be pinned to it. ``stop()`` / ``kill_node(i)`` signal
exactly the processes started here (never ``ray stop``, which stops every Ray cluster on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from compressor.errors import CompressorError
from compressor.utils.logging import get_logger, setup_logging

log = get_logger(__name__)

# Ports every node binds; their defaults are fixed numbers, which two nodes on one machine would share.
_NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
               "runtime-env-agent-port", "metrics-export-port")
# A killed node is declared dead after period x threshold (Ray's defaults: 3 s x 5, plus the timeouts).
_FAST_HEALTH_CHECK = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
                      "RAY_health_check_failure_threshold": "3"}


def node_resource(index: int) -> str:
    return f"sim_node_{index}"


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc): the raylet starts its workers in process groups of their own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError):
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _kill(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _stop_group(proc: subprocess.Popen, hard: bool = False) -> None:
    """SIGTERM lets `ray start --block` stop its children (a few seconds); then SIGKILL to its group and to
    whatever of its process tree is left (workers run in groups of their own)."""
    tree = _descendants(proc.pid)
    if hard:
        _kill([proc.pid, *tree])
    if proc.poll() is None and not hard:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # started with start_new_session: pgid == pid
    except ProcessLookupError:
        pass
    _kill(tree)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        log.warning("ray start (pid %d) did not exit after SIGKILL", proc.pid)


class LocalCluster:
    """``node_cpus[i]`` CPUs on node i (node 0 the head); use as a context manager or start() / stop()."""

    def __init__(self, node_cpus: Sequence[int] = (2, 1), object_store_mb: int = 100,
                 env: Optional[dict[str, str]] = None, start_timeout_s: float = 90.0) -> None:
        if not node_cpus:
            raise ValueError("node_cpus must name at least the head node")
        self.node_cpus = list(node_cpus)
        self.object_store_mb = object_store_mb
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", **_FAST_HEALTH_CHECK, **(env or {})}
        self.start_timeout_s = start_timeout_s
        self.procs: list[subprocess.Popen] = []
        self.node_ids: list[str] = []  # Ray node id of node i
        self.address = ""
        # Short: Ray's unix socket paths inside it must fit in 107 characters.
        self.root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))

    def __enter__(self) -> "LocalCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        ray_cli = Path(sys.executable).parent / "ray"
        gcs_port, client_port = free_ports(2)
        self.address = f"127.0.0.1:{gcs_port}"
        for i, cpus in enumerate(self.node_cpus):
            temp_dir = self.root / f"n{i}"
            temp_dir.mkdir()
            ports = free_ports(len(_NODE_PORTS))
            role = (["--head", f"--port={gcs_port}", "--include-dashboard=false",
                     f"--ray-client-server-port={client_port}"] if i == 0 else [f"--address={self.address}"])
            cmd = [str(ray_cli), "start", "--block", *role, "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
                   f"--object-store-memory={self.object_store_mb * 2**20}",
                   f"--resources={json.dumps({node_resource(i): 1})}", f"--temp-dir={temp_dir}",
                   "--disable-usage-stats",
                   *[f"--{name}={port}" for name, port in zip(_NODE_PORTS, ports)]]
            with open(temp_dir / "ray-start.log", "w") as out:
                self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                                   start_new_session=True))
            if i == 0:
                self._wait_for(1)  # the other nodes register with the head's GCS
        self.node_ids = self._wait_for(len(self.node_cpus))
        log.info("local cluster at %s: %d nodes, CPUs %s, pids %s, logs in %s", self.address, len(self.procs),
                 self.node_cpus, self.pids, self.root)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _wait_for(self, count: int) -> list[str]:
        """Poll the cluster (from a short-lived driver in a subprocess) until ``count`` nodes are alive."""
        probe = ("import json, ray, sys\nray.init(address=sys.argv[1], log_to_driver=False)\nprint(json.dumps("
                 "[{'id': n['NodeID'], 'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))")
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None:
                    raise CompressorError(f"ray start of node {i} exited with {proc.returncode}:\n"
                                          f"{self.log(i)[-2000:]}")
            run = subprocess.run([sys.executable, "-c", probe, self.address], env=self.env, capture_output=True,
                                 text=True, timeout=60)
            if run.returncode == 0:
                nodes = json.loads(run.stdout.strip().splitlines()[-1])
                by_index = {i: n["id"] for n in nodes for i in range(len(self.node_cpus))
                            if node_resource(i) in n["resources"]}
                if len(by_index) >= count:
                    return [by_index[i] for i in range(count)]
            if time.monotonic() > deadline:
                raise CompressorError(f"only part of the {count} node(s) came up within {self.start_timeout_s:g} s; "
                                      f"logs in {self.root}")
            time.sleep(1)

    def log(self, index: int) -> str:
        path = self.root / f"n{index}" / "ray-start.log"
        return path.read_text() if path.exists() else ""

    def kill_node(self, index: int) -> None:
        """SIGKILL node ``index``'s raylet, its workers and agents at once: a lost machine."""
        if index == 0:
            raise ValueError("node 0 is the head: killing it ends the cluster (use stop())")
        _stop_group(self.procs[index], hard=True)

    def stop(self) -> None:
        for proc in reversed(self.procs):  # workers first: the head stays to hear them leave
            _stop_group(proc)
        shutil.rmtree(self.root, ignore_errors=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compressor.execution.local_cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--node-cpus", type=int, nargs="+", default=[2, 1], help="CPUs of each node, the head first")
    p.add_argument("--object-store-mb", type=int, default=100)
    args = p.parse_args(argv)
    setup_logging("INFO")
    with LocalCluster(args.node_cpus, args.object_store_mb) as cluster:
        print(f"Ray cluster of {len(cluster.node_ids)} nodes at {cluster.address} (pids {cluster.pids}); e.g.\n"
              f"  compressor launch --config configs/distributed/tiny_tp2.yaml --output runs/x "
              f"--ray-address {cluster.address}\nCtrl-C stops it.", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the nodes on SIGTERM too
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
