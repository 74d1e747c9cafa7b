"""docs/results/pixels/table.py, results.md (b)'s table and figure, on points it is given."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("pixels_table",
                                                  ROOT / "docs/results/pixels/table.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _point(root: Path, name: str, codec: dict[str, Any] | None, ratio: float | None,
           acc: float, down: int, choice: str | None = None) -> None:
    d = root / "points" / name
    (d / "run").mkdir(parents=True)
    mask: dict[str, Any] = {"kind": "none"} if ratio is None else {"kind": "fixed",
                                                                    "ratio": ratio}
    if choice:
        mask["choice"] = choice
    (d / "scenario.yaml").write_text(yaml.safe_dump(
        {"sensors": {"mask": mask, "payload": {"kind": "patches", "codec": codec}},
         "links": {"downlink": {"rate_bps": 100_000}}}))
    n = 100
    (d / "run" / "results.json").write_text(json.dumps({
        "final_accuracy": acc, "samples": {"stored": n},
        "bytes": {"downlink": down * n, "uplink": 2 * n},
        "compute": {"onboard_encoder": {"flops": 0}},
        "energy": {"total_j": 0.05 * n, "onboard_other_flops": 1000 * n,
                   "j": {"radio": 0.04 * n, "coding": 0.01 * n, "encoder": 0.0}}}))


def test_the_table_groups_seeds_marks_both_frontiers_and_checks_the_target(
        tmp_path: Path) -> None:
    table = _load()
    runs = tmp_path / "runs"
    webp = {"name": "webp", "quality": 30}
    _point(runs / "pixels", "a0", None, None, 0.87, 790)
    _point(runs / "pixels", "b0", webp, None, 0.85, 190)
    _point(runs / "pixels", "b1", webp, None, 0.86, 200)  # a second seed: 0.855 at 195 B
    _point(runs / "pixels", "c0", {"name": "png"}, 0.5, 0.84, 370)  # beaten by webp
    _point(runs / "pixels_content", "d0", None, 0.5, 0.849, 396, choice="content")
    out = tmp_path / "out"
    table.main(out, runs)
    text = (out / "table.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()
            if line.startswith("| patches") or line.startswith("| int8") or
            line.startswith("| PCA")}
    webp_row = rows["patches, WebP q30"]
    # the radio: 195 B an image at 100 kbit/s, 5 W on the air: 78 mJ; coding 10 mJ
    assert "| 2 | 0.8550 ± 0.0071 | 195.0 | 2.00 | 0.001 | 88.0 (78.0, 10.00, 0.00) |" in webp_row
    assert "**pixels**" in webp_row
    assert "**pixels**" not in rows["patches, PNG"]
    assert "**pixels**" in rows["patches, raw"]  # the most accurate pixel payload
    assert "patches, raw, content tiles" in rows
    # the committed token sweeps are in the table too, on the frontier of all payloads
    assert any("**all**" in r for k, r in rows.items() if k.startswith("PCA"))
    assert text.rstrip().endswith("patches, WebP q30, r = 0")  # 0.855 at 195 B: the target
    assert (out / "frontier.png").stat().st_size > 10_000
