"""A real two-node Ray cluster on the loopback addresses (127.0.0.2 head, 127.0.0.1 worker) for tests and benchmarks: a head node and one worker node, each its
own `ray start --block` process, every port chosen free, state in a private temp dir.

Teardown kills exactly the processes this cluster started (the two `ray start` process groups, and any process
whose command line names our private temp dir), never `ray stop`, which would stop every Ray on the machine,
another user's included.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).parent / "ray")
OBJECT_STORE_BYTES = 500_000_000
# Everything on the loopback range. Ray replaces the literal 127.0.0.1 (or localhost) with the machine's outward
# address, but not other loopback addresses: the head listens on 127.0.0.2, and the worker node and the driver,
# given that address, find their own address by routing to it: 127.0.0.1.
HEAD_IP = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_ports() -> list[str]:
    # Every listening port explicit and free: a second Ray on this machine (another user's) must not collide.
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]


class RayCluster:
    """`with RayCluster(head_cpus=1, worker_cpus=1) as cluster:` then `ray.init(address=cluster.address)`."""

    def __init__(self, head_cpus: int = 1, worker_cpus: int = 1, start_timeout_s: float = 90):
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.start_timeout_s = start_timeout_s
        # Short: Ray puts unix sockets under it, and a socket path has at most 107 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="saray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.processes: list[subprocess.Popen] = []
        # Token authentication with a token of our own, given to the nodes and to drivers (`driver_env`) in the
        # environment: explicit, so neither an open cluster nor a token file another run left in ~/.ray counts.
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}

    def _start_node(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.temp_dir / log_name, "wb")
        env = dict(os.environ, **self.env)
        proc = subprocess.Popen([RAY, "start", "--block", "--temp-dir",
                                 str(self.temp_dir), "--object-store-memory", str(OBJECT_STORE_BYTES),
                                 "--disable-usage-stats", *_node_ports(), *args],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.processes.append(proc)
        return proc

    def start(self) -> "RayCluster":
        try:
            self._start_node(["--head", "--node-ip-address", HEAD_IP, "--port", str(self.port),
                              "--num-cpus", str(self.head_cpus),
                              "--include-dashboard", "false", "--dashboard-port", str(free_port()),
                              "--ray-client-server-port", str(free_port())], "head.log")
            self._wait_started("head.log")
            self._start_node(["--address", self.address, "--num-cpus", str(self.worker_cpus)], "worker.log")
            self._wait_started("worker.log")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_started(self, log_name: str) -> None:
        """`ray start` prints this once its node is registered with the head (the worker's, once it joined)."""
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            for proc in self.processes:
                if proc.poll() is not None:
                    raise RuntimeError(f"ray start exited with {proc.returncode}; logs: {self.logs()}")
            if "Ray runtime started" in (self.temp_dir / log_name).read_text(errors="replace"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"{log_name}: the Ray node did not start in {self.start_timeout_s:.0f} s; "
                           f"logs: {self.logs()}")

    def owned_processes(self) -> list[psutil.Process]:
        """Every process started for this cluster: the `ray start` trees and anything naming our temp dir."""
        owned: dict[int, psutil.Process] = {}
        for proc in self.processes:
            try:
                root = psutil.Process(proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    owned[p.pid] = p
            except psutil.NoSuchProcess:
                pass
        marker = str(self.temp_dir)
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in p.info["cmdline"] or []):
                    owned[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        for p in owned.values():
            try:
                p.info = {"name": p.name(), "cmdline": p.cmdline()}
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                p.info = {"name": "", "cmdline": []}
        return list(owned.values())

    def worker_processes(self) -> list[psutil.Process]:
        """Ray worker processes (actors and tasks) of this cluster, by their process title `ray::<actor or task>`."""
        agents = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
        return [p for p in self.owned_processes() if p.info["name"].startswith("ray::") and p.info["name"] not in agents]

    def logs(self) -> str:
        return " | ".join((self.temp_dir / name).read_text(errors="replace")[-1500:]
                          for name in ("head.log", "worker.log") if (self.temp_dir / name).exists())

    def stop(self) -> None:
        # SIGTERM to everything we started (a clean exit releases shared memory), SIGKILL what is left after 5 s.
        owned = self.owned_processes()
        for p in owned:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(owned, timeout=5)
        for p in alive + self.owned_processes():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(self.owned_processes(), timeout=10)
        for proc in self.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def driver_env(self) -> dict[str, str]:
        """Variables a driver process needs in its environment (before it imports ray) to join this cluster."""
        return dict(self.env)

    def __enter__(self) -> "RayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
