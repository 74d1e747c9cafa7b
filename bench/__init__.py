"""sparsat's benchmarks: each `bench/NAME.py` runs as a script and ends with one JSON line.

Each has `--smoke`: tiny sizes (seconds), the same code paths (node processes with their
credentials where the bench starts them); tests/test_bench_smoke.py runs every one of them
that way, so a change that breaks a bench fails `make test`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
               smoke: dict[str, Any]) -> argparse.Namespace:
    """`parser`'s arguments, plus `--smoke`: `smoke`'s values become the defaults (sizes the
    smoke tests run in seconds); a flag given explicitly still wins."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, seconds (" + ", ".join(
                            f"--{k.replace('_', '-')} {v}" for k, v in smoke.items())
                        + "); flags given explicitly still win")
    known, _ = parser.parse_known_args(argv)
    if known.smoke:
        parser.set_defaults(**smoke)
    return parser.parse_args(argv)
