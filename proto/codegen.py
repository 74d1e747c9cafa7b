"""Generate the Python stubs for proto/sparsat/v1/*.proto (one script, used by `make proto`).

Run from anywhere: `python -m sparsat.proto.codegen` or `python proto/codegen.py [--out DIR]`.
The stubs land beside the .proto files, importable as `sparsat.proto.sparsat.v1.sparsat_pb2`;
`--out` writes them under another root instead (the drift test compares the two).

protoc runs with `-I proto`, so the file is registered (descriptor pool, server reflection)
under its package path `sparsat/v1/sparsat.proto`, as clients in other languages name it;
the generated modules' references to `sparsat.v1` are then rewritten to
`sparsat.proto.sparsat.v1`, the package the stubs are imported as.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"  # the include root: files are named sparsat/v1/...
PROTO_DIR = PROTO_ROOT / "sparsat" / "v1"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_root: Path = REPO_ROOT) -> list[Path]:
    """Run protoc on every .proto file; returns the generated files."""
    import importlib.resources

    from grpc_tools import protoc  # imported here: only codegen needs grpcio-tools

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    out = out_root / "proto"
    out.mkdir(parents=True, exist_ok=True)
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    generated = sorted((out / "sparsat" / "v1").glob("*_pb2*.py*"))
    for path in generated:
        path.write_text(_fix_imports(path.read_text()))
    return generated


def _fix_imports(text: str) -> str:
    """Generated code names its modules after the proto path (`sparsat.v1.sparsat_pb2`);
    here they live in the `sparsat.proto` package."""
    text = re.sub(r"^from sparsat\.v1 import ", "from sparsat.proto.sparsat.v1 import ", text,
                  flags=re.MULTILINE)
    text = re.sub(r"^import sparsat\.v1\.", "import sparsat.proto.sparsat.v1.", text,
                  flags=re.MULTILINE)
    text = text.replace("'sparsat.v1.sparsat_pb2'", "'sparsat.proto.sparsat.v1.sparsat_pb2'")
    return text.replace(
        "code in sparsat/v1/", "code in proto/sparsat/v1/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="root to write proto/... under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
