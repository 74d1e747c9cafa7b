"""Scenario files: YAML validated by pydantic (a misspelt key is an error, not a default)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from sparsat.node.data.clouds import PRESETS, CloudSpec
from sparsat.node.data.config import LOSSY, ImageCodecSpec
from sparsat.node.models.encoders import DEFAULT_ENCODER, ENCODERS


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def changed(self, *names: str) -> list[str]:
        """Those of `names` set to something other than their default (a resolved config
        spells every default out; those change nothing)."""
        fields = type(self).model_fields
        return [n for n in names
                if n in self.model_fields_set and getattr(self, n) != fields[n].get_default(
                    call_default_factory=True)]


class DatasetCfg(Model):
    name: Literal["fashion_mnist", "cifar10", "eurosat", "imagefolder"] = "fashion_mnist"
    root: str | None = None  # None: $SPARSAT_DATA or ~/.cache/sparsat/data
    download: bool = True
    train_subset: int | None = Field(None, ge=1)  # use the first N of a seeded permutation
    test_subset: int | None = Field(None, ge=1)
    # a validation split kept on the ground, from the training images no satellite holds (the
    # next ones of the seeded permutation train_subset takes from): the mission's best model
    # is chosen on it, never on the test set; 0: none (best = the last model)
    validation_subset: int = Field(0, ge=0)
    split_seed: int = 0
    # which satellite holds which image: `iid` (every n-th of the subset), or `dirichlet`:
    # each class split among the satellites in Dirichlet(alpha) proportions (label skew)
    placement: Literal["iid", "dirichlet"] = "iid"
    alpha: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _validation(self) -> DatasetCfg:
        if self.placement == "dirichlet" and self.alpha is None:
            raise ValueError("dataset.placement dirichlet needs dataset.alpha (e.g. 0.5)")
        if self.placement == "iid" and self.alpha is not None:
            raise ValueError("dataset.alpha applies to placement: dirichlet")
        if self.validation_subset and self.train_subset is None:
            raise ValueError("dataset.validation_subset is taken from the training images the "
                             "satellites do not hold: set dataset.train_subset below the "
                             "split's size")
        return self


class EncoderCfg(Model):
    name: str = DEFAULT_ENCODER
    # None: the encoder's default (vit_tiny_d8_patch4_28: the shipped MAE checkpoint;
    # mae_vit_base_patch16: timm's hub). "random": seeded random weights. "timm:NAME", or
    # the path of a checkpoint (e.g. the official mae_pretrain_vit_base.pth).
    weights: str | None = None
    seed: int = 0  # random weights only
    pooling: Literal["cls", "mean"] = "cls"  # CLS token, or mean of the visible tokens
    # what the encoder computes in, on board and at the ground station (training, validation
    # and test splits alike): bfloat16 (torch.autocast) where the hardware has it natively,
    # else float32, said in the log and recorded in results.json (encoder_precision)
    precision: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _known(self) -> EncoderCfg:
        if self.name not in ENCODERS:
            raise ValueError(f"unknown encoder {self.name!r}; known: {sorted(ENCODERS)}")
        return self


class MaskCfg(Model):
    """`fixed`: one mask per image. `random`: a new mask every epoch, so each image is
    downlinked once per epoch (training.epochs copies). `clouds`: procedural clouds at the
    image's native resolution; tokens more than `max_cloud` cloudy are dropped, then `ratio` of
    the clear ones. Cloud climatology: a `preset` (global, land, ocean: docs/clouds.md), any
    of whose numbers the keys below override."""

    kind: Literal["none", "fixed", "random", "clouds"] = "fixed"
    ratio: float = Field(0.5, ge=0.0, lt=1.0)
    preset: Literal["global", "land", "ocean"] = "global"
    cover_mean: float | None = Field(None, gt=0, lt=1)  # mean cloud fraction of a scene
    clear_share: float | None = Field(None, ge=0, lt=1)  # scenes with no cloud at all
    overcast_share: float | None = Field(None, ge=0, lt=1)  # scenes fully covered
    roughness: float | None = Field(None, ge=0, le=1)  # edge roughness (0.45: D = 1.33)
    max_cloud: float = Field(0.25, ge=0, lt=1)  # a token more cloudy than this is dropped
    # which tokens survive `ratio`: a seeded random draw, or (content) those whose tile's
    # pixel variance is highest, scored on board (fixed and clouds; docs/masks.md)
    choice: Literal["random", "content"] = "random"
    # clouds: which tokens are unusable: the true cloud field (oracle), or what an on-board
    # threshold detector fitted on the ground calls cloudy (it errs; docs/masks.md), fitted
    # on detector_fit_images training images no satellite holds
    detector: Literal["oracle", "threshold"] = "oracle"
    detector_fit_images: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _clouds(self) -> MaskCfg:
        cloud_keys = self.changed("preset", "cover_mean", "clear_share", "overcast_share",
                                  "roughness", "max_cloud", "detector")
        if self.kind != "clouds" and cloud_keys:
            raise ValueError(f"{', '.join(sorted(cloud_keys))} only apply to kind: clouds "
                             f"(kind is {self.kind})")
        if self.kind == "none" and self.changed("ratio") and self.ratio:
            raise ValueError("ratio has no effect with kind: none (use kind: fixed)")
        if self.kind == "clouds":
            self.cloud_spec()  # an infeasible climatology fails here, naming the numbers
        if self.detector == "oracle" and self.changed("detector_fit_images"):
            raise ValueError("detector_fit_images has no effect with detector: oracle")
        if self.choice == "content" and self.kind in ("none", "random"):
            why = ("every token is kept" if self.kind == "none" else
                   "a random mask is a fresh draw for every epoch's copy; content would send "
                   "the same tiles every epoch (use kind: fixed)")
            raise ValueError(f"choice: content has no effect with kind: {self.kind} ({why})")
        if self.choice == "content" and self.ratio == 0.0:
            raise ValueError("choice: content has no effect with ratio 0 (no token is dropped "
                             "on purpose, so none is chosen)")
        return self

    def cloud_spec(self) -> CloudSpec:
        base = PRESETS[self.preset]
        update = {k: getattr(self, k) for k in ("cover_mean", "clear_share", "overcast_share",
                                                "roughness") if getattr(self, k) is not None}
        return replace(base, **update)


class ProjectionCfg(Model):
    """CLS tokens projected to `dim` values and quantized on board, with a basis fitted on the
    ground and uplinked (sparsat.node.wire.basis)."""

    dim: int = Field(32, ge=1, le=4096)
    quantizer: Literal["int8", "int4", "sign", "pq"] = "int4"
    # int8 / int4: each token's scale as float32 or float16 on the wire, or one fixed scale
    # in the basis (no bytes; values past it are clipped)
    scale: Literal["float32", "float16", "fixed"] = "float16"
    # pca: fitted on unlabelled training images no satellite holds, before the mission;
    # supervised: on the first fit_samples labelled samples, which the satellites send as
    # cls_dtype tokens before the basis (their downlink counted)
    method: Literal["pca", "supervised"] = "pca"
    pq_subspaces: int | None = Field(None, ge=1)  # pq: M bytes a token; None: dim / 4
    pq_bits: int = Field(8, ge=1, le=8)
    fit_images: int = Field(5000, ge=2)
    fit_samples: int = Field(1000, ge=2)
    zstd_level: int = Field(0, ge=0, le=22)  # entropy-coded batches; 0: off
    zstd_dict_bytes: int = Field(4096, ge=256, le=1 << 20)

    @model_validator(mode="after")
    def _fits(self) -> ProjectionCfg:
        if self.quantizer == "pq" and self.pq_subspaces and self.dim % self.pq_subspaces:
            raise ValueError(f"pq_subspaces {self.pq_subspaces} does not divide dim {self.dim}")
        if self.quantizer not in ("int8", "int4") and self.changed("scale"):
            raise ValueError(f"scale has no effect with quantizer {self.quantizer}")
        if self.quantizer != "pq" and self.changed("pq_subspaces", "pq_bits"):
            raise ValueError("pq_subspaces and pq_bits have no effect without quantizer: pq")
        fit = self.fit_images if self.method == "pca" else self.fit_samples
        if self.quantizer == "pq" and fit < 2 ** self.pq_bits:
            raise ValueError(f"product quantization with {2 ** self.pq_bits} centroids needs "
                             f"at least as many fit tokens: raise fit_images / fit_samples "
                             f"({fit}) or lower pq_bits")
        if self.method == "pca" and self.changed("fit_samples"):
            raise ValueError("fit_samples has no effect with method: pca (fit_images)")
        if self.method == "supervised" and self.changed("fit_images"):
            raise ValueError("fit_images has no effect with method: supervised (fit_samples)")
        return self


class CodecCfg(Model):
    """How patch payloads code their pixels (docs/pixels.md): `raw` (the visible tiles'
    uint8 pixels), `png` (lossless), or a lossy codec at `quality`: webp, jpeg and jpegxl
    1..100, jpeg2k a target PSNR in dB (10..80)."""

    name: Literal["raw", "png", "webp", "jpeg", "jpeg2k", "jpegxl"] = "raw"
    quality: int | None = None
    # shared: each sample's stream goes without the header its shape and the settings fix
    # (made again on the ground; the same pixels arrive); png, webp, jpeg, jpeg2k
    header: Literal["inline", "shared"] = "inline"

    @model_validator(mode="after")
    def _quality(self) -> CodecCfg:
        lossy = self.name in LOSSY
        if lossy and self.quality is None:
            raise ValueError(f"codec {self.name} needs a quality")
        if not lossy and self.quality is not None:
            raise ValueError(f"codec {self.name} takes no quality (it is lossless)")
        ImageCodecSpec(self.name, self.quality or 0, self.header)  # ranges, named
        return self


class PayloadCfg(Model):
    kind: Literal["patches", "cls"] = "patches"
    cls_dtype: Literal["float32", "float16", "int8"] = "float16"
    projection: ProjectionCfg | None = None
    codec: CodecCfg | None = None  # patches only; None: raw

    @model_validator(mode="after")
    def _dtype(self) -> PayloadCfg:
        if self.kind == "patches" and self.changed("cls_dtype"):
            raise ValueError("cls_dtype has no effect with kind: patches")
        if self.kind == "patches" and self.projection is not None:
            raise ValueError("projection needs kind: cls (it projects CLS tokens)")
        if self.kind == "cls" and self.codec is not None:
            raise ValueError("codec needs kind: patches (it codes the visible tiles' pixels)")
        return self


class CaptureCfg(Model):
    """Captures over time (sparsat.node.data.capture): each satellite starts empty and
    captures `rate_per_h` scenes an hour (only the first duty_on_s of every duty_period_s,
    when given) until mission.horizon_h; what waits to be sent (payloads, raw scenes waiting
    for on-board encoding) lives in `storage_bytes`, and a capture that does not fit drops
    the oldest waiting sample (never one sent and not yet acked) or itself. When the shard is
    used up a capture is a revisit: a new sample id, a fresh mask and cloud field."""

    rate_per_h: float = Field(gt=0)
    storage_bytes: int = Field(gt=0)
    when_full: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    duty_on_s: float | None = Field(None, gt=0)
    duty_period_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _duty(self) -> CaptureCfg:
        if (self.duty_on_s is None) != (self.duty_period_s is None):
            raise ValueError("a duty cycle needs both duty_on_s and duty_period_s")
        if self.duty_on_s is not None and self.duty_on_s > self.duty_period_s:  # type: ignore[operator]
            raise ValueError("duty_on_s must not exceed duty_period_s")
        return self


class EnergyCfg(Model):
    """On-board energy per image (docs/pixels.md): the encoder's and the other on-board
    FLOPs (tile choice, cloud detection) at joules_per_flop; image coding (and zstd) as timed
    on the sensor hosts, times coding_slowdown (a satellite's payload computer against the
    host's core), at coding_watts; the radio at radio_watts for every second on the air."""

    # 10 pJ/FLOP: an edge GPU of the Jetson class, ~10 W at the 1 TFLOP/s of onboard_flops
    joules_per_flop: float = Field(1.0e-11, gt=0)
    coding_watts: float = Field(2.0, gt=0)  # one core of a payload computer, busy
    coding_slowdown: float = Field(10.0, gt=0)  # its coding time over the host's (measured)
    radio_watts: float = Field(5.0, gt=0)  # a small S-band transmitter's DC draw on the air


class SensorsCfg(Model):
    count: int = Field(4, ge=1)
    prefix: str = "sat-"
    per_process: int = Field(16, ge=1)  # satellites hosted by one sensor process
    mask: MaskCfg = MaskCfg()
    payload: PayloadCfg = PayloadCfg()
    # on-board encoder throughput for CLS payloads, FLOP/s: an edge GPU of the Jetson class
    # (order 1 TFLOP/s fp32); puts the satellites' encoding on the mission clock
    onboard_flops: float = Field(1.0e12, gt=0)
    capture: CaptureCfg | None = None  # None: every satellite holds its shard at t = 0
    energy: EnergyCfg = EnergyCfg()

    def ids(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(self.count)]


class PassesCfg(Model):
    """Placeholder pass model: satellite i is in view for duration_s every period_s."""

    period_s: float = Field(5_700.0, gt=0)  # ~95 min low Earth orbit
    duration_s: float = Field(600.0, gt=0)  # ~10 min pass
    offset_s: float | None = None  # None: staggered, i * period / count

    @model_validator(mode="after")
    def _fits(self) -> PassesCfg:
        if self.duration_s > self.period_s:
            raise ValueError("duration_s must not exceed period_s")
        return self


class WalkerCfg(Model):
    """Walker-delta i:t/p/f: `planes` x `per_plane` circular orbits."""

    planes: int = Field(ge=1)
    per_plane: int = Field(ge=1)
    phasing: int = Field(0, ge=0)  # f: adjacent planes shifted by f * 360 / t in anomaly
    altitude_km: float = Field(gt=100)
    inclination_deg: float = Field(ge=0, le=180)

    @model_validator(mode="after")
    def _phasing(self) -> WalkerCfg:
        if self.phasing >= self.planes:
            raise ValueError(f"phasing must be in [0, planes - 1], got {self.phasing}")
        return self


class StationCfg(Model):
    name: str
    lat_deg: float = Field(ge=-90, le=90)
    lon_deg: float = Field(ge=-180, le=360)
    alt_m: float = 0.0
    min_elevation_deg: float = Field(10.0, ge=0, lt=90)
    antennas: int = Field(1, ge=1)  # satellites in view at once queue for these


class OrbitsCfg(Model):
    """The constellation (a Walker pattern or a TLE file, satellites in sensor-id order) and
    the ground stations. Contact windows come from SGP4: `sparsat contacts`."""

    epoch: AwareDatetime = datetime.fromisoformat("2026-01-01T00:00:00+00:00")
    walker: WalkerCfg | None = None
    tle: str | None = None  # two/three-line element sets, one per satellite, in order
    stations: list[StationCfg] = Field(min_length=1)
    step_s: float = Field(30.0, gt=0)  # coarse grid of the window search
    tolerance_s: float = Field(1.0, gt=0)  # window edges refined to this

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "horizon_h" in data:
            raise ValueError("orbits.horizon_h is now mission.horizon_h (a top-level key, for "
                             "periodic passes and orbits alike): move it there")
        return data

    @model_validator(mode="after")
    def _one_source(self) -> OrbitsCfg:
        if (self.walker is None) == (self.tle is None):
            raise ValueError("orbits needs exactly one of walker or tle")
        names = [st.name for st in self.stations]
        if len(set(names)) != len(names):
            raise ValueError(f"station names must be unique: {names}")
        return self


class ModcodCfg(Model):
    table: Literal["dvb-s2"] = "dvb-s2"
    margin_db: float = Field(1.0, ge=0)  # above each MODCOD's ideal Es/N0
    rolloff: float = Field(0.2, gt=0, le=1)  # root-raised-cosine: symbol rate B / (1 + a)
    # each Transmit in a contact window covers at most this many seconds, so the MODCOD is
    # chosen again as the geometry changes over the pass (None: one Transmit may fill the
    # rest of the window at the MODCOD of its start)
    replan_s: float | None = Field(None, gt=0)


class BudgetCfg(Model):
    """Downlink budget: the rate follows the slant range (sparsat.sim.space.links.LinkBudget)."""

    frequency_hz: float = Field(gt=0)
    eirp_dbw: float
    gt_dbk: float
    bandwidth_hz: float = Field(gt=0)
    losses_db: float = Field(3.0, ge=0)
    # adaptive modulation: the rate from a DVB-S2 MODCOD chosen at every call from the
    # geometry (ETSI EN 302 307 thresholds + margin_db), instead of Shannon's capacity
    modcod: ModcodCfg | None = None


FRAMINGS = {  # (payload, header, trailer bytes per frame, FEC code rate)
    # AX.25 UI frame carrying CSP: flag, addresses, control, PID (17) and the CSP header (4);
    # FCS and flag (3); 252 of the 256-byte information field left for data
    "ax25": (252, 21, 3, 1.0),
    # CCSDS TM transfer frame of 1,115 bytes: attached sync marker (4) and primary header (6),
    # frame error control (2); Reed-Solomon (255, 223)
    "ccsds": (1103, 10, 2, 223 / 255),
}


class FramingCfg(Model):
    """The radio's framing, charged on top of the gRPC bytes (bytes.framing): `kind` gives
    the defaults (FRAMINGS), any of which the keys override. Frame loss (links.downlink.loss)
    is per frame of `payload_bytes`; every resent frame pays its overhead again."""

    kind: Literal["ax25", "ccsds"]
    payload_bytes: int | None = Field(None, ge=1)
    header_bytes: int | None = Field(None, ge=0)
    trailer_bytes: int | None = Field(None, ge=0)
    fec_rate: float | None = Field(None, gt=0, le=1)

    def layout(self) -> tuple[int, int, int, float]:
        base = FRAMINGS[self.kind]
        mine = (self.payload_bytes, self.header_bytes, self.trailer_bytes, self.fec_rate)
        return tuple(b if m is None else m for b, m in zip(base, mine, strict=True))  # type: ignore[return-value]


BATCH_AIRTIME_S = 10.0  # a downlink batch's default length on the air


class LinkCfg(Model):
    rate_bps: float = Field(gt=0)  # the modem's rate (the cap when a budget is given)
    latency_s: float = Field(0.0, ge=0)  # with orbits: processing only, + slant range / c
    loss: float = Field(0.0, ge=0, lt=1)  # frame loss probability, lost frames resent
    frame_bytes: int = Field(256, ge=1)
    budget: BudgetCfg | None = None  # orbits only: rate from slant range
    # largest downlink batch (wire bytes, its ack's room included); a sample too big for one
    # travels alone. Unset: BATCH_AIRTIME_S of the modem's rate, 4 KiB to 4 MiB. Big batches
    # amortise the per-batch bytes, the link's latency and the ground's per-message cost; a
    # stream cut mid-batch resends the whole batch.
    batch_bytes: int | None = Field(None, ge=256, le=16 * 1024 * 1024)
    framing: FramingCfg | None = None  # None: the gRPC bytes are what the radio sends

    @model_validator(mode="after")
    def _frames(self) -> LinkCfg:
        if self.framing is not None and self.changed("frame_bytes"):
            raise ValueError("links.downlink.frame_bytes has no effect with framing: frames "
                             "are framing.payload_bytes long")
        return self

    def batch_size(self) -> int:
        if self.batch_bytes is not None:
            return self.batch_bytes
        return int(min(4 << 20, max(4 << 10, self.rate_bps / 8 * BATCH_AIRTIME_S)))


class TrainerLinkCfg(Model):
    """Ground station <-> trainer: a wired link with no frame loss or link budget."""

    rate_bps: float = Field(gt=0)
    latency_s: float = Field(0.0, ge=0)


class UplinkCfg(Model):
    """Ground station -> satellite: what the ground uplinks (bases, codebooks, dictionaries)
    is charged on it, inside the satellite's windows, before the contact's downlink."""

    rate_bps: float = Field(gt=0)
    latency_s: float = Field(0.0, ge=0)  # with orbits: processing only, + slant range / c


class LinksCfg(Model):
    downlink: LinkCfg = LinkCfg(rate_bps=1_000_000, latency_s=0.01)
    # None: the downlink's rate and latency (acks are counted in bytes, not timed, as before)
    uplink: UplinkCfg | None = None
    trainer: TrainerLinkCfg = TrainerLinkCfg(rate_bps=1_000_000_000, latency_s=0.001)


class EveryCfg(Model):
    every_s: float = Field(gt=0)  # an update every this many mission seconds (coalesced)


class UpdateCfg(Model):
    """What one update of a streaming schedule trains: `epochs` epochs over every sample
    stored so far, or (`replay`) one pass over the samples new since the last update plus
    `replay_share` times as many older ones, drawn afresh each update."""

    kind: Literal["epochs", "replay"] = "epochs"
    epochs: int = Field(1, ge=1)
    replay_share: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _keys(self) -> UpdateCfg:
        if self.kind == "epochs" and self.changed("replay_share"):
            raise ValueError("training.update.replay_share applies to kind: replay")
        if self.kind == "replay" and self.changed("epochs"):
            raise ValueError("training.update.epochs applies to kind: epochs")
        return self


class TrainingCfg(Model):
    strategy: Literal["centralized", "ist", "local_sgd"] = "ist"
    workers: int = Field(2, ge=1)  # K (ist, local_sgd); centralized uses one trainer
    local_steps: int = Field(10, ge=1)
    # Adam state: `travel` ships each piece's moments with its weights, `reset` starts
    # every round from fresh moments (nothing extra sent)
    # (default: travel for centralized, where it is plain Adam; reset for ist and local_sgd)
    moments: Literal["travel", "reset"] | None = None
    subnet_scale: Literal["none", "k"] = "none"  # ist: hidden outputs x K while training
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    hidden: tuple[int, int] = (1000, 1000)
    device: str = "auto"  # trainer nodes started by `sparsat run`
    # torch's CPU threads in every trainer: the order of a matmul's sums follows it, so
    # trainers with other counts drift apart within a few epochs; one count for every
    # trainer, local or deployed, gives equal results (1: what `sparsat run` gave a trainer
    # on a 2-core machine with K = 2 before this field existed)
    threads: int = Field(1, ge=1)
    round_timeout_s: float = Field(600.0, gt=0)
    target_accuracy: float | None = Field(None, gt=0, le=1)  # results: time_to_accuracy_s
    # a trainer's sustained throughput, FLOP/s, for the compute part of a round on the mission
    # clock (the measured wall time is recorded beside it). Default: the paper's Tesla P100,
    # 9.3 TFLOP/s fp32 peak; small MLPs reach a fraction of it, so set what yours sustain
    trainer_flops: float = Field(9.3e12, gt=0)
    ground_flops: float = Field(9.3e12, gt=0)  # the ground station's encoder stage, FLOP/s
    # when the model trains: `after_downlink` (once everything is down, or at the horizon:
    # `epochs` epochs), or while data arrives: `per_pass` (after each contact window or pass
    # that brought data down) or `{every_s: T}`; an update starts only when the trainers are
    # idle and new data has arrived, so triggers that come meanwhile make one update
    schedule: Literal["after_downlink", "per_pass"] | EveryCfg = "after_downlink"
    update: UpdateCfg = UpdateCfg()  # streaming schedules: the work of one update

    @property
    def num_workers(self) -> int:
        return 1 if self.strategy == "centralized" else self.workers

    @property
    def streaming(self) -> bool:
        return self.schedule != "after_downlink"

    @property
    def every_s(self) -> float | None:
        return self.schedule.every_s if isinstance(self.schedule, EveryCfg) else None


# Without mission.horizon_h, contact windows are searched this far ahead; a satellite with
# samples left after its last window is then an error that says what to set
WINDOW_SEARCH_H = 48.0


class MissionCfg(Model):
    """The mission as a whole. `horizon_h`: it ends this long after t = 0 whatever is still
    on board (counted, not an error), for periodic passes and orbits alike (contact windows
    are computed up to it); None: it lasts until every satellite's queue is down (today's
    missions), contact windows searched WINDOW_SEARCH_H ahead."""

    horizon_h: float | None = Field(None, gt=0)

    @property
    def horizon_s(self) -> float | None:
        return None if self.horizon_h is None else self.horizon_h * 3600.0

    def window_span_s(self) -> float:
        """How far ahead contact windows are computed."""
        return (self.horizon_h if self.horizon_h is not None else WINDOW_SEARCH_H) * 3600.0


class Scenario(Model):
    name: str
    seed: int = 0
    dataset: DatasetCfg = DatasetCfg()
    encoder: EncoderCfg = EncoderCfg()
    sensors: SensorsCfg = SensorsCfg()
    passes: PassesCfg = PassesCfg()
    links: LinksCfg = LinksCfg()
    training: TrainingCfg = TrainingCfg()
    orbits: OrbitsCfg | None = None  # None: the periodic pass placeholder (`passes`)
    mission: MissionCfg = MissionCfg()

    @model_validator(mode="after")
    def _constellation(self) -> Scenario:
        w = self.orbits.walker if self.orbits else None
        if w is not None and w.planes * w.per_plane != self.sensors.count:
            raise ValueError(f"orbits.walker has {w.planes * w.per_plane} satellites, "
                             f"sensors.count is {self.sensors.count}")
        return self

    @model_validator(mode="after")
    def _no_dead_settings(self) -> Scenario:
        """A setting that would change nothing is an error, not silently ignored."""
        down = self.links.downlink
        if self.orbits is None and down.budget is not None:
            raise ValueError("links.downlink.budget needs an `orbits` section (the rate "
                             "follows the slant range); without orbits use rate_bps")
        if self.orbits is not None and self.changed("passes"):
            raise ValueError("`passes` has no effect with an `orbits` section (contact "
                             "windows come from the orbits): remove one of them")
        if self.orbits is None and down.changed("frame_bytes") and down.loss == 0:
            raise ValueError("links.downlink.frame_bytes has no effect without loss")
        t = self.training
        if t.strategy != "ist" and t.changed("subnet_scale"):
            raise ValueError(f"training.subnet_scale has no effect with strategy {t.strategy}")
        if self.sensors.payload.kind != "cls" and self.sensors.changed("onboard_flops"):
            raise ValueError("sensors.onboard_flops has no effect with patch payloads (the "
                             "satellites do not encode)")
        sensors, pay = self.sensors, self.sensors.payload
        coding = ((pay.kind == "patches" and pay.codec is not None and pay.codec.name != "raw")
                  or (pay.projection is not None and pay.projection.zstd_level > 0))
        if not coding and sensors.energy.changed("coding_watts", "coding_slowdown"):
            raise ValueError("sensors.energy coding_watts and coding_slowdown have no effect: "
                             "nothing is coded on board (no payload.codec, no zstd batches)")
        flops = (pay.kind == "cls" or sensors.mask.choice == "content"
                 or sensors.mask.detector != "oracle")
        if not flops and sensors.energy.changed("joules_per_flop"):
            raise ValueError("sensors.energy joules_per_flop has no effect: nothing computes "
                             "on board (patch payloads, random tiles, no cloud detector)")
        e = self.encoder
        if e.weights != "random" and e.changed("seed"):
            raise ValueError("encoder.seed only seeds random weights (weights: random)")
        return self

    @model_validator(mode="after")
    def _stream(self) -> Scenario:
        t, cap = self.training, self.sensors.capture
        if cap is not None and self.mission.horizon_h is None:
            raise ValueError("sensors.capture needs mission.horizon_h (captures go on until the "
                             "mission ends)")
        if not t.streaming and t.changed("update"):
            raise ValueError("training.update is the work of a streaming schedule's update: "
                             "set training.schedule (per_pass or every_s), or remove it")
        if t.streaming and t.changed("epochs"):
            raise ValueError("training.epochs is after_downlink's; a streaming schedule trains "
                             "training.update.epochs per update")
        h = self.mission.horizon_s
        if t.every_s is not None and h is not None and t.every_s >= h:
            raise ValueError(f"training.schedule every_s {t.every_s:g} s is not before the "
                             f"horizon ({h:g} s): no update would start; lower it")
        if self.sensors.mask.kind == "random" and cap is None and t.streaming:
            raise ValueError("mask kind random means a new mask every epoch, which has no "
                             "meaning in a streaming schedule without captures; with "
                             "sensors.capture every capture (revisits too) gets a fresh mask")
        proj = self.sensors.payload.projection
        if proj is not None and proj.method == "supervised" and t.streaming:
            raise ValueError("a supervised projection is fitted mid-mission, and a streaming "
                             "schedule's test split is read before that: use method pca, or "
                             "schedule after_downlink")
        if self.sensors.mask.detector != "oracle" and self.dataset.train_subset is None:
            raise ValueError("a cloud detector is fitted on training images no satellite "
                             "holds: set dataset.train_subset")
        if proj is not None and proj.method == "pca" and self.dataset.train_subset is None:
            raise ValueError("a pca projection is fitted on training images no satellite "
                             "holds: set dataset.train_subset")
        return self

    @model_validator(mode="after")
    def _workers(self) -> Scenario:
        t = self.training
        if t.strategy in ("ist", "local_sgd") and t.workers < 2:
            raise ValueError(f"{t.strategy} needs workers >= 2 (use strategy: centralized "
                             "for one)")
        if t.strategy == "ist" and min(t.hidden) < t.workers:
            raise ValueError("each hidden layer needs at least one neuron per worker")
        return self


class ScenarioError(ValueError):
    pass


def load(path: str | Path) -> Scenario:
    path = Path(path)
    if not path.exists():
        raise ScenarioError(f"scenario file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
        scenario = Scenario.model_validate(raw if raw is not None else {})
    except yaml.YAMLError as e:
        raise ScenarioError(f"{path}: not valid YAML: {e}") from e
    except ValidationError as e:
        raise ScenarioError(f"{path}: {e}") from e
    o = scenario.orbits
    if o is not None and o.tle is not None and not Path(o.tle).is_absolute():
        # a TLE file named in a scenario is found beside the scenario
        tle = str((path.parent / o.tle).resolve())
        scenario = scenario.model_copy(update={"orbits": o.model_copy(update={"tle": tle})})
    return scenario


def dump(scenario: Scenario) -> str:
    return yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False)
