"""The HAProxy launcher Ray Serve is pointed at: Ray's arguments pass through, its config gains our lines once.
The script's own tests fake the HAProxy binary (a script that reports what it was given); the logging test
runs the real binary in front of a small HTTP server; the cluster test
``test_resilience.py::test_kill_one_of_two_ingress_replicas_under_load`` runs it through Ray."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serve_app.config import RayServeRuntime
from serve_app.deployments.haproxy_launcher import BUFFER_OPTION, QUIET_OPTION, haproxy_binary, install_launcher
from serve_app.deployments.ray_runtime import ray_env

RAY_LIKE_CONFIG = """global
    maxconn 1000
defaults
    mode http
    retry-on conn-failure empty-response
frontend http_frontend
    bind 127.0.0.1:8000
"""
BOTH = (BUFFER_OPTION, QUIET_OPTION)


def _fake_haproxy(tmp_path: Path) -> Path:
    fake = tmp_path / "bin dir" / "haproxy"  # a space in the path: the launcher quotes it
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    return fake


def test_the_launcher_adds_its_lines_to_the_defaults_once_and_passes_every_argument(tmp_path: Path) -> None:
    launcher = install_launcher(str(_fake_haproxy(tmp_path)), BOTH, tmp_path / "launchers")
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_LIKE_CONFIG)
    args = ["-db", "-f", str(config), "-dR", "-sf", "123", "456"]

    for _ in range(2):  # a reload runs it again on the same file: still one line each
        out = subprocess.run([launcher, *args], capture_output=True, text=True, check=True)
        assert out.stdout.splitlines() == args
        lines = config.read_text().splitlines()
        assert all(lines.count(f"    {option}") == 1 for option in BOTH)
        after_defaults = lines[lines.index("defaults") + 1 : lines.index("defaults") + 3]
        assert sorted(after_defaults) == sorted(f"    {option}" for option in BOTH)
        assert [x for x in lines if x.strip() not in BOTH] == RAY_LIKE_CONFIG.splitlines()
    assert [p.name for p in (tmp_path / "launchers").iterdir()] == [launcher.name]  # no temporary file left


def test_one_launcher_per_binary_and_lines_rewritten_only_when_it_changed(tmp_path: Path) -> None:
    first = install_launcher("/opt/a/haproxy", BOTH, tmp_path)
    other = install_launcher("/opt/b/haproxy", BOTH, tmp_path)
    buffer_only = install_launcher("/opt/a/haproxy", (BUFFER_OPTION,), tmp_path)
    assert len({first, other, buffer_only}) == 3 and os.access(first, os.X_OK)
    assert QUIET_OPTION not in buffer_only.read_text()
    inode = first.stat().st_ino
    assert install_launcher("/opt/a/haproxy", BOTH, tmp_path) == first and first.stat().st_ino == inode
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # as another user's directory in /tmp could be
    with pytest.raises(PermissionError, match="writable by no one else"):
        install_launcher("/opt/a/haproxy", BOTH, shared)
    with pytest.raises(ValueError, match="not an HAProxy option"):
        install_launcher("/opt/a/haproxy", ("option x'; rm -rf /",), tmp_path)


def test_ray_gets_the_launcher_for_the_lines_its_settings_need() -> None:
    binary = haproxy_binary()
    default = ray_env(RayServeRuntime(haproxy="on"))
    assert default["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "0"  # no line per request for Ray's metrics
    logged = ray_env(RayServeRuntime(haproxy="on", haproxy_request_log=True))
    assert "RAY_SERVE_HAPROXY_METRICS_ENABLED" not in logged  # Ray's default: on
    plain = ray_env(RayServeRuntime(haproxy="on", resend_lost_requests=False, haproxy_request_log=True))
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in plain and "RAY_SERVE_HAPROXY_RETRY_ON" not in plain
    assert ray_env(RayServeRuntime(haproxy="off")) == {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "0"
    }  # fmt: skip
    if binary is None:  # no haproxy on this machine: Ray is left to say so
        assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in default
        return
    for env, lines in ((default, BOTH), (logged, (BUFFER_OPTION,))):
        script = Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"]).read_text()
        assert f"exec {binary} " in script
        assert [option for option in BOTH if f'print "    {option}"' in script] == list(lines)
    quiet = ray_env(RayServeRuntime(haproxy="on", resend_lost_requests=False))
    assert BUFFER_OPTION not in Path(quiet["RAY_SERVE_HAPROXY_BINARY_PATH"]).read_text()


# -- the real HAProxy ---------------------------------------------------------------------------------------


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def upstream() -> Iterator[int]:
    """An HTTP server that answers 200 on /ok and 500 on anything else."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/ok" else 500)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()


@pytest.mark.skipif(haproxy_binary() is None, reason="no haproxy binary (ray[serve] ships one on Linux)")
@pytest.mark.parametrize("request_log", [False, True])
def test_haproxy_logs_only_the_requests_that_went_wrong_unless_asked(
    tmp_path: Path, upstream: int, request_log: bool
) -> None:
    """Ray's template (``log <target> local0 info`` + ``option httplog``) through the launcher, for real: with
    ``haproxy_request_log`` off, a 200 leaves no syslog line and a 500 still does."""
    runtime = RayServeRuntime(haproxy="on", haproxy_request_log=request_log)
    launcher = Path(ray_env(runtime)["RAY_SERVE_HAPROXY_BINARY_PATH"])
    syslog = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    syslog.bind(("127.0.0.1", 0))
    syslog.settimeout(0.2)
    front = _free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"global\n    log 127.0.0.1:{syslog.getsockname()[1]} local0 info\n    maxconn 100\n"
        "defaults\n    mode http\n    log global\n    option httplog\n"
        "    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"
        f"frontend http_frontend\n    bind 127.0.0.1:{front}\n    default_backend app\n"
        f"backend app\n    server s1 127.0.0.1:{upstream}\n"
    )
    proc = subprocess.Popen([launcher, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{front}/ok").status_code == 200
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
                assert time.monotonic() < deadline, "HAProxy did not start"
                time.sleep(0.05)
        assert httpx.get(f"http://127.0.0.1:{front}/fail").status_code == 500
        lines: list[str] = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and len(lines) < 2:
            try:
                lines.append(syslog.recv(8192).decode(errors="replace"))
            except TimeoutError:
                pass
    finally:
        proc.terminate()
        proc.wait(10)
        syslog.close()
    requests = [line for line in lines if "GET /" in line]
    assert any("GET /fail" in line for line in requests), lines
    assert any("GET /ok" in line for line in requests) == request_log, lines
