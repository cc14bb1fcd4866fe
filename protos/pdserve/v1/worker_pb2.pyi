from protos.pdserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    MODALITY_IMAGE: _ClassVar[Modality]

class SetRoleResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SET_ROLE_RESULT_UNSPECIFIED: _ClassVar[SetRoleResult]
    SET_ROLE_RESULT_OK: _ClassVar[SetRoleResult]
    SET_ROLE_RESULT_NOOP: _ClassVar[SetRoleResult]
    SET_ROLE_RESULT_STALE_EPOCH: _ClassVar[SetRoleResult]
    SET_ROLE_RESULT_BUSY: _ClassVar[SetRoleResult]
    SET_ROLE_RESULT_DRAIN_TIMEOUT: _ClassVar[SetRoleResult]
    SET_ROLE_RESULT_FAILED: _ClassVar[SetRoleResult]
    SET_ROLE_RESULT_REFUSED: _ClassVar[SetRoleResult]
MODALITY_UNSPECIFIED: Modality
MODALITY_IMAGE: Modality
SET_ROLE_RESULT_UNSPECIFIED: SetRoleResult
SET_ROLE_RESULT_OK: SetRoleResult
SET_ROLE_RESULT_NOOP: SetRoleResult
SET_ROLE_RESULT_STALE_EPOCH: SetRoleResult
SET_ROLE_RESULT_BUSY: SetRoleResult
SET_ROLE_RESULT_DRAIN_TIMEOUT: SetRoleResult
SET_ROLE_RESULT_FAILED: SetRoleResult
SET_ROLE_RESULT_REFUSED: SetRoleResult

class EngineRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "output_token_ids", "sampling", "prompt_block_hashes", "mm_items")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    MM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    prompt_block_hashes: _containers.RepeatedScalarFieldContainer[int]
    mm_items: _containers.RepeatedCompositeFieldContainer[MultiModalItem]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., prompt_block_hashes: _Optional[_Iterable[int]] = ..., mm_items: _Optional[_Iterable[_Union[MultiModalItem, _Mapping]]] = ...) -> None: ...

class MultiModalItem(_message.Message):
    __slots__ = ("modality", "data", "content_hash", "grid_t", "grid_h", "grid_w", "offset", "num_tokens")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    GRID_T_FIELD_NUMBER: _ClassVar[int]
    GRID_H_FIELD_NUMBER: _ClassVar[int]
    GRID_W_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    modality: Modality
    data: bytes
    content_hash: str
    grid_t: int
    grid_h: int
    grid_w: int
    offset: int
    num_tokens: int
    def __init__(self, modality: _Optional[_Union[Modality, str]] = ..., data: _Optional[bytes] = ..., content_hash: _Optional[str] = ..., grid_t: _Optional[int] = ..., grid_h: _Optional[int] = ..., grid_w: _Optional[int] = ..., offset: _Optional[int] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request", "prefill_peer", "transfer_id", "role_epoch", "incarnation_id")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    PREFILL_PEER_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_ID_FIELD_NUMBER: _ClassVar[int]
    request: EngineRequest
    prefill_peer: _common_pb2.WorkerRef
    transfer_id: int
    role_epoch: int
    incarnation_id: str
    def __init__(self, request: _Optional[_Union[EngineRequest, _Mapping]] = ..., prefill_peer: _Optional[_Union[_common_pb2.WorkerRef, _Mapping]] = ..., transfer_id: _Optional[int] = ..., role_epoch: _Optional[int] = ..., incarnation_id: _Optional[str] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("token_ids", "logprobs", "finish_reason", "matched_stop_token_id", "usage", "prefill")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MATCHED_STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    finish_reason: _common_pb2.FinishReason
    matched_stop_token_id: int
    usage: _common_pb2.Usage
    prefill: PrefillInfo
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., matched_stop_token_id: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., prefill: _Optional[_Union[PrefillInfo, _Mapping]] = ...) -> None: ...

class PrefillInfo(_message.Message):
    __slots__ = ("worker_id", "is_remote", "num_prefilled_tokens", "num_cached_tokens", "queue_seconds", "prefill_seconds", "transfer")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    IS_REMOTE_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    is_remote: bool
    num_prefilled_tokens: int
    num_cached_tokens: int
    queue_seconds: float
    prefill_seconds: float
    transfer: KVTransferStats
    def __init__(self, worker_id: _Optional[str] = ..., is_remote: _Optional[bool] = ..., num_prefilled_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ..., transfer: _Optional[_Union[KVTransferStats, _Mapping]] = ...) -> None: ...

class KVTransferStats(_message.Message):
    __slots__ = ("num_bytes", "num_blocks", "seconds")
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    num_bytes: int
    num_blocks: int
    seconds: float
    def __init__(self, num_bytes: _Optional[int] = ..., num_blocks: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class KVDestination(_message.Message):
    __slots__ = ("worker", "kv_store_host", "kv_store_port", "block_ids", "num_cached_tokens")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    KV_STORE_HOST_FIELD_NUMBER: _ClassVar[int]
    KV_STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    worker: _common_pb2.WorkerRef
    kv_store_host: str
    kv_store_port: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_cached_tokens: int
    def __init__(self, worker: _Optional[_Union[_common_pb2.WorkerRef, _Mapping]] = ..., kv_store_host: _Optional[str] = ..., kv_store_port: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request", "destination", "transfer_id", "role_epoch", "incarnation_id")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_ID_FIELD_NUMBER: _ClassVar[int]
    request: EngineRequest
    destination: KVDestination
    transfer_id: int
    role_epoch: int
    incarnation_id: str
    def __init__(self, request: _Optional[_Union[EngineRequest, _Mapping]] = ..., destination: _Optional[_Union[KVDestination, _Mapping]] = ..., transfer_id: _Optional[int] = ..., role_epoch: _Optional[int] = ..., incarnation_id: _Optional[str] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token_id", "first_token_logprobs", "num_prefilled_tokens", "num_cached_tokens", "transfer", "queue_seconds", "prefill_seconds")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    first_token_logprobs: _common_pb2.TokenLogprobs
    num_prefilled_tokens: int
    num_cached_tokens: int
    transfer: KVTransferStats
    queue_seconds: float
    prefill_seconds: float
    def __init__(self, first_token_id: _Optional[int] = ..., first_token_logprobs: _Optional[_Union[_common_pb2.TokenLogprobs, _Mapping]] = ..., num_prefilled_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., transfer: _Optional[_Union[KVTransferStats, _Mapping]] = ..., queue_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ...) -> None: ...

class WorkerAbortRequest(_message.Message):
    __slots__ = ("request_id", "transfer_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transfer_id: int
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., transfer_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class WorkerAbortResponse(_message.Message):
    __slots__ = ("freed", "num_freed_blocks")
    FREED_FIELD_NUMBER: _ClassVar[int]
    NUM_FREED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    freed: bool
    num_freed_blocks: int
    def __init__(self, freed: _Optional[bool] = ..., num_freed_blocks: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("worker_id", "incarnation_id", "role", "role_epoch", "state", "num_running_requests", "num_waiting_requests", "num_queued_prefill_tokens", "oldest_waiting_seconds", "num_kv_blocks_used", "num_kv_blocks_total", "num_kv_blocks_cached", "avg_ttft_seconds", "avg_itl_seconds", "avg_batch_size", "num_transferring_requests", "window_seconds", "timestamp_unix_ms")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ROLE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NUM_QUEUED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_WAITING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    AVG_TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AVG_ITL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AVG_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_TRANSFERRING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    incarnation_id: str
    role: _common_pb2.WorkerRole
    role_epoch: int
    state: _common_pb2.WorkerState
    num_running_requests: int
    num_waiting_requests: int
    num_queued_prefill_tokens: int
    oldest_waiting_seconds: float
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    num_kv_blocks_cached: int
    avg_ttft_seconds: float
    avg_itl_seconds: float
    avg_batch_size: float
    num_transferring_requests: int
    window_seconds: float
    timestamp_unix_ms: int
    def __init__(self, worker_id: _Optional[str] = ..., incarnation_id: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., role_epoch: _Optional[int] = ..., state: _Optional[_Union[_common_pb2.WorkerState, str]] = ..., num_running_requests: _Optional[int] = ..., num_waiting_requests: _Optional[int] = ..., num_queued_prefill_tokens: _Optional[int] = ..., oldest_waiting_seconds: _Optional[float] = ..., num_kv_blocks_used: _Optional[int] = ..., num_kv_blocks_total: _Optional[int] = ..., num_kv_blocks_cached: _Optional[int] = ..., avg_ttft_seconds: _Optional[float] = ..., avg_itl_seconds: _Optional[float] = ..., avg_batch_size: _Optional[float] = ..., num_transferring_requests: _Optional[int] = ..., window_seconds: _Optional[float] = ..., timestamp_unix_ms: _Optional[int] = ...) -> None: ...

class SetRoleRequest(_message.Message):
    __slots__ = ("target_role", "expected_role_epoch", "drain_timeout_seconds", "reason")
    TARGET_ROLE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ROLE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    target_role: _common_pb2.WorkerRole
    expected_role_epoch: int
    drain_timeout_seconds: float
    reason: str
    def __init__(self, target_role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., expected_role_epoch: _Optional[int] = ..., drain_timeout_seconds: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class SetRoleResponse(_message.Message):
    __slots__ = ("result", "role", "role_epoch", "message")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ROLE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    result: SetRoleResult
    role: _common_pb2.WorkerRole
    role_epoch: int
    message: str
    def __init__(self, result: _Optional[_Union[SetRoleResult, str]] = ..., role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., role_epoch: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class KVCacheSpec(_message.Message):
    __slots__ = ("model_hash", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim", "layout")
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    model_hash: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layout: str
    def __init__(self, model_hash: _Optional[str] = ..., dtype: _Optional[str] = ..., block_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., layout: _Optional[str] = ...) -> None: ...

class KVHandshakeRequest(_message.Message):
    __slots__ = ("spec", "worker_id", "incarnation_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_ID_FIELD_NUMBER: _ClassVar[int]
    spec: KVCacheSpec
    worker_id: str
    incarnation_id: str
    def __init__(self, spec: _Optional[_Union[KVCacheSpec, _Mapping]] = ..., worker_id: _Optional[str] = ..., incarnation_id: _Optional[str] = ...) -> None: ...

class KVHandshakeResponse(_message.Message):
    __slots__ = ("ok", "spec", "mismatched_fields", "message", "worker_id", "incarnation_id")
    OK_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    MISMATCHED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_ID_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    spec: KVCacheSpec
    mismatched_fields: _containers.RepeatedScalarFieldContainer[str]
    message: str
    worker_id: str
    incarnation_id: str
    def __init__(self, ok: _Optional[bool] = ..., spec: _Optional[_Union[KVCacheSpec, _Mapping]] = ..., mismatched_fields: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ..., worker_id: _Optional[str] = ..., incarnation_id: _Optional[str] = ...) -> None: ...
