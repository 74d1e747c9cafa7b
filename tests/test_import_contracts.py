"""The import contracts in pyproject.toml (import-linter; `make test` runs `lint-imports`):
kept by this tree, and broken by each kind of import they forbid, so none of them is a
contract that cannot fail. Each case runs lint-imports on a copy of the sources with one
import added."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = {c["id"]: c["name"] for c in
             tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
             ["contracts"]}
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
TYPE_CHECKING_ONLY = "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    {}\n"


def _lint(tmp_path: Path, module: str | None = None, line: str = "") -> dict[str, str]:
    """lint-imports on a copy of the tree named `sparsat` with `line` appended to `module`
    (a path under the root): each contract id -> KEPT or BROKEN."""
    copy = tmp_path / "sparsat"
    shutil.copytree(ROOT, copy, ignore=lambda d, names: [  # the sources and pyproject.toml
        n for n in names if n.startswith(".") or n.endswith((".pt", ".pyc")) or n == "__pycache__"
        or (Path(d) / n / "pyvenv.cfg").exists()  # a virtual environment (VENV=venv make test)
        or Path(d) == ROOT and n in ("runs", "tests", "scenarios", "docs", "sweeps", "build")])
    if module:
        with open(copy / module, "a") as f:
            f.write("\n" + line + "\n")
    run = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=copy, capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path), "NO_COLOR": "1"})
    status = {}
    for cid, name in CONTRACTS.items():
        found = re.search(rf"^{re.escape(name)} (KEPT|BROKEN)", run.stdout, re.M)
        assert found, f"{name!r} not in the output:\n{run.stdout}{run.stderr}"
        status[cid] = found.group(1)
    assert (run.returncode == 0) == all(s == "KEPT" for s in status.values()), run.stdout
    return status


def _broken(status: dict[str, str]) -> set[str]:
    return {cid for cid, s in status.items() if s == "BROKEN"}


def test_this_tree_keeps_every_contract(tmp_path: Path) -> None:
    assert _broken(_lint(tmp_path)) == set()


@pytest.mark.parametrize(("module", "line", "broken"), [
    # the launcher's child running the CLI again: a cycle between sim's rooms, cli not on top
    ("sim/deploy/launcher.py", "from sparsat.sim import cli", {"sim-rooms", "acyclic"}),
    # a lower layer importing a higher one (which imports it: a cycle too)
    ("node/wire/codec.py", "import sparsat.ground_station.config", {"layers", "acyclic"}),
    ("proto/codegen.py", "import sparsat.node", {"layers", "acyclic"}),
    ("sim/space/links.py", "from sparsat.sim.mission import tally", {"sim-rooms", "acyclic"}),
    # independent siblings of one layer
    ("sim/sweeps/runner.py", "from sparsat.sim.mission import report", {"sim-rooms"}),
    ("node/data/masking.py", "from sparsat.node.models import mlp", {"node-rooms"}),
    # a cycle inside one room (hosts imports ground_client): only the acyclic contract sees it
    ("sim/mission/ground_client.py", "from sparsat.sim.mission import hosts", {"acyclic"}),
    # protobuf messages outside serde; the service stubs are fine
    ("ground_station/ingest.py", "from sparsat.proto.sparsat.v1 import sparsat_pb2",
     {"pb2-in-serde"}),
    ("ground_station/ingest.py", "from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc",
     set()),
    ("sim/mission/hosts.py", "import sparsat.proto.sparsat.v1.sparsat_pb2", {"pb2-in-serde"}),
    # imports for the type checker only are not imports
    ("sim/deploy/launcher.py", TYPE_CHECKING_ONLY.format("from sparsat.sim import cli"),
     set()),
])
def test_an_import_the_contracts_forbid_breaks_them(tmp_path: Path, module: str, line: str,
                                                    broken: set[str]) -> None:
    assert _broken(_lint(tmp_path, module, line)) == broken
