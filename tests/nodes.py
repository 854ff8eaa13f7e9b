"""A Ray cluster of separate ``ray start`` nodes on this machine: the closest stand-in for ``ray up cluster.yaml``.

Each node is its own ``ray start --block`` in a process group of its own, so stopping a node is a SIGKILL of
that group: its raylet, agents and every worker (replicas included) die at once, as when a machine is lost.
Every port is fixed away from Ray's defaults, so this cluster runs beside the test session's own Ray.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from polling import wait_until

RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class Node:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class LocalNodes:
    def __init__(
        self, root: Path, env: dict[str, str], base_port: int = 6400, serve_ports: tuple[int, ...] = ()
    ) -> None:
        self.root = root
        self.serve_ports = serve_ports  # HAProxy's ports on this cluster (HTTP, metrics, stats)
        # Ray's token authentication (on by default), with a token of this cluster's own: every node, the serve
        # CLI and the dashboard calls below read it from the file RAY_AUTH_TOKEN_PATH names
        self.token = secrets.token_hex(32)
        (root / "auth_token").write_text(self.token)
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(root / "auth_token")}
        self.env = {**os.environ, **env, **auth}
        self.base = base_port
        self.gcs = f"127.0.0.1:{base_port}"
        self.dashboard = f"http://127.0.0.1:{base_port + 1}"
        self.nodes: list[Node] = []

    def _ports(self, i: int) -> list[str]:
        """Node ``i``'s ports: ten from ``base + 10 * (i + 1)``; its workers' from 21000 + 100 * i."""
        p = self.base + 10 * (i + 1)
        return [
            f"--node-manager-port={p}",
            f"--object-manager-port={p + 1}",
            f"--dashboard-agent-listen-port={p + 2}",
            f"--dashboard-agent-grpc-port={p + 3}",
            f"--runtime-env-agent-port={p + 4}",
            f"--metrics-export-port={p + 5}",
            f"--min-worker-port={21000 + 100 * i}",
            f"--max-worker-port={21099 + 100 * i}",
        ]

    def _start(self, name: str, args: list[str]) -> Node:
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", *self._ports(len(self.nodes)), *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a process group of its own: killed together
            )
        node = Node(name, process, log)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: float) -> Node:
        head = self._start(
            "head",
            [
                "--head",
                f"--port={self.base}",
                f"--dashboard-port={self.base + 1}",
                "--dashboard-host=127.0.0.1",
                f"--ray-client-server-port={self.base + 2}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                f"--temp-dir={self.root / 'ray'}",
            ],
        )
        wait_until(self._dashboard_up, 120, "the head node's dashboard")
        return head

    def add_worker(self, name: str, num_cpus: float, num_gpus: float) -> Node:
        before = len(self.alive_nodes())
        worker = self._start(name, [f"--address={self.gcs}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}"])
        wait_until(lambda: len(self.alive_nodes()) > before, 120, f"node {name} joining")
        return worker

    def kill(self, node: Node) -> None:
        """The machine is gone: every process of the node dies at once, its group and any descendant that
        left the group."""
        tree = _descendants(node.process.pid)
        try:
            os.killpg(node.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in tree:
            _sigkill(pid)
        node.process.wait(30)

    def stop_all(self) -> None:
        for node in reversed(self.nodes):
            if node.alive:
                self.kill(node)
        # an HAProxy that outlived its node keeps this cluster's ports, and the next run cannot bind them
        # (CI: a run after one that had left one failed with "Address already in use")
        for pid in _haproxies_on(self.serve_ports):
            _sigkill(pid)

    def _get(self, path: str, **params: Any) -> httpx.Response:
        """GET on the head's dashboard, with the cluster's token."""
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.get(f"{self.dashboard}{path}", params=params, headers=headers, timeout=10)

    def _dashboard_up(self) -> bool:
        try:
            return self._get("/api/version").status_code == 200
        except httpx.HTTPError:
            return False

    def alive_nodes(self) -> list[dict[str, Any]]:
        """The cluster's live nodes, by Ray's state API."""
        try:
            r = self._get("/api/v0/nodes", limit=100)
        except httpx.HTTPError:
            return []
        if r.status_code != 200:
            return []
        return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def replicas(self, app: str) -> dict[str, list[dict[str, Any]]]:
        """Deployment name -> its replicas (``state``, ``node_id``), by Serve's REST API on the dashboard."""
        r = self._get("/api/serve/applications/")
        r.raise_for_status()
        deployments = r.json()["applications"].get(app, {}).get("deployments", {})
        return {name: d["replicas"] for name, d in deployments.items()}

    def serve(self, *args: str) -> str:
        """Run the ``serve`` CLI against this cluster."""
        serve = str(Path(sys.executable).with_name("serve"))
        out = subprocess.run(
            [serve, *args, "-a", self.dashboard], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout


def _processes() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, argv) of every process this user can see (Linux /proc)."""
    out: dict[int, tuple[int, list[str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        out[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), [a.decode(errors="replace") for a in argv if a])
    return out


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, (parent, _) in _processes().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _haproxies_on(ports: tuple[int, ...]) -> list[int]:
    """HAProxy processes whose config binds one of ``ports``."""
    found = []
    for pid, (_, argv) in _processes().items():
        if not argv or not argv[0].endswith("haproxy") or "-f" not in argv[:-1]:
            continue
        try:
            config = Path(argv[argv.index("-f") + 1]).read_text()
        except OSError:
            continue
        if any(f":{port}" in config for port in ports):
            found.append(pid)
    return found


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
