"""Build TensorRT engines for the configured models (same as ``python -m serve_app.engine build``)."""

import sys

from serve_app.engine.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
