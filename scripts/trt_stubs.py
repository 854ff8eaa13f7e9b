"""Put the TensorRT type stubs where mypy reads them (``typings/``, git-ignored).

``tensorrt-stubs`` (10.13, pybind11-stubgen output; installed with ``--no-deps``) ships ``tensorrt/`` and
``tensorrt_bindings/`` as bare .pyi folders without ``py.typed``, which mypy ignores in site-packages;
through ``mypy_path`` they are used, so the TensorRT backend is checked against the real API surface.
A few signatures name a parameter ``in``, which is not valid Python; those are renamed on the way.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path


def _split_top_level(params: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in params:
        depth += ch in "[("
        depth -= ch in "])"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


def _fix_defaults(line: str) -> str:
    """A parameter without a default after one with a default is a syntax error: give it ``= ...``."""
    m = re.match(r"(\s*def \w+\()(.*)(\) -> .*)$", line)
    if not m or "=" not in m.group(2):
        return line
    seen_default, fixed = False, []
    for part in _split_top_level(m.group(2)):
        if "=" in part:
            seen_default = True
        elif seen_default and ":" in part and not part.strip().startswith("*"):
            part = f"{part} = ..."
        fixed.append(part)
    return m.group(1) + ",".join(fixed) + m.group(3)


def main() -> int:
    try:
        dist = metadata.distribution("tensorrt-stubs")
    except metadata.PackageNotFoundError:
        print("tensorrt-stubs is not installed: pip install --no-deps 'tensorrt-stubs==10.13.*'", file=sys.stderr)
        return 1
    out = Path(__file__).resolve().parent.parent / "typings"
    copied = 0
    for f in dist.files or []:
        if f.suffix == ".pyi" and f.parts[0] in {"tensorrt", "tensorrt_bindings"}:
            dst = out / Path(*f.parts)
            dst.parent.mkdir(parents=True, exist_ok=True)
            text = Path(str(f.locate())).read_text()
            # pybind11-stubgen kept C++ parameter names that are Python keywords (``in``): not valid syntax
            text = re.sub(r"(def \w+\([^)]*?)\bin: ", r"\1in_: ", text)
            text = "\n".join(_fix_defaults(line) for line in text.splitlines())
            dst.write_text(text)
            copied += 1
    print(f"tensorrt-stubs {dist.version}: {copied} stub files in {out}")
    return 0 if copied else 1


if __name__ == "__main__":
    sys.exit(main())
