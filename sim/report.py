"""Run outputs: results.json, config.yaml, history.csv, accuracy vs bytes and vs mission time."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from sim.scenario import Scenario, dump

HISTORY_FIELDS = ("epoch", "accuracy", "test_loss", "train_loss", "bytes_total", "sim_time_s")


def write(out_dir: Path, scenario: Scenario, results: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "config.yaml").write_text(dump(scenario))
    with open(out_dir / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["history"])
    plot(out_dir, results)


def plot(out_dir: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    hist = results["history"]
    acc = [h["accuracy"] for h in hist]
    for name, xs, label in (
        ("accuracy_vs_bytes.png", [h["bytes_total"] / 1e6 for h in hist],
         "bytes sent (MB, all links)"),
        ("accuracy_vs_mission_time.png", [h["sim_time_s"] / 3600 for h in hist],
         "mission time (h)"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, acc, marker="o")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{results['scenario']}: accuracy vs {label.split(' (')[0]}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)


def summary(results: dict[str, Any]) -> str:
    b = results["bytes"]
    s = results["samples"]
    return "\n".join([
        f"scenario        {results['scenario']}",
        f"final accuracy  {results['final_accuracy']:.4f}  (best {results['best_accuracy']:.4f},"
        f" {s['test']} test images)",
        f"bytes sent      {b['total']:,}  (downlink {b['downlink']:,}, acks {b['uplink']:,},"
        + (f" resent {b['retransmitted']:,}," if b.get("retransmitted") else "")
        + f" trainer links {b['trainer']:,})",
        f"samples         sent {s['sent']:,}"
        + (f" in {s['batches']:,} batches" if s.get("batches") else "")
        + f", stored {s['stored']:,}, trained on {s['trained_on']:,}"
        + (f", cloudy scenes not sent {s['cloudy_skipped']:,}" if s.get("cloudy_skipped")
           else ""),
        *([f"refused         {s['rejected']:,} samples, e.g. {s['rejections'][0]}"]
          if s.get("rejected") else []),
        *([_groups_line(results)] if results.get("accuracy_by_group") else []),
        _rounds_line(results),
        f"mission time    {results['sim_time_s']:,.1f} s" + _compute(results),
        *([_target_line(results)] if results.get("target_accuracy") else []),
        f"wall time       {results['wall_time_s']:.1f} s",
        *([f"trainer faults  {len(results['trainer_failures'])} failed calls (see "
           "results.json trainer_failures)"] if results.get("trainer_failures") else []),
    ])


def _groups_line(results: dict[str, Any]) -> str:
    groups = ", ".join(f"{k} {v:.4f}" for k, v in sorted(results["accuracy_by_group"].items()))
    skipped = results["samples"].get("test_cloudy_skipped")
    return f"test groups     {groups}" + (f" ({skipped:,} overcast test images left out)"
                                           if skipped else "")


def _compute(results: dict[str, Any]) -> str:
    c = results.get("compute") or {}
    parts = [f"{name.replace('_', ' ')} {v['sim_s']:,.3g} s" for name, v in c.items()
             if isinstance(v, dict) and v.get("sim_s")]
    return f"  (compute: {', '.join(parts)})" if parts else ""


def _rounds_line(results: dict[str, Any]) -> str:
    rb = results.get("round_bytes") or {}
    if not rb.get("rounds"):
        return "trainer rounds  none"
    line = f"trainer rounds  {rb['rounds']:,} x {rb['mean'] / 1e6:,.3f} MB"
    if rb.get("local_sgd"):
        line += (f"  (one local-SGD round of this model would move {rb['local_sgd'] / 1e6:,.3f}"
                 f" MB: x{rb['ratio_to_local_sgd']:.2f})")
    return line


def _target_line(results: dict[str, Any]) -> str:
    reached = results.get("time_to_accuracy_s")
    target = results["target_accuracy"]
    if reached is None:
        return f"time to {target:.3f}  not reached"
    return f"time to {target:.3f}  {reached:,.1f} s of mission time"
