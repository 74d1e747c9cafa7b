"""Generate the Python stubs for proto/sparsat/v1/*.proto (one script, used by `make proto`).

Run from anywhere: `python -m proto.codegen` or `python proto/codegen.py [--out DIR]`. The
stubs land beside the .proto files, importable as `proto.sparsat.v1.sparsat_pb2`; `--out`
writes them under another root instead (the drift test compares the two).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "proto" / "sparsat" / "v1"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_root: Path = REPO_ROOT) -> list[Path]:
    """Run protoc on every .proto file; returns the generated files."""
    import importlib.resources

    from grpc_tools import protoc  # imported here: only codegen needs grpcio-tools

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    out_root.mkdir(parents=True, exist_ok=True)
    files = [str(p.relative_to(REPO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_root / "proto" / "sparsat" / "v1").glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="root to write proto/... under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
