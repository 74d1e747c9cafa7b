"""The sys.modules guard run after the suite (tests/conftest.py): no module of this repository
may be loaded under a bare name (`node`, `sim`, `ground_station`, `proto`, `bench`, or a
submodule of one) beside its `sparsat.` name. Loaded twice, a module's process-wide state
(the active credentials, the encoder and strategy registries) would be two. proto-plus's own
`proto` (in site-packages, even of a venv inside the checkout) is not ours and is fine."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

BARE = ("node", "sim", "ground_station", "proto", "bench")
ROOT = Path(__file__).resolve().parents[1]


def _files(module: object) -> list[str]:
    """Where a module was loaded from: its file, or a namespace package's folders."""
    file = getattr(module, "__file__", None)
    if file:
        return [file]
    return [str(p) for p in getattr(module, "__path__", None) or []]


def bare_modules(modules: Mapping[str, object], root: Path = ROOT) -> list[str]:
    """The names in `modules` (sys.modules) that are a bare name of BARE, or a submodule of
    one, whose file lies inside that folder of `root` (root/node/... for node.x: not a
    site-packages `proto` of a venv that lives inside the checkout)."""
    found = []
    for name, module in modules.items():
        top = name.partition(".")[0]
        if top not in BARE:
            continue
        if any(Path(f).resolve().is_relative_to(root / top) for f in _files(module)):
            found.append(name)
    return sorted(found)


def check_session(session: pytest.Session, modules: Mapping[str, object]) -> list[str]:
    """Fail the session (exit status TESTS_FAILED) when `modules` holds bare modules of this
    repository, and say which; returns them."""
    found = bare_modules(modules)
    if found:
        line = (f"modules of this repository loaded under a bare name (import them as "
                f"sparsat.X): {', '.join(found)}")
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(line, red=True, bold=True)
        else:
            print(line)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return found
