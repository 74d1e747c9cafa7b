"""Sweep outputs: sweep.csv (one row per point), summary.md (mean ± sd over seeds per
configuration, the Pareto frontier, measured vs the paper's bytes) and figures.

`point_row` turns one point's resolved scenario and results.json into a row; `write_outputs`
writes the files from the rows. The paper's byte formula (Kariotakis et al., Table 4 note):
a masked image is H·W·(1−r)·4 bytes (float32 pixels, colour channels left out), a CLS token
D·4 bytes, D the encoder width. sparsat's bytes are those really sent on the downlink."""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsat.node.models.encoders import DEFAULT_ENCODER
from sparsat.node.models.encoders import config as encoder_config

SEED_KEY = "seed"
STATUSES = ("done", "failed", "missing")

# sweep.csv columns after `point` and the grid keys, in this order
METRIC_COLUMNS = (
    "status",
    "final_accuracy",
    "best_accuracy",
    "downlink_bytes",
    "downlink_bytes_per_image",
    "downlink_bytes_per_sample",
    "uplink_bytes",
    "trainer_bytes",
    "total_bytes",
    "mission_time_s",
    "time_to_target_s",
    "accuracy_at_horizon",
    "left_on_board",
    "captured",
    "dropped_on_board",
    "updates",
    "wall_time_s",
    "paper_bytes_per_image",
    "measured_over_paper",
    "samples_sent",
    "rejected",
    # on board, per image (over the distinct images stored): the encoder's and the other
    # on-board FLOPs (tile choice, cloud detection), and the energy (results.json energy)
    "onboard_flops_per_image",
    "energy_per_image_j",
)

# image height and width of each dataset (imagefolder: any size, so no paper formula)
IMAGE_HW: dict[str, tuple[int, int] | None] = {
    "fashion_mnist": (28, 28),
    "cifar10": (32, 32),
    "eurosat": (64, 64),
    "imagefolder": None,
}

PAPER_BYTES_PER_VALUE = 4  # the paper counts every pixel and token value as float32

FIGURES = ("accuracy_vs_bytes.png", "accuracy_vs_ratio.png", "accuracy_vs_mission_time.png",
           "timelines.png")


def columns(grid_keys: Sequence[str]) -> list[str]:
    """sweep.csv's header: `point`, the grid keys by dotted name, then METRIC_COLUMNS."""
    return ["point", *grid_keys, *METRIC_COLUMNS]


def _get(d: dict[str, Any] | None, dotted: str, default: Any = None) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _div(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


def paper_bytes_per_image(scenario: dict[str, Any]) -> float | None:
    """The paper's dataset size per image: H·W·(1−r)·4 bytes for patch payloads (H, W of the
    dataset's images; r 0 for `kind: none`), D·4 bytes for CLS payloads (D the encoder width).
    None where the formula has no answer (imagefolder images have no one size)."""
    payload = _get(scenario, "sensors.payload.kind", "patches")
    if payload == "cls":
        d = encoder_config(str(_get(scenario, "encoder.name", DEFAULT_ENCODER))).embed_dim
        return float(d * PAPER_BYTES_PER_VALUE)
    hw = IMAGE_HW.get(str(_get(scenario, "dataset.name", "fashion_mnist")))
    if hw is None:
        return None
    kind = _get(scenario, "sensors.mask.kind", "fixed")
    ratio = 0.0 if kind == "none" else float(_get(scenario, "sensors.mask.ratio", 0.5))
    return round(hw[0] * hw[1] * (1.0 - ratio) * PAPER_BYTES_PER_VALUE, 6)


def copies_per_image(scenario: dict[str, Any]) -> int:
    """How many masked copies of each image are downlinked: `training.epochs` for random
    masks (a new mask every epoch), else 1 (also with captures over time: a fresh mask per
    capture, no per-epoch copies)."""
    if _get(scenario, "sensors.capture") is not None:
        return 1
    if _get(scenario, "sensors.mask.kind") == "random":
        return int(_get(scenario, "training.epochs", 1))
    return 1


def point_row(name: str, overrides: dict[str, object], scenario: dict[str, Any],
              results: dict[str, Any] | None, status: str,
              wall_s: float | None) -> dict[str, object]:
    """One sweep.csv row: the point's name, its grid values, then METRIC_COLUMNS. Metrics
    that the point has no value for (failed or missing, or undefined) are None."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    row: dict[str, object] = {"point": name, **overrides, "status": status}
    paper = paper_bytes_per_image(scenario)
    r = results or {}
    b = r.get("bytes", {}) if results is not None else {}
    s = r.get("samples", {}) if results is not None else {}
    downlink = b.get("downlink")
    images = _div(s.get("stored"), copies_per_image(scenario))
    per_image = _div(downlink, images)
    if wall_s is None:
        wall_s = r.get("wall_time_s")
    row.update({
        "final_accuracy": r.get("final_accuracy"),
        "best_accuracy": r.get("best_accuracy"),
        "downlink_bytes": downlink,
        "downlink_bytes_per_image": per_image,
        "downlink_bytes_per_sample": _div(downlink, s.get("sent")),
        "uplink_bytes": b.get("uplink"),
        "trainer_bytes": b.get("trainer"),
        "total_bytes": b.get("total"),
        "mission_time_s": r.get("sim_time_s"),
        "time_to_target_s": r.get("time_to_accuracy_s"),
        # the last model finished by the scenario's mission.horizon_h (None without one)
        "accuracy_at_horizon": r.get("accuracy_at_horizon") if r.get("horizon_h") else None,
        "left_on_board": r.get("left_on_board", {}).get("total"),
        # captures over time (None without): scenes captured, dropped on board; updates
        "captured": (r.get("captures") or {}).get("captured"),
        "dropped_on_board": (r.get("captures") or {}).get("dropped_on_board"),
        "updates": r.get("updates"),
        "wall_time_s": wall_s,
        "paper_bytes_per_image": paper,
        "measured_over_paper": _div(per_image, paper),
        "samples_sent": s.get("sent"),
        "rejected": s.get("rejected", 0) if results is not None else None,
        "onboard_flops_per_image": _div(
            (r.get("compute", {}).get("onboard_encoder", {}).get("flops", 0)
             + (r.get("energy") or {}).get("onboard_other_flops", 0)) if results else None,
            images),
        "energy_per_image_j": _div((r.get("energy") or {}).get("total_j"), images),
    })
    # not a sweep.csv column: the point's timeline (mission time, accuracy, downlink bytes
    # after each update) for timelines.png
    row["_timeline"] = [(e["sim_time_s"], e["accuracy"], e.get("downlink_bytes"))
                        for e in r.get("timeline", []) if e.get("event") == "update"]
    return row


def write_csv(path: Path, rows: list[dict[str, object]], grid_keys: Sequence[str]) -> None:
    """Rows in the order given; None and absent values as empty cells."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(grid_keys), extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})


def _cell(v: object) -> object:
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


def read_csv(path: Path) -> list[dict[str, object]]:
    """sweep.csv back as rows: empty cells None, numbers as int or float, the rest text."""
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(v: str) -> object:
    if v == "":
        return None
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


# --- configurations: the grid values except the seed -------------------------------------


class Config:
    """One configuration and its points; statistics over the points that are done."""

    def __init__(self, values: dict[str, object]) -> None:
        self.values = values
        self.rows: list[dict[str, object]] = []

    @property
    def done(self) -> list[dict[str, object]]:
        return [r for r in self.rows if r.get("status") == "done"]

    def values_of(self, col: str) -> list[float]:
        return [float(v) for r in self.done if isinstance(v := r.get(col), (int, float))
                and not isinstance(v, bool)]

    def mean(self, col: str) -> float | None:
        xs = self.values_of(col)
        return statistics.fmean(xs) if xs else None

    def sd(self, col: str) -> float | None:
        xs = self.values_of(col)
        return statistics.stdev(xs) if len(xs) >= 2 else None

    def paper(self) -> float | None:
        for r in self.rows:
            if isinstance(v := r.get("paper_bytes_per_image"), (int, float)):
                return float(v)
        return None

    def measured_over_paper(self) -> float | None:
        return _div(self.mean("downlink_bytes_per_image"), self.paper())


def config_keys(grid_keys: Sequence[str]) -> list[str]:
    return [k for k in grid_keys if k != SEED_KEY]


def group(rows: list[dict[str, object]], grid_keys: Sequence[str]) -> list[Config]:
    """Configurations in the order their first point appears."""
    keys = config_keys(grid_keys)
    configs: dict[str, Config] = {}
    for row in rows:
        values = {k: row.get(k) for k in keys}
        ident = json.dumps([values[k] for k in keys], sort_keys=True, default=str)
        configs.setdefault(ident, Config(values)).rows.append(row)
    return list(configs.values())


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points on the frontier of (x ↓, y ↑), by increasing x: a point is on it
    when no other point has x no larger and y larger (or equal x and y, met earlier)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    frontier: list[int] = []
    best = float("-inf")
    for i in order:
        if points[i][1] > best:
            frontier.append(i)
            best = points[i][1]
    return frontier


def frontier(configs: Sequence[Config]) -> list[Config]:
    """Configurations on the (downlink bytes per image ↓, mean final accuracy ↑) frontier."""
    pts: list[tuple[Config, float, float]] = []
    for c in configs:
        x, y = c.mean("downlink_bytes_per_image"), c.mean("final_accuracy")
        if x is not None and y is not None:
            pts.append((c, x, y))
    return [pts[i][0] for i in pareto([(x, y) for _, x, y in pts])]


def varied_keys(configs: Sequence[Config], grid_keys: Sequence[str]) -> list[str]:
    keys = config_keys(grid_keys)
    return [k for k in keys
            if len({json.dumps(c.values[k], default=str) for c in configs}) > 1]


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key by its shortest suffix that no other key ends with (`ratio`,
    `mask.kind` beside `payload.kind`)."""
    out: dict[str, str] = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != k and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        out[k] = suffix
    return out


def _fmt_value(v: object) -> str:
    if v is None:
        return "—"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def label(c: Config, keys: Sequence[str]) -> str:
    names = short_names(keys)
    return " ".join(f"{names[k]}={_fmt_value(c.values[k])}" for k in keys) or "base"


# --- summary.md ------------------------------------------------------------------------


def _num(v: float | None, digits: int, comma: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v:,.{digits}f}" if comma else f"{v:.{digits}f}"


def mean_sd(c: Config, col: str, digits: int, comma: bool = False) -> str:
    """`mean ± sd` over the done seeds; `mean ± —` with one seed, `—` with none."""
    m = c.mean(col)
    if m is None:
        return "—"
    return f"{_num(m, digits, comma)} ± {_num(c.sd(col), digits, comma)}"


BYTES_NOTE = (
    "The paper sizes a masked dataset as H·W·(1−r)·4 bytes an "
    "image and a CLS dataset as D·4 bytes an image (Table 4 note): it counts every pixel as a "
    "float32 and leaves out the colour channels. sparsat counts what was really sent on the "
    "downlink (docs/protocol.md): uint8 pixels of the visible tiles, all their channels (3 for "
    "CIFAR-10 and EuroSAT), plus each sample's visible-token code (a bitmap of the grid or "
    "runs), its compact id, label and framing, and each batch's header; CLS payloads go as "
    "`cls_dtype` values (2 bytes a value for float16; 1 byte a value and a 4-byte scale a "
    "token for int8). So "
    "measured/paper is about 1/4 for grey patches, about 3/4 for RGB patches, and below 1 for "
    "CLS tokens narrower than float32, the protocol's few bytes a sample on top. Random masks "
    "send a fresh copy of each image every epoch, so their bytes per (distinct) image are "
    "`training.epochs` times one copy's; cloud masks drop cloudy tokens beyond the ratio "
    "(and overcast scenes), which the formula, fed the configured r, does not know of."
)


def summary_md(rows: list[dict[str, object]], grid_keys: Sequence[str]) -> str:
    configs = group(rows, grid_keys)
    keys = config_keys(grid_keys)
    count = {s: sum(1 for r in rows if r.get("status") == s) for s in STATUSES}
    lines = [
        "# Sweep summary",
        "",
        f"{len(rows)} points: {count['done']} done, {count['failed']} failed, "
        f"{count['missing']} missing.",
        "",
        "Mean ± sd over the seeds done (sample sd; — with fewer than 2); failed and missing "
        "points are left out of every mean. Bytes per image: downlink bytes over distinct "
        "training images.",
        "",
    ]
    head = [*keys, "n", "final accuracy", "best accuracy", "downlink B/image",
            "paper B/image", "measured/paper", "trainer bytes", "mission time (s)",
            "wall time (s)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("| " + " | ".join("---" for _ in head) + " |")
    for c in configs:
        cells = [_fmt_value(c.values[k]) for k in keys]
        cells += [
            str(len(c.done)),
            mean_sd(c, "final_accuracy", 4),
            mean_sd(c, "best_accuracy", 4),
            _num(c.mean("downlink_bytes_per_image"), 1, comma=True),
            _num(c.paper(), 1, comma=True),
            _num(c.measured_over_paper(), 3),
            _num(c.mean("trainer_bytes"), 0, comma=True),
            mean_sd(c, "mission_time_s", 1, comma=True),
            _num(c.mean("wall_time_s"), 1, comma=True),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    not_done = [r for r in rows if r.get("status") != "done"]
    if not_done:
        lines += ["", "Points not done:", ""]
        lines += [f"- `{r['point']}`: {r['status']}" for r in not_done]
    lines += ["", "## Pareto frontier", "",
              "Configurations that no other beats on both downlink bytes per image (fewer) "
              "and mean final accuracy (higher), by increasing bytes:", ""]
    front = frontier(configs)
    varied = varied_keys(configs, grid_keys)
    if front:
        lines += [f"- {label(c, varied)}: {_num(c.mean('downlink_bytes_per_image'), 1, True)} "
                  f"B/image, accuracy {_num(c.mean('final_accuracy'), 4)}" for c in front]
    else:
        lines.append("- none (no configuration has a point done)")
    lines += ["", "## Measured vs paper bytes", "", BYTES_NOTE, ""]
    return "\n".join(lines)


# --- figures -----------------------------------------------------------------------------


def _plotted(configs: Sequence[Config], x_col: str) -> list[Config]:
    return [c for c in configs
            if c.mean(x_col) is not None and c.mean("final_accuracy") is not None]


def plot(out_dir: Path, rows: list[dict[str, object]], grid_keys: Sequence[str]) -> list[Path]:
    """The figures the grid makes meaningful; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    configs = group(rows, grid_keys)
    varied = varied_keys(configs, grid_keys)
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    def scatter(x_col: str, name: str, xlabel: str, logx: bool, draw_frontier: bool) -> None:
        cs = _plotted(configs, x_col)
        if len(cs) < 2:
            return
        fig, ax = plt.subplots(figsize=(7, 5))
        xs = [c.mean(x_col) or 0.0 for c in cs]
        ys = [c.mean("final_accuracy") or 0.0 for c in cs]
        ax.errorbar(xs, ys, yerr=[c.sd("final_accuracy") or 0.0 for c in cs],
                    xerr=[c.sd(x_col) or 0.0 for c in cs], fmt="o", capsize=3)
        for c, x, y in zip(cs, xs, ys, strict=True):
            ax.annotate(label(c, varied), (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        if draw_frontier:
            front = frontier(cs)
            ax.step([c.mean(x_col) or 0.0 for c in front],
                    [c.mean("final_accuracy") or 0.0 for c in front], where="post",
                    color="tab:red", alpha=0.7, label="Pareto frontier")
            ax.legend(loc="lower right")
        if logx:
            ax.set_xscale("log")
        ax.margins(x=0.15, y=0.08)  # room for the labels
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final test accuracy (mean over seeds)")
        ax.set_title(f"accuracy vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3, which="both")
        save(fig, name)

    scatter("downlink_bytes_per_image", FIGURES[0], "downlink bytes per image (log)",
            logx=True, draw_frontier=True)

    ratio_key = "sensors.mask.ratio"
    if ratio_key in varied:
        others = [k for k in varied if k != ratio_key]
        lines: dict[str, list[tuple[float, Config]]] = {}
        for c in _plotted(configs, "final_accuracy"):
            r = c.values[ratio_key]
            if isinstance(r, (int, float)):
                lines.setdefault(label(c, others), []).append((float(r), c))
        fig, ax = plt.subplots(figsize=(7, 5))
        for name, line in lines.items():
            line.sort(key=lambda rc: rc[0])
            ax.errorbar([r for r, _ in line], [c.mean("final_accuracy") or 0.0 for _, c in line],
                        yerr=[c.sd("final_accuracy") or 0.0 for _, c in line],
                        marker="o", capsize=3, label=name)
        ax.set_title("accuracy vs mask ratio")
        ax.set_xlabel("mask ratio r (sensors.mask.ratio)")
        ax.set_ylabel("final test accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
        if len(lines) > 1 or others:
            ax.legend(fontsize=8)
        save(fig, FIGURES[1])

    scatter("mission_time_s", FIGURES[2], "mission time (s)", logx=False, draw_frontier=False)

    # streaming missions: accuracy after each update against mission time and against the
    # downlink's bytes, a line per point, one colour per configuration (its seeds alike)
    drawn: list[tuple[int, Config, list[tuple[float, float, int | None]]]] = [
        (k, c, tl) for k, c in enumerate(configs) for r in c.done
        if isinstance(tl := r.get("_timeline"), list) and len(tl) > 1]
    if drawn:
        fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 5))
        labelled: set[int] = set()
        for k, c, curve in drawn:
            colour = f"C{k % 10}"
            legend = None if k in labelled else (label(c, varied) or "all points")
            labelled.add(k)
            ax_t.plot([x / 3600 for x, _, _ in curve], [a for _, a, _ in curve], marker=".",
                      color=colour, label=legend, alpha=0.8)
            ax_b.plot([(b or 0) / 1e6 for _, _, b in curve], [a for _, a, _ in curve],
                      marker=".", color=colour, label=legend, alpha=0.8)
        ax_t.set_xlabel("mission time (h)")
        ax_b.set_xlabel("downlink bytes so far (MB)")
        for ax in (ax_t, ax_b):
            ax.set_ylabel("test accuracy after each update")
            ax.grid(alpha=0.3)
        ax_t.legend(fontsize=7)
        ax_t.set_title("accuracy vs mission time")
        ax_b.set_title("accuracy vs downlink bytes")
        save(fig, FIGURES[3])
    return written


def write_outputs(out_dir: Path, rows: list[dict[str, object]],
                  grid_keys: list[str]) -> list[Path]:
    """out_dir/sweep.csv, out_dir/summary.md and the figures; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "sweep.csv"
    write_csv(csv_path, rows, grid_keys)
    md_path = out_dir / "summary.md"
    md_path.write_text(summary_md(rows, grid_keys))
    return [csv_path, md_path, *plot(out_dir, rows, grid_keys)]
