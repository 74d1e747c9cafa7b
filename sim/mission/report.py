"""Run outputs: results.json, config.yaml, history.csv, accuracy vs bytes and vs mission time."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sparsat.node.wire.control import TRAINER
from sparsat.sim.mission import detector
from sparsat.sim.scenario.schema import Scenario, dump
from sparsat.sim.space.links import Link

if TYPE_CHECKING:
    from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
    from sparsat.sim.mission.tally import Tally

HISTORY_FIELDS = ("epoch", "accuracy", "validation_accuracy", "test_loss", "train_loss",
                  "bytes_total", "sim_time_s", "downlink_bytes", "trainer_bytes")


@dataclass
class Outcome:
    """What mission control hands over at the end of a run: its tally and clock, the links,
    and what the nodes reported (ground-station Stats, each node's own byte counts, the
    registry as it stands)."""

    scenario: Scenario
    tally: Tally
    sim_time_s: float
    wall_time_s: float
    links: list[Link]
    stats: pb.StatsReply
    node_bytes: dict[str, dict[str, Any]]  # node -> sent, received, base_sent, base_received
    unreachable: list[str]
    nodes: list[pb.NodeInfo]


def assemble(o: Outcome) -> dict[str, Any]:
    """results.json's content."""
    import torch

    s, t, stats, now = o.scenario, o.tally, o.stats, o.sim_time_s
    accs = [h["accuracy"] for h in t.history]
    target = s.training.target_accuracy
    reached = [h["sim_time_s"] for h in t.history if target and h["accuracy"] >= target]
    best = _best(t.history)
    at_horizon = _finished_by(t.history, s.mission.horizon_s)
    return {
        "scenario": s.name,
        "final_accuracy": accs[-1],
        # the best model is chosen on the validation split (dataset.validation_subset), never
        # on the test set; its test accuracy is reported. Without one: the last model
        "best_accuracy": best["accuracy"],
        "best_epoch": best["epoch"],
        "best_chosen_on": ("validation" if "validation_accuracy" in t.history[-1]
                           else "none (the last model)"),
        # downlink: batches and the call credentials of their streams (downlink_credentials)
        "bytes": {"downlink": t.downlink_bytes, "downlink_credentials": t.credential_bytes,
                  # ground station -> satellites: acks, and what projected payloads need
                  # (uplink_breakdown); without a projection, the acks alone as before
                  "uplink": t.uplink_bytes + sum(t.uplink_content.values()),
                  "uplink_breakdown": {"acks": t.uplink_bytes,
                                       **{k: t.uplink_content.get(k, 0)
                                          for k in ("bases", "codebooks", "dictionaries",
                                                    "detector", "codec_header")}},
                  "retransmitted": t.retransmitted_bytes,
                  # the radio's framing (links.downlink.framing) on batches and acks alike,
                  # resent frames' included: gRPC bytes + retransmitted + framing is the air's
                  "framing": t.framing_bytes, "trainer": t.trainer_bytes,
                  "total": t.total_bytes},
        "target_accuracy": target,
        "time_to_accuracy_s": reached[0] if reached else None,
        # the mission's end (scenario mission.horizon_h; None: when everything was down), the
        # accuracy of the last model finished by then, and what it left on board
        "horizon_h": s.mission.horizon_h,
        "accuracy_at_horizon": at_horizon["accuracy"] if at_horizon else None,
        "left_on_board": {"total": sum(t.left_on_board.values()),
                          "per_satellite": {sat: t.left_on_board.get(sat, 0)
                                            for sat in s.sensors.ids()}},
        "sim_time_s": now,
        "downlink_done_s": t.downlink_done_s,
        "wall_time_s": o.wall_time_s,
        "stage_wall_s": t.stage_wall_s,
        "resumed": t.resumed,
        "samples": {"sent": t.downlink_messages, "batches": t.downlink_batches,
                    "rejected": t.rejected, "rejections": t.rejections,
                    "stored": int(stats.samples_stored),
                    # distinct stored rows used, and rows used over all epochs
                    "trained_on": t.distinct_trained, "rows_trained": t.rows_trained,
                    "train_tokens": int(stats.train_tokens),
                    "duplicates": int(stats.duplicates), "test": int(stats.test_tokens),
                    "cloudy_skipped": t.cloudy_skipped,
                    "test_cloudy_skipped": int(stats.test_skipped)},
        "accuracy_by_group": {k[len("accuracy_"):]: v for k, v in t.history[-1].items()
                              if k.startswith("accuracy_")},
        "compute": {**t.compute, "flops_per_s": {
            "onboard_encoder": s.sensors.onboard_flops,
            "ground_encoder": s.training.ground_flops,
            "trainers": s.training.trainer_flops},
            "test_encoder_flops": int(stats.test_encode_flops)},
        "downlink_failures": t.downlink_failures,
        # asked (the scenario) and used: by the ground station's encoder stage, and by the
        # sensor hosts' on-board encoders (CLS payloads; each decides on its own hardware)
        "encoder_precision": {"asked": s.encoder.precision,
                              "ground_station": stats.encoder_precision or None,
                              "onboard": sorted(t.onboard_precision),
                              "note": stats.encoder_precision_note},
        "ground_station": {"downlink_bytes_received": int(stats.downlink_bytes_received),
                           "downlink_credential_bytes_received": int(
                               stats.downlink_credential_bytes_received),
                           "rejected": int(stats.rejected),
                           "peak_rss_mb": round(stats.peak_rss_bytes / 2**20, 1),
                           "scenario_fingerprint": t.fingerprint},
        # where training ran: each trainer's device (and threads, where it reports them),
        # and this process's torch threads
        "devices": {"trainers": {n.node_id: _device(n) for n in o.nodes
                                 if n.role == TRAINER},
                    "mission_control_threads": torch.get_num_threads()},
        "per_link_bytes": t.per_link,
        # busy time / mission time; stations: busy / (antennas x mission time)
        "link_utilisation": {link.name: link.busy_s / now if now else 0.0 for link in o.links},
        "stations": {name: {**v, "utilisation": v["busy_s"] / (v["antennas"] * now)
                            if now else 0.0} for name, v in t.stations.items()},
        # adaptive modulation: per MODCOD, seconds and bytes on the air and transfers, with
        # its share of the air time; None without links.downlink.budget.modcod
        # projected CLS payloads: the basis (how it was fitted, on how many tokens, when),
        # its uplinks (count, air seconds) and the waits for it (by why: fit, window);
        # None without a projection
        "projection": {"basis": t.basis, "uplinks": t.uplinks,
                       "uplink_s": round(t.uplink_s, 3), "basis_waits": t.basis_waits}
        if s.sensors.payload.projection is not None else None,
        # clouds: the on-board cloud detector (oracle or threshold), its uplinked bytes and
        # its token error rates on the test split (sparsat.sim.mission.detector)
        "detector": detector.results(s, stats),
        "modcods": _modcods(t.modcods) if s.links.downlink.budget is not None
        and s.links.downlink.budget.modcod is not None else None,
        "node_bytes": {k: {"sent": v["sent"] + v["base_sent"],
                           "received": v["received"] + v["base_received"]}
                       for k, v in o.node_bytes.items()},
        "unreachable_nodes": o.unreachable,
        # faults survived (node, address, wall seconds to recover) and satellites whose
        # sensor host never came back, with the samples they did not deliver
        "faults": t.faults,
        "shortfall": t.shortfall,
        "ground_station_retries": t.gs_retries,
        "per_round_bytes": t.per_round_bytes,
        "round_bytes": round_bytes(t),
        "trainer_failures": t.trainer_failures,
        "history": t.history,
        # when the model trained (training.schedule), and the streaming updates made
        "schedule": (s.training.schedule if isinstance(s.training.schedule, str)
                     else s.training.schedule.model_dump()),
        "updates": t.updates,
        "samples_arrived": int(stats.samples_arrived),
        "captures": _captures(s, t),
        "placement": _placement(s),
        "timeline": timeline(t.history, s.mission.horizon_s, t, _captured_total(s)),
        "energy": energy(s, t, int(stats.samples_stored)),
    }


def energy(s: Scenario, t: Tally, stored: int) -> dict[str, Any]:
    """On-board energy (sensors.energy), in joules: the encoder's FLOPs and the other
    on-board FLOPs (tile choice, cloud detection) at joules_per_flop; image coding (and
    zstd) as timed on the sensor hosts, times coding_slowdown, at coding_watts; the
    transmitter at radio_watts while the satellites' batches are on the air (their bits at
    the link's rate, resent frames and framing included; receiving acks is not counted).
    Per image: over the samples stored at the ground station."""
    e = s.sensors.energy
    radio_s = t.radio_tx_s
    parts = {"encoder": t.compute["onboard_encoder"]["flops"] * e.joules_per_flop,
             "choice_and_detector": t.onboard_other_flops * e.joules_per_flop,
             "coding": t.coding_wall_s * e.coding_slowdown * e.coding_watts,
             "radio": radio_s * e.radio_watts}
    total = sum(parts.values())
    return {"total_j": total, "per_image_j": total / stored if stored else None,
            "j": parts,
            "per_image": {k: v / stored if stored else None for k, v in parts.items()},
            "radio_s": radio_s, "coding_wall_s": t.coding_wall_s,
            "coded_pixels": t.coded_pixels,
            "onboard_other_flops": t.onboard_other_flops, "settings": e.model_dump()}


def _captured_total(s: Scenario) -> int | None:
    """Scenes captured over the whole mission: with captures over time, every satellite's by
    the horizon; else what they hold at t = 0."""
    from sparsat.sim.scenario.configs import capture_spec, capturing_satellites

    spec = capture_spec(s)
    if spec is None:
        return _captured_at_start(s)
    return spec.max_captures * capturing_satellites(s)


def _modcods(used: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    total = sum(m["seconds"] for m in used.values())
    return {name: {**m, "time_share": m["seconds"] / total if total else 0.0}
            for name, m in sorted(used.items(), key=lambda kv: -kv[1]["seconds"])}


def _placement(s: Scenario) -> dict[str, Any]:
    """Which satellite holds which images (dataset.placement): each satellite's count of
    every class in its shard (None when this machine, mission control's, has not the
    training split)."""
    from sparsat.node.data.datasets import split_labels
    from sparsat.sim.scenario.configs import satellite_images, sensor_config

    out: dict[str, Any] = {"kind": s.dataset.placement, "alpha": s.dataset.alpha,
                           "label_counts": None}
    try:
        labels = split_labels(sensor_config(s).dataset, "train")
        images = satellite_images(s)
    except Exception:  # noqa: BLE001 - the data lives with the nodes, not the operator
        return out
    classes = int(labels.max()) + 1 if len(labels) else 0
    out["label_counts"] = {sat: np.bincount(labels[held], minlength=classes).tolist()
                           for sat, held in images.items()}
    return out


def _captures(s: Scenario, t: Tally) -> dict[str, Any] | None:
    """Captures over time, per satellite and in all: captured, dropped on board (storage
    full), sent (retries included), stored on the ground, left on board at the end."""
    if s.sensors.capture is None:
        return None
    per = {}
    for sat in s.sensors.ids():
        c = t.captures.get(sat, {})
        per[sat] = {"captured": c.get("captured", 0), "dropped_on_board": c.get("dropped", 0),
                    "sent": c.get("sent", 0), "stored_on_ground": c.get("stored", 0),
                    "left_on_board": t.left_on_board.get(sat, 0),
                    "onboard_bytes_at_end": c.get("onboard_bytes", 0)}
    keys = ("captured", "dropped_on_board", "sent", "stored_on_ground", "left_on_board")
    return {**{k: sum(v[k] for v in per.values()) for k in keys}, "per_satellite": per}


def _device(n: pb.NodeInfo) -> dict[str, Any]:
    threads = getattr(n, "threads", 0)  # set by trainers that report it
    return {"device": n.device, **({"threads": int(threads)} if threads else {})}


def round_bytes(t: Tally) -> dict[str, Any]:
    """Mean bytes per training round (all workers, both directions) beside what one
    local-SGD round of the same model and K moves."""
    totals = [sum(w["sent"] + w["received"] for w in r["workers"].values())
              for r in t.per_round_bytes]
    mean = sum(totals) / len(totals) if totals else 0.0
    return {"rounds": len(totals), "mean": mean, "local_sgd": t.local_sgd_round_bytes,
            "ratio_to_local_sgd": mean / t.local_sgd_round_bytes if t.local_sgd_round_bytes
            else None}


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

    updates = [e for e in results.get("timeline", []) if e["event"] == "update"]
    acc = [e["accuracy"] for e in updates]
    horizon = results.get("horizon_h")
    title = results["scenario"]
    # accuracy against each link's bytes, on axes of their own: the radio's and the LAN's
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "downlink_bytes", "downlink bytes (MB, the radio)"),
                           (axes[1], "trainer_bytes", "trainer-link bytes (MB, the ground LAN)")):
        ax.plot([(e[key] or 0) / 1e6 for e in updates], acc, marker="o")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    fig.suptitle(f"{title}: accuracy vs bytes, after every model update")
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_vs_bytes.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([e["sim_time_s"] / 3600 for e in updates], acc, marker="o", label="test accuracy")
    if horizon is not None:
        ax.axvline(horizon, color="grey", linestyle="--", label=f"horizon ({horizon:g} h)")
        ax.legend()
    ax.set_xlabel("mission time (h)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{title}: accuracy vs mission time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_vs_mission_time.png", dpi=120)
    plt.close(fig)


def _best(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The history entry of the best model: the first with the highest validation accuracy;
    the last one when there is no validation split."""
    if "validation_accuracy" not in history[-1]:
        return history[-1]
    vals = [h.get("validation_accuracy", -1.0) for h in history]
    return history[vals.index(max(vals))]


def _captured_at_start(s: Scenario) -> int | None:
    """Scenes the satellites hold at t = 0 (today's missions capture everything then): the
    training subset, once per masked copy; None when it needs the training split's size and
    this machine (mission control's) has not the data."""
    from sparsat.node.data.datasets import split_size
    from sparsat.sim.scenario.configs import mask_spec, sensor_config

    copies = mask_spec(s).copies
    try:
        n_train = split_size(sensor_config(s).dataset, "train")
    except Exception:  # noqa: BLE001 - the data lives with the nodes, not the operator
        return None
    n = n_train if s.dataset.train_subset is None else min(s.dataset.train_subset, n_train)
    return n * copies


def timeline(history: list[dict[str, Any]], horizon_s: float | None, t: Tally,
             captured: int | None) -> list[dict[str, Any]]:
    """results.json's `timeline`, in mission-time order: after every model update its test
    accuracy, with the downlink bytes (the radio), the trainer links' bytes (the ground LAN:
    never summed with the radio's), images on the ground and scenes captured so far; and,
    with a horizon, the mission at its horizon (the accuracy of the last model finished by
    then, None when none was). A streaming update of several epochs is one entry, the model
    it finished; `history` has every epoch."""
    entries = [{"event": "update", "epoch": h["epoch"], "sim_time_s": h["sim_time_s"],
                "accuracy": h["accuracy"], "downlink_bytes": h.get("downlink_bytes"),
                "trainer_bytes": h.get("trainer_bytes"),
                "images_on_ground": h.get("images_on_ground"),
                "captured": h.get("captured", captured),
                **({"update": h["update"], "data_upto_s": h["upto_s"]} if "update" in h
                   else {})}
               for k, h in enumerate(history)
               # a streaming update's epochs: the model it finished (its last epoch)
               if "update" not in h or k + 1 == len(history)
               or history[k + 1].get("update") != h["update"]]
    if horizon_s is not None:
        done = _finished_by(history, horizon_s)
        entries.append({"event": "horizon", "epoch": done["epoch"] if done else None,
                        "sim_time_s": horizon_s,
                        "accuracy": done["accuracy"] if done else None,
                        "downlink_bytes": t.downlink_bytes,  # the downlink ends by then
                        "trainer_bytes": done.get("trainer_bytes", 0) if done else 0,
                        "images_on_ground": t.stored, "captured": captured})
    return sorted(entries, key=lambda e: (e["sim_time_s"], e["event"] == "horizon"))


def _finished_by(history: list[dict[str, Any]], horizon_s: float | None
                 ) -> dict[str, Any] | None:
    """The history entry of the last model finished by the horizon (the last one when there
    is none), None when none was finished by then."""
    done = [h for h in history if horizon_s is None or h["sim_time_s"] <= horizon_s]
    return done[-1] if done else None


def summary(results: dict[str, Any]) -> str:
    b = results["bytes"]
    s = results["samples"]
    return "\n".join([
        f"scenario        {results['scenario']}",
        f"final accuracy  {results['final_accuracy']:.4f}  (best {results['best_accuracy']:.4f},"
        f" {s['test']} test images)",
        f"bytes sent      {b['total']:,}  (downlink {b['downlink']:,}"
        + (f" of which call credentials {b['downlink_credentials']:,}"
           if b.get("downlink_credentials") else "")
        + f", uplink {b['uplink']:,},"
        + (f" resent {b['retransmitted']:,}," if b.get("retransmitted") else "")
        + (f" radio framing {b['framing']:,}," if b.get("framing") else "")
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
        *([_horizon_line(results)] if results.get("horizon_h") is not None else []),
        *([_captures_line(results["captures"])] if results.get("captures") else []),
        *([_modcods_line(results["modcods"])] if results.get("modcods") else []),
        *([_projection_line(results)] if results.get("projection") else []),
        *([_target_line(results)] if results.get("target_accuracy") else []),
        *([_energy_line(results["energy"])] if results.get("energy") else []),
        f"wall time       {results['wall_time_s']:.1f} s",
        *([f"not delivered   {_shortfall(results)}"] if results.get("shortfall") else []),
        *([f"trainer faults  {len(results['trainer_failures'])} failed calls (see "
           "results.json trainer_failures)"] if results.get("trainer_failures") else []),
    ])


def _energy_line(e: dict[str, Any]) -> str:
    """On-board energy an image, and its parts (sensors.energy; docs/pixels.md)."""
    if e.get("per_image_j") is None:
        return "energy on board none stored"
    parts = ", ".join(f"{k.replace('_', ' ')} {v * 1e3:.3g}" for k, v in e["per_image"].items()
                      if v)
    return f"energy on board {e['per_image_j'] * 1e3:.3g} mJ/image" + (f"  ({parts})" if parts
                                                                     else "")


def _projection_line(results: dict[str, Any]) -> str:
    p, up = results["projection"], results["bytes"]["uplink_breakdown"]
    b = p["basis"]
    stored = results["samples"]["stored"] or 1
    down = results["bytes"]["downlink"]
    fitted = (f"basis {b['method']} D={b['dim']} {b['quantizer']}"
              + (f"/{b['scale']}" if b["quantizer"] in ("int8", "int4") else "")
              + f" fitted on {b['fit_tokens']:,} tokens" if b else "no basis fitted")
    waits = ", ".join(f"{k} {v}" for k, v in p["basis_waits"].items()) or "none"
    return (f"projection      {fitted}; downlink {down / stored:.1f} B/image, uplink "
            f"{up['bases']:,} B bases + {up['codebooks']:,} codebooks + "
            f"{up['dictionaries']:,} dictionaries in {p['uplinks']} uplinks "
            f"({(up['bases'] + up['codebooks'] + up['dictionaries']) / stored:.2f} B/image); "
            f"waits for the basis: {waits}")


def _horizon_line(results: dict[str, Any]) -> str:
    acc = results.get("accuracy_at_horizon")
    left = results.get("left_on_board", {}).get("total", 0)
    return (f"horizon         {results['horizon_h']:g} h: "
            + (f"accuracy {acc:.4f} (the last model finished by then)" if acc is not None
               else "no model finished by then")
            + f", {left:,} samples left on board")


def _captures_line(c: dict[str, Any]) -> str:
    return (f"captures        captured {c['captured']:,}, dropped on board "
            f"{c['dropped_on_board']:,}, delivered {c['stored_on_ground']:,}, left on board "
            f"{c['left_on_board']:,}")


def _modcods_line(m: dict[str, dict[str, float]]) -> str:
    return "modcods         " + ", ".join(
        f"{name} {v['time_share']:.0%} ({v['seconds']:,.0f} s)" for name, v in m.items())


def _shortfall(results: dict[str, Any]) -> str:
    parts = [f"{sat} {v['undelivered']:,} samples (host {v['host']} gone)"
             for sat, v in sorted(results["shortfall"].items())]
    return "WARNING: " + ", ".join(parts)


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
