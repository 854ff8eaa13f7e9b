"""The HAProxy launcher Ray Serve is pointed at: Ray's arguments pass through, its config gains whole-request
buffering once. The HAProxy binary is faked (a script that reports what it was given); the cluster test
``test_resilience.py::test_kill_one_of_two_ingress_replicas_under_load`` runs the real one through Ray."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from serve_app.config import RayServeRuntime
from serve_app.deployments.haproxy_launcher import BUFFER_OPTION, haproxy_binary, install_launcher
from serve_app.deployments.ray_runtime import ray_env

RAY_LIKE_CONFIG = """global
    maxconn 1000
defaults
    mode http
    retry-on conn-failure empty-response
frontend http_frontend
    bind 127.0.0.1:8000
"""


def _fake_haproxy(tmp_path: Path) -> Path:
    fake = tmp_path / "bin dir" / "haproxy"  # a space in the path: the launcher quotes it
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    return fake


def test_the_launcher_adds_request_buffering_to_the_defaults_once_and_passes_every_argument(tmp_path: Path) -> None:
    launcher = install_launcher(str(_fake_haproxy(tmp_path)), tmp_path / "launchers")
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_LIKE_CONFIG)
    args = ["-db", "-f", str(config), "-dR", "-sf", "123", "456"]

    for _ in range(2):  # a reload runs it again on the same file: still one line
        out = subprocess.run([launcher, *args], capture_output=True, text=True, check=True)
        assert out.stdout.splitlines() == args
        lines = config.read_text().splitlines()
        assert lines.count(f"    {BUFFER_OPTION}") == 1
        assert lines[lines.index("defaults") + 1] == f"    {BUFFER_OPTION}"
        assert [x for x in lines if BUFFER_OPTION not in x] == RAY_LIKE_CONFIG.splitlines()
    assert [p.name for p in (tmp_path / "launchers").iterdir()] == [launcher.name]  # no temporary file left


def test_one_launcher_per_binary_rewritten_only_when_it_changed(tmp_path: Path) -> None:
    first = install_launcher("/opt/a/haproxy", tmp_path)
    other = install_launcher("/opt/b/haproxy", tmp_path)
    assert first != other and os.access(first, os.X_OK)
    inode = first.stat().st_ino
    assert install_launcher("/opt/a/haproxy", tmp_path) == first and first.stat().st_ino == inode
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # as another user's directory in /tmp could be
    with pytest.raises(PermissionError, match="writable by no one else"):
        install_launcher("/opt/a/haproxy", shared)


def test_ray_is_pointed_at_the_launcher_only_when_lost_requests_are_resent() -> None:
    binary = haproxy_binary()
    resend = ray_env(RayServeRuntime(haproxy="on"))
    plain = ray_env(RayServeRuntime(haproxy="on", resend_lost_requests=False))
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in plain
    if binary is None:  # no haproxy on this machine: Ray is left to say so
        assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in resend
        return
    launcher = Path(resend["RAY_SERVE_HAPROXY_BINARY_PATH"])
    assert os.access(launcher, os.X_OK) and f"exec {binary} " in launcher.read_text()
