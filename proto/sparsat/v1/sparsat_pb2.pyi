from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    UINT16: _ClassVar[DType]
    INT64: _ClassVar[DType]

class RejectCause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECT_CAUSE_UNSPECIFIED: _ClassVar[RejectCause]
    BAD_STRUCTURE: _ClassVar[RejectCause]
    BAD_LAST_ID: _ClassVar[RejectCause]
    SATELLITE_CHANGED: _ClassVar[RejectCause]
    NOT_REGISTERED: _ClassVar[RejectCause]
    BAD_ID: _ClassVar[RejectCause]
    REPEATED_ID: _ClassVar[RejectCause]
    NOT_YOURS: _ClassVar[RejectCause]
    BAD_LABEL: _ClassVar[RejectCause]
    BAD_CODE: _ClassVar[RejectCause]
    BAD_PIXELS: _ClassVar[RejectCause]
    BAD_TOKEN: _ClassVar[RejectCause]
    BAD_SCALE: _ClassVar[RejectCause]
    CONFLICT: _ClassVar[RejectCause]
    BAD_BASIS: _ClassVar[RejectCause]

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    SENSOR: _ClassVar[Role]
    TRAINER: _ClassVar[Role]
    GROUND_STATION: _ClassVar[Role]

class PayloadKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYLOAD_UNSPECIFIED: _ClassVar[PayloadKind]
    PAYLOAD_PATCHES: _ClassVar[PayloadKind]
    PAYLOAD_CLS: _ClassVar[PayloadKind]

class ImageCodec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_CODEC_RAW: _ClassVar[ImageCodec]
    IMAGE_CODEC_PNG: _ClassVar[ImageCodec]
    IMAGE_CODEC_WEBP: _ClassVar[ImageCodec]
    IMAGE_CODEC_JPEG: _ClassVar[ImageCodec]
    IMAGE_CODEC_JPEG2K: _ClassVar[ImageCodec]
    IMAGE_CODEC_JPEGXL: _ClassVar[ImageCodec]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
INT8: DType
UINT8: DType
UINT16: DType
INT64: DType
REJECT_CAUSE_UNSPECIFIED: RejectCause
BAD_STRUCTURE: RejectCause
BAD_LAST_ID: RejectCause
SATELLITE_CHANGED: RejectCause
NOT_REGISTERED: RejectCause
BAD_ID: RejectCause
REPEATED_ID: RejectCause
NOT_YOURS: RejectCause
BAD_LABEL: RejectCause
BAD_CODE: RejectCause
BAD_PIXELS: RejectCause
BAD_TOKEN: RejectCause
BAD_SCALE: RejectCause
CONFLICT: RejectCause
BAD_BASIS: RejectCause
ROLE_UNSPECIFIED: Role
SENSOR: Role
TRAINER: Role
GROUND_STATION: Role
PAYLOAD_UNSPECIFIED: PayloadKind
PAYLOAD_PATCHES: PayloadKind
PAYLOAD_CLS: PayloadKind
IMAGE_CODEC_RAW: ImageCodec
IMAGE_CODEC_PNG: ImageCodec
IMAGE_CODEC_WEBP: ImageCodec
IMAGE_CODEC_JPEG: ImageCodec
IMAGE_CODEC_JPEG2K: ImageCodec
IMAGE_CODEC_JPEGXL: ImageCodec

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data", "scale")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    scale: float
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ..., scale: _Optional[float] = ...) -> None: ...

class DownlinkBatch(_message.Message):
    __slots__ = ("satellite_id", "ids", "labels", "patches", "rle", "shapes", "tokens", "scales", "last_id", "transmit_id", "basis", "dictionary")
    SATELLITE_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PATCHES_FIELD_NUMBER: _ClassVar[int]
    RLE_FIELD_NUMBER: _ClassVar[int]
    SHAPES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    LAST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSMIT_ID_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    satellite_id: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedScalarFieldContainer[int]
    patches: _containers.RepeatedScalarFieldContainer[bytes]
    rle: bytes
    shapes: _containers.RepeatedScalarFieldContainer[int]
    tokens: bytes
    scales: bytes
    last_id: int
    transmit_id: int
    basis: int
    dictionary: int
    def __init__(self, satellite_id: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[int]] = ..., patches: _Optional[_Iterable[bytes]] = ..., rle: _Optional[bytes] = ..., shapes: _Optional[_Iterable[int]] = ..., tokens: _Optional[bytes] = ..., scales: _Optional[bytes] = ..., last_id: _Optional[int] = ..., transmit_id: _Optional[int] = ..., basis: _Optional[int] = ..., dictionary: _Optional[int] = ...) -> None: ...

class Rejected(_message.Message):
    __slots__ = ("position", "code", "reason", "cause")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    position: int
    code: int
    reason: str
    cause: RejectCause
    def __init__(self, position: _Optional[int] = ..., code: _Optional[int] = ..., reason: _Optional[str] = ..., cause: _Optional[_Union[RejectCause, str]] = ...) -> None: ...

class BatchAck(_message.Message):
    __slots__ = ("stored", "duplicate_runs", "rejected")
    STORED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_RUNS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    duplicate_runs: _containers.RepeatedScalarFieldContainer[int]
    rejected: _containers.RepeatedCompositeFieldContainer[Rejected]
    def __init__(self, stored: _Optional[int] = ..., duplicate_runs: _Optional[_Iterable[int]] = ..., rejected: _Optional[_Iterable[_Union[Rejected, _Mapping]]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("node_id", "role", "address", "satellite_ids", "device")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SATELLITE_IDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: Role
    address: str
    satellite_ids: _containers.RepeatedScalarFieldContainer[str]
    device: str
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., address: _Optional[str] = ..., satellite_ids: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("config_json", "instance", "sensor", "revoked")
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    SENSOR_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    config_json: str
    instance: str
    sensor: SensorSetup
    revoked: bytes
    def __init__(self, config_json: _Optional[str] = ..., instance: _Optional[str] = ..., sensor: _Optional[_Union[SensorSetup, _Mapping]] = ..., revoked: _Optional[bytes] = ...) -> None: ...

class SatelliteImages(_message.Message):
    __slots__ = ("satellite_id", "index_deltas")
    SATELLITE_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_DELTAS_FIELD_NUMBER: _ClassVar[int]
    satellite_id: str
    index_deltas: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, satellite_id: _Optional[str] = ..., index_deltas: _Optional[_Iterable[int]] = ...) -> None: ...

class SensorSetup(_message.Message):
    __slots__ = ("n_train", "grid", "copies", "payload", "cls_dim", "cls_dtype", "tile_rows", "tile_cols", "satellites", "projected", "send_unprojected", "codec", "codec_quality", "codec_header_shared", "codec_header")
    N_TRAIN_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CLS_DIM_FIELD_NUMBER: _ClassVar[int]
    CLS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TILE_ROWS_FIELD_NUMBER: _ClassVar[int]
    TILE_COLS_FIELD_NUMBER: _ClassVar[int]
    SATELLITES_FIELD_NUMBER: _ClassVar[int]
    PROJECTED_FIELD_NUMBER: _ClassVar[int]
    SEND_UNPROJECTED_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CODEC_QUALITY_FIELD_NUMBER: _ClassVar[int]
    CODEC_HEADER_SHARED_FIELD_NUMBER: _ClassVar[int]
    CODEC_HEADER_FIELD_NUMBER: _ClassVar[int]
    n_train: int
    grid: int
    copies: int
    payload: PayloadKind
    cls_dim: int
    cls_dtype: DType
    tile_rows: _containers.RepeatedScalarFieldContainer[int]
    tile_cols: _containers.RepeatedScalarFieldContainer[int]
    satellites: _containers.RepeatedCompositeFieldContainer[SatelliteImages]
    projected: bool
    send_unprojected: bool
    codec: ImageCodec
    codec_quality: int
    codec_header_shared: bool
    codec_header: bytes
    def __init__(self, n_train: _Optional[int] = ..., grid: _Optional[int] = ..., copies: _Optional[int] = ..., payload: _Optional[_Union[PayloadKind, str]] = ..., cls_dim: _Optional[int] = ..., cls_dtype: _Optional[_Union[DType, str]] = ..., tile_rows: _Optional[_Iterable[int]] = ..., tile_cols: _Optional[_Iterable[int]] = ..., satellites: _Optional[_Iterable[_Union[SatelliteImages, _Mapping]]] = ..., projected: _Optional[bool] = ..., send_unprojected: _Optional[bool] = ..., codec: _Optional[_Union[ImageCodec, str]] = ..., codec_quality: _Optional[int] = ..., codec_header_shared: _Optional[bool] = ..., codec_header: _Optional[bytes] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "role", "address", "satellite_ids", "device")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SATELLITE_IDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: Role
    address: str
    satellite_ids: _containers.RepeatedScalarFieldContainer[str]
    device: str
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., address: _Optional[str] = ..., satellite_ids: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesReply(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("node_id", "role", "ready", "bytes_received", "bytes_sent", "instance")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: Role
    ready: bool
    bytes_received: int
    bytes_sent: int
    instance: str
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., ready: _Optional[bool] = ..., bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., instance: _Optional[str] = ...) -> None: ...

class TransmitRequest(_message.Message):
    __slots__ = ("satellite_id", "max_bytes", "max_samples", "batch_bytes", "mission_time_s", "transmit_id", "basis", "dictionary")
    SATELLITE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    MISSION_TIME_S_FIELD_NUMBER: _ClassVar[int]
    TRANSMIT_ID_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    satellite_id: str
    max_bytes: int
    max_samples: int
    batch_bytes: int
    mission_time_s: float
    transmit_id: int
    basis: Basis
    dictionary: bytes
    def __init__(self, satellite_id: _Optional[str] = ..., max_bytes: _Optional[int] = ..., max_samples: _Optional[int] = ..., batch_bytes: _Optional[int] = ..., mission_time_s: _Optional[float] = ..., transmit_id: _Optional[int] = ..., basis: _Optional[_Union[Basis, _Mapping]] = ..., dictionary: _Optional[bytes] = ...) -> None: ...

class Basis(_message.Message):
    __slots__ = ("version", "quantizer", "scale", "method", "embed_dim", "dim", "mean", "components", "fixed_scale", "levels", "pq_subspaces", "pq_bits", "codebooks")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    QUANTIZER_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    FIXED_SCALE_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    PQ_SUBSPACES_FIELD_NUMBER: _ClassVar[int]
    PQ_BITS_FIELD_NUMBER: _ClassVar[int]
    CODEBOOKS_FIELD_NUMBER: _ClassVar[int]
    version: int
    quantizer: str
    scale: str
    method: str
    embed_dim: int
    dim: int
    mean: bytes
    components: bytes
    fixed_scale: float
    levels: bytes
    pq_subspaces: int
    pq_bits: int
    codebooks: bytes
    def __init__(self, version: _Optional[int] = ..., quantizer: _Optional[str] = ..., scale: _Optional[str] = ..., method: _Optional[str] = ..., embed_dim: _Optional[int] = ..., dim: _Optional[int] = ..., mean: _Optional[bytes] = ..., components: _Optional[bytes] = ..., fixed_scale: _Optional[float] = ..., levels: _Optional[bytes] = ..., pq_subspaces: _Optional[int] = ..., pq_bits: _Optional[int] = ..., codebooks: _Optional[bytes] = ...) -> None: ...

class TransmitReport(_message.Message):
    __slots__ = ("satellite_id", "batch_bytes", "acked", "duplicates", "remaining", "next_bytes", "ack_bytes", "error_code", "error", "encode_flops", "encode_s", "skipped", "sent", "rejected", "rejections", "credential_bytes", "encoder_precision", "captured", "dropped", "onboard_bytes", "next_capture_s", "basis_version", "waiting_basis", "code_s", "coded_pixels", "onboard_flops")
    SATELLITE_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    NEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ENCODE_FLOPS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_S_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENCODER_PRECISION_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    ONBOARD_BYTES_FIELD_NUMBER: _ClassVar[int]
    NEXT_CAPTURE_S_FIELD_NUMBER: _ClassVar[int]
    BASIS_VERSION_FIELD_NUMBER: _ClassVar[int]
    WAITING_BASIS_FIELD_NUMBER: _ClassVar[int]
    CODE_S_FIELD_NUMBER: _ClassVar[int]
    CODED_PIXELS_FIELD_NUMBER: _ClassVar[int]
    ONBOARD_FLOPS_FIELD_NUMBER: _ClassVar[int]
    satellite_id: str
    batch_bytes: _containers.RepeatedScalarFieldContainer[int]
    acked: int
    duplicates: int
    remaining: int
    next_bytes: int
    ack_bytes: _containers.RepeatedScalarFieldContainer[int]
    error_code: int
    error: str
    encode_flops: int
    encode_s: float
    skipped: int
    sent: int
    rejected: int
    rejections: _containers.RepeatedScalarFieldContainer[str]
    credential_bytes: int
    encoder_precision: str
    captured: int
    dropped: int
    onboard_bytes: int
    next_capture_s: float
    basis_version: int
    waiting_basis: bool
    code_s: float
    coded_pixels: int
    onboard_flops: int
    def __init__(self, satellite_id: _Optional[str] = ..., batch_bytes: _Optional[_Iterable[int]] = ..., acked: _Optional[int] = ..., duplicates: _Optional[int] = ..., remaining: _Optional[int] = ..., next_bytes: _Optional[int] = ..., ack_bytes: _Optional[_Iterable[int]] = ..., error_code: _Optional[int] = ..., error: _Optional[str] = ..., encode_flops: _Optional[int] = ..., encode_s: _Optional[float] = ..., skipped: _Optional[int] = ..., sent: _Optional[int] = ..., rejected: _Optional[int] = ..., rejections: _Optional[_Iterable[str]] = ..., credential_bytes: _Optional[int] = ..., encoder_precision: _Optional[str] = ..., captured: _Optional[int] = ..., dropped: _Optional[int] = ..., onboard_bytes: _Optional[int] = ..., next_capture_s: _Optional[float] = ..., basis_version: _Optional[int] = ..., waiting_basis: _Optional[bool] = ..., code_s: _Optional[float] = ..., coded_pixels: _Optional[int] = ..., onboard_flops: _Optional[int] = ...) -> None: ...

class DatasetChunk(_message.Message):
    __slots__ = ("dataset_id", "total_rows", "features", "labels", "base_id", "base_rows")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BASE_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_ROWS_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    total_rows: int
    features: Tensor
    labels: Tensor
    base_id: str
    base_rows: int
    def __init__(self, dataset_id: _Optional[str] = ..., total_rows: _Optional[int] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., base_id: _Optional[str] = ..., base_rows: _Optional[int] = ...) -> None: ...

class LoadDatasetReply(_message.Message):
    __slots__ = ("dataset_id", "rows")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    rows: int
    def __init__(self, dataset_id: _Optional[str] = ..., rows: _Optional[int] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor", "more")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    more: bool
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., more: _Optional[bool] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("dataset_id", "round", "worker", "steps", "batch_size", "lr", "seed", "offset", "rows", "params", "moments", "hidden_scale", "order_start", "order_replay")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MOMENTS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SCALE_FIELD_NUMBER: _ClassVar[int]
    ORDER_START_FIELD_NUMBER: _ClassVar[int]
    ORDER_REPLAY_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    round: int
    worker: int
    steps: int
    batch_size: int
    lr: float
    seed: int
    offset: int
    rows: int
    params: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    moments: AdamState
    hidden_scale: float
    order_start: int
    order_replay: int
    def __init__(self, dataset_id: _Optional[str] = ..., round: _Optional[int] = ..., worker: _Optional[int] = ..., steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., seed: _Optional[int] = ..., offset: _Optional[int] = ..., rows: _Optional[int] = ..., params: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., moments: _Optional[_Union[AdamState, _Mapping]] = ..., hidden_scale: _Optional[float] = ..., order_start: _Optional[int] = ..., order_replay: _Optional[int] = ...) -> None: ...

class AdamState(_message.Message):
    __slots__ = ("exp_avg", "exp_avg_sq", "step")
    EXP_AVG_FIELD_NUMBER: _ClassVar[int]
    EXP_AVG_SQ_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    exp_avg: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    exp_avg_sq: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    step: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, exp_avg: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., exp_avg_sq: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., step: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class TrainReply(_message.Message):
    __slots__ = ("params", "steps_done", "mean_loss", "moments")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_FIELD_NUMBER: _ClassVar[int]
    MOMENTS_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    steps_done: int
    mean_loss: float
    moments: AdamState
    def __init__(self, params: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., steps_done: _Optional[int] = ..., mean_loss: _Optional[float] = ..., moments: _Optional[_Union[AdamState, _Mapping]] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("stream", "upto_s")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    UPTO_S_FIELD_NUMBER: _ClassVar[int]
    stream: bool
    upto_s: float
    def __init__(self, stream: _Optional[bool] = ..., upto_s: _Optional[float] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "done", "total", "flops", "wall_s", "cached")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    WALL_S_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    stage: str
    done: int
    total: int
    flops: int
    wall_s: float
    cached: bool
    def __init__(self, stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., flops: _Optional[int] = ..., wall_s: _Optional[float] = ..., cached: _Optional[bool] = ...) -> None: ...

class WorkerBytes(_message.Message):
    __slots__ = ("node_id", "sent", "received", "error", "flops", "wall_s", "rows")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    WALL_S_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    sent: int
    received: int
    error: str
    flops: int
    wall_s: float
    rows: int
    def __init__(self, node_id: _Optional[str] = ..., sent: _Optional[int] = ..., received: _Optional[int] = ..., error: _Optional[str] = ..., flops: _Optional[int] = ..., wall_s: _Optional[float] = ..., rows: _Optional[int] = ...) -> None: ...

class RoundBytes(_message.Message):
    __slots__ = ("round", "workers")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    round: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerBytes]
    def __init__(self, round: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerBytes, _Mapping]]] = ...) -> None: ...

class TrainEpochRequest(_message.Message):
    __slots__ = ("epoch", "new_rows_only", "replay_share")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NEW_ROWS_ONLY_FIELD_NUMBER: _ClassVar[int]
    REPLAY_SHARE_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    new_rows_only: bool
    replay_share: float
    def __init__(self, epoch: _Optional[int] = ..., new_rows_only: _Optional[bool] = ..., replay_share: _Optional[float] = ...) -> None: ...

class ArrivedRequest(_message.Message):
    __slots__ = ("satellite_id", "transmit_id", "batch_end_s")
    SATELLITE_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSMIT_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_END_S_FIELD_NUMBER: _ClassVar[int]
    satellite_id: str
    transmit_id: int
    batch_end_s: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, satellite_id: _Optional[str] = ..., transmit_id: _Optional[int] = ..., batch_end_s: _Optional[_Iterable[float]] = ...) -> None: ...

class ArrivedReply(_message.Message):
    __slots__ = ("stamped",)
    STAMPED_FIELD_NUMBER: _ClassVar[int]
    stamped: int
    def __init__(self, stamped: _Optional[int] = ...) -> None: ...

class EpochReport(_message.Message):
    __slots__ = ("epoch", "accuracy", "test_loss", "train_loss", "dataset_bytes", "rounds", "samples_trained", "rounds_resumed", "local_sgd_round_bytes", "distinct_trained", "group_accuracy", "group_size", "validation_accuracy", "validation_size")
    class GroupAccuracyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class GroupSizeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    DATASET_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_TRAINED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_RESUMED_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SGD_ROUND_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISTINCT_TRAINED_FIELD_NUMBER: _ClassVar[int]
    GROUP_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_SIZE_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    accuracy: float
    test_loss: float
    train_loss: float
    dataset_bytes: _containers.RepeatedCompositeFieldContainer[WorkerBytes]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundBytes]
    samples_trained: int
    rounds_resumed: int
    local_sgd_round_bytes: int
    distinct_trained: int
    group_accuracy: _containers.ScalarMap[str, float]
    group_size: _containers.ScalarMap[str, int]
    validation_accuracy: float
    validation_size: int
    def __init__(self, epoch: _Optional[int] = ..., accuracy: _Optional[float] = ..., test_loss: _Optional[float] = ..., train_loss: _Optional[float] = ..., dataset_bytes: _Optional[_Iterable[_Union[WorkerBytes, _Mapping]]] = ..., rounds: _Optional[_Iterable[_Union[RoundBytes, _Mapping]]] = ..., samples_trained: _Optional[int] = ..., rounds_resumed: _Optional[int] = ..., local_sgd_round_bytes: _Optional[int] = ..., distinct_trained: _Optional[int] = ..., group_accuracy: _Optional[_Mapping[str, float]] = ..., group_size: _Optional[_Mapping[str, int]] = ..., validation_accuracy: _Optional[float] = ..., validation_size: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("samples_stored", "samples_received", "duplicates", "rejected", "downlink_bytes_received", "train_tokens", "test_tokens", "test_skipped", "test_encode_flops", "peak_rss_bytes", "downlink_credential_bytes_received", "encoder_precision", "encoder_precision_note", "samples_arrived", "detector_usable_tokens", "detector_cloudy_tokens", "detector_false_positives", "detector_false_negatives")
    SAMPLES_STORED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEST_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    TEST_ENCODE_FLOPS_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_CREDENTIAL_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ENCODER_PRECISION_FIELD_NUMBER: _ClassVar[int]
    ENCODER_PRECISION_NOTE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_ARRIVED_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_USABLE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_CLOUDY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FALSE_POSITIVES_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FALSE_NEGATIVES_FIELD_NUMBER: _ClassVar[int]
    samples_stored: int
    samples_received: int
    duplicates: int
    rejected: int
    downlink_bytes_received: int
    train_tokens: int
    test_tokens: int
    test_skipped: int
    test_encode_flops: int
    peak_rss_bytes: int
    downlink_credential_bytes_received: int
    encoder_precision: str
    encoder_precision_note: str
    samples_arrived: int
    detector_usable_tokens: int
    detector_cloudy_tokens: int
    detector_false_positives: int
    detector_false_negatives: int
    def __init__(self, samples_stored: _Optional[int] = ..., samples_received: _Optional[int] = ..., duplicates: _Optional[int] = ..., rejected: _Optional[int] = ..., downlink_bytes_received: _Optional[int] = ..., train_tokens: _Optional[int] = ..., test_tokens: _Optional[int] = ..., test_skipped: _Optional[int] = ..., test_encode_flops: _Optional[int] = ..., peak_rss_bytes: _Optional[int] = ..., downlink_credential_bytes_received: _Optional[int] = ..., encoder_precision: _Optional[str] = ..., encoder_precision_note: _Optional[str] = ..., samples_arrived: _Optional[int] = ..., detector_usable_tokens: _Optional[int] = ..., detector_cloudy_tokens: _Optional[int] = ..., detector_false_positives: _Optional[int] = ..., detector_false_negatives: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MissionInfo(_message.Message):
    __slots__ = ("config_json", "fingerprint", "prepared", "rounds_done", "instance")
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PREPARED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_DONE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    config_json: str
    fingerprint: str
    prepared: bool
    rounds_done: int
    instance: str
    def __init__(self, config_json: _Optional[str] = ..., fingerprint: _Optional[str] = ..., prepared: _Optional[bool] = ..., rounds_done: _Optional[int] = ..., instance: _Optional[str] = ...) -> None: ...

class UplinkRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UplinkReply(_message.Message):
    __slots__ = ("basis", "dictionary", "fit_tokens", "fit_s")
    BASIS_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    FIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIT_S_FIELD_NUMBER: _ClassVar[int]
    basis: Basis
    dictionary: bytes
    fit_tokens: int
    fit_s: float
    def __init__(self, basis: _Optional[_Union[Basis, _Mapping]] = ..., dictionary: _Optional[bytes] = ..., fit_tokens: _Optional[int] = ..., fit_s: _Optional[float] = ...) -> None: ...
