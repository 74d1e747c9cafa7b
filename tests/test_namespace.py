"""One import namespace, `sparsat`, and the guards against its traps: the bare folder names
are banned by ruff, never loaded by the suite (conftest), absent from the wheel; proto-plus's
`proto` imports beside sparsat.proto; mypy follows sparsat.* imports."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
import tomllib
import types
import zipfile
from pathlib import Path

import pytest
from namespace_guard import BARE, ROOT, bare_modules, check_session

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---- ruff: the bare names are banned in code -----------------------------------------------

BANNED_FORMS = [
    "import node.wire.rpc",
    "from node.wire import rpc",
    "from node import x",
    "import proto",
    "import proto.sparsat.v1.sparsat_pb2",
    "from proto.sparsat.v1 import sparsat_pb2",
    "import sim",
    "from sim.mission.control import MissionControl",
    "import ground_station.server",
    "from ground_station import serde",
    "from bench import parse_args",
    # protobuf messages through a module that re-exports them, not a serde module's function
    "from sparsat.proto.sparsat.v1.sparsat_pb2_grpc import sparsat__pb2",
    "from sparsat.node.wire.control import pb",
    "from sparsat.ground_station.serde import pb",
]
ALLOWED_FORMS = [
    "import sparsat.node.wire.rpc",
    "from sparsat.node.wire import rpc",
    "from sparsat import proto",
    "import sparsat.proto.sparsat.v1.sparsat_pb2",
    "import nodes",  # a name that only starts like a banned one
]


def test_ruff_reports_every_bare_import_form(tmp_path: Path) -> None:
    lines = BANNED_FORMS + ALLOWED_FORMS + ["", "", "def f() -> None:", "    import sim.cli"]
    source = tmp_path / "probe.py"
    source.write_text("\n".join(lines) + "\n")

    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--config",
         str(ROOT / "pyproject.toml"), "--output-format", "concise", str(source)],
        capture_output=True, text=True, cwd=tmp_path).stdout

    reported = {int(line.split(":")[1]) for line in out.splitlines() if " TID251 " in line}
    expected = set(range(1, len(BANNED_FORMS) + 1)) | {len(lines)}  # the last: in a function
    assert reported == expected, out


# ---- sys.modules after the suite ------------------------------------------------------------

def _module(name: str, file: Path | None = None, path: list[Path] | None = None) -> object:
    m = types.ModuleType(name)
    m.__file__ = str(file) if file else None
    if path is not None:
        m.__path__ = [str(p) for p in path]
    return m


def test_bare_modules_finds_this_repositorys_modules_under_a_bare_name() -> None:
    site = Path("/usr/lib/python3/site-packages")
    modules = {
        "node.wire.rpc": _module("node.wire.rpc", ROOT / "node/wire/rpc.py"),  # offender
        "proto": _module("proto", site / "proto/__init__.py"),  # proto-plus: fine
        "proto.message": _module("proto.message", site / "proto/message.py"),
        # proto-plus in a venv inside the checkout (make's .venv): fine too
        "proto.enums": _module("proto.enums",
                               ROOT / ".venv/lib/python3.11/site-packages/proto/enums.py"),
        "bench.malformed": _module("bench.malformed", ROOT / "bench/malformed.py"),  # offender
        "sim": _module("sim", None, path=[ROOT / "sim"]),  # as a namespace package: offender
        "sparsat.node.wire.rpc": _module("sparsat.node.wire.rpc", ROOT / "node/wire/rpc.py"),
        "nodes": _module("nodes", ROOT / "nodes.py"),  # not a bare name of ours
        "ground_station": _module("ground_station"),  # no file: not from this repository
        "os": os,
    }

    assert bare_modules(modules) == ["bench.malformed", "node.wire.rpc", "sim"]
    offenders = ("node.wire.rpc", "sim", "bench.malformed")
    assert bare_modules({k: v for k, v in modules.items() if k not in offenders}) == []
    assert bare_modules(dict(sys.modules)) == []  # this process, so far


def test_check_session_fails_a_passing_run_and_names_the_modules() -> None:
    class Session:
        exitstatus = pytest.ExitCode.OK
        config = types.SimpleNamespace(pluginmanager=types.SimpleNamespace(
            get_plugin=lambda name: None))

    bad, clean = Session(), Session()

    found = check_session(bad, {"proto.sparsat": _module("proto.sparsat",  # type: ignore[arg-type]
                                                         ROOT / "proto/sparsat/__init__.py")})
    check_session(clean, {"os": os})  # type: ignore[arg-type]

    assert found == ["proto.sparsat"]
    assert bad.exitstatus == pytest.ExitCode.TESTS_FAILED
    assert clean.exitstatus == pytest.ExitCode.OK


if os.environ.get("SPARSAT_BARE_PROBE"):  # only in the pytest the next test starts
    def test_probe_loads_a_bare_module() -> None:
        """It passes, and loads `node` bare (a string: ruff cannot see this one)."""
        import importlib

        sys.path.insert(0, str(ROOT))
        importlib.import_module("node")


def test_a_bare_module_fails_the_whole_run(tmp_path: Path) -> None:
    """conftest's pytest_sessionfinish turns a run whose tests all pass into a failure."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{Path(__file__)}::test_probe_loads_a_bare_module"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "SPARSAT_BARE_PROBE": "1"}, timeout=120)

    assert "1 passed" in run.stdout, run.stdout + run.stderr
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout
    assert "loaded under a bare name" in run.stdout and ": node" in run.stdout


# ---- proto-plus's `proto` beside sparsat.proto -------------------------------------------

def test_proto_plus_and_sparsat_proto_import_side_by_side(tmp_path: Path) -> None:
    code = ("import proto, sparsat.proto.sparsat.v1.sparsat_pb2 as pb, sparsat.proto; "
            "print(proto.__file__); print(pb.__file__); print(hasattr(proto, 'Message')); "
            "print(proto is sparsat.proto)")
    # -P and a foreign folder: neither the repository root nor tests/ is on sys.path
    run = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)

    assert run.returncode == 0, run.stderr  # proto-plus is in the dev extra: `make` installs it
    proto_file, pb_file, has_message, same = run.stdout.split()
    # not this repository's proto/ folder (the venv may live inside the checkout: .venv/)
    assert not Path(proto_file).resolve().is_relative_to(ROOT / "proto"), proto_file
    assert "site-packages" in proto_file and has_message == "True", proto_file
    assert Path(pb_file).resolve().is_relative_to(ROOT), pb_file  # this checkout's stubs
    assert same == "False"


# ---- the wheel -----------------------------------------------------------------------------

INSTALLED = ("node", "sim", "ground_station", "proto")


def _package_folders() -> set[str]:
    """sparsat and every folder under the four installed packages with an __init__.py, dotted
    (bench is run from a checkout, not installed)."""
    found = {"sparsat"}
    for top in INSTALLED:
        for init in (ROOT / top).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                found.add(".".join(["sparsat", *init.parent.relative_to(ROOT).parts]))
    return found


def test_pyproject_lists_every_package() -> None:
    setuptools = PYPROJECT["tool"]["setuptools"]

    assert setuptools["package-dir"] == {"sparsat": "."}
    assert sorted(setuptools["packages"]) == sorted(_package_folders())


def test_the_wheel_installs_only_sparsat(tmp_path: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    copy = tmp_path / "src"
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the work tree is left out
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes(src.read_bytes())
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                    str(copy)], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "PIP_NO_INDEX": "1"})
    print(f"wheel built in {time.monotonic() - t0:.1f} s")
    (wheel,) = (tmp_path / "dist").glob("sparsat-*.whl")

    names = zipfile.ZipFile(wheel).namelist()

    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"sparsat"}, tops
    assert [t for t in tops if t.endswith(".dist-info")][0].startswith("sparsat-")
    assert not tops & set(BARE)
    expected = {"sparsat/proto/sparsat/v1/sparsat.proto",
                "sparsat/proto/sparsat/v1/sparsat_pb2.pyi",
                *(f"sparsat/{p.relative_to(ROOT)}" for p in (ROOT / "node/weights").glob("*.pt")),
                *(p.replace(".", "/") + "/__init__.py"  # sparsat.node: sparsat/node/
                  for p in PYPROJECT["tool"]["setuptools"]["packages"])}
    assert expected <= set(names), sorted(expected - set(names))
    assert len([n for n in expected if n.endswith(".pt")]) >= 1


# ---- mypy follows sparsat.* ----------------------------------------------------------------

def _mypy(tmp_path: Path, mypypath: Path) -> subprocess.CompletedProcess[str]:
    probe = tmp_path / "probe.py"
    # Tally: a module that imports only the standard library, so mypy reads no numpy (seconds)
    probe.write_text("from sparsat.sim.mission.tally import Tally\n\n"
                     "x: str = Tally().total_bytes\n")
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / f"cache-{mypypath.name}"), str(probe)],
        capture_output=True, text=True, cwd=tmp_path, timeout=240,
        env={**os.environ, "MYPYPATH": str(mypypath)})


def test_mypy_resolves_sparsat_imports(tmp_path: Path) -> None:
    """As the Makefile runs it: MYPYPATH holds a `sparsat` link to the repository root. Then a
    misused return type is an error; where the import does not resolve (no link) it is Any and
    nothing is reported, the trap this guards against."""
    linked = tmp_path / "typecheck"
    linked.mkdir()
    (linked / "sparsat").symlink_to(ROOT, target_is_directory=True)
    unlinked = tmp_path / "empty"
    unlinked.mkdir()

    resolved = _mypy(tmp_path, linked)
    unresolved = _mypy(tmp_path, unlinked)

    assert resolved.returncode == 1, resolved.stdout + resolved.stderr
    assert ('probe.py:3: error: Incompatible types in assignment (expression has type "int", '
            'variable has type "str")') in resolved.stdout
    assert unresolved.returncode == 0, unresolved.stdout  # the import became Any


def test_package_inits_import_nothing() -> None:
    """import-linter's layers see a package's __init__ as the package itself, outside its
    rooms: an __init__ that imported a room (sim/__init__.py importing sim.cli) would pull it
    into every import below it unseen. So they hold docstrings only."""
    inits = [ROOT / "__init__.py"] + [p for top in ("node", "sim", "ground_station", "proto")
                                      for p in (ROOT / top).rglob("__init__.py")]
    assert len(inits) >= 15
    for init in inits:
        tree = ast.parse(init.read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
                   and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
        assert not imports, f"{init.relative_to(ROOT)} imports {ast.unparse(imports[0])}"
