"""The committed stubs must be exactly what proto/codegen.py generates from the .proto files."""

from pathlib import Path

import pytest

from sparsat.proto import codegen


def test_generated_stubs_match_proto_files(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    generated = codegen.generate(tmp_path)
    assert {p.name for p in generated} == {
        "sparsat_pb2.py", "sparsat_pb2.pyi", "sparsat_pb2_grpc.py"}
    for fresh in generated:
        committed = codegen.PROTO_DIR / fresh.name
        assert committed.exists(), f"{committed} missing: run `make proto`"
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.name} drifted from the .proto files: run `make proto` and commit")
