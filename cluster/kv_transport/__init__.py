"""KV transport: moves a prompt's KV cache from a prefill worker to a decode worker.

One interface (`KVTransport`, in `api.py`), three implementations picked by name:

    gloo   DistTransport over ProcessGroupGloo, CPU tensors (CI proves the protocol with it)
    nccl   DistTransport over ProcessGroupNCCL, CUDA tensors (the production path)
    fake   FakeTransport, in-process, for unit tests of the roles

    transport = make_transport("nccl", kv=kv_cache, local=PeerRef(worker_id, incarnation),
                               model_hash=model_hash, config=TransportConfig(host=my_ip))
    registry.publish(transport.local)            # host/port peers send to

Map of the package: `api.py` (types, futures, errors), `protocol.py` (store keys, messages, the
order of events), `transfer.py` (one transfer's state machine), `pairs.py` (per-pair threads),
`dist.py` (the gloo / NCCL transport and its watchdog), `backends.py` (what differs between gloo
and NCCL), `kv_io.py` (gather / scatter of paged blocks), `fake.py` (the in-process fake).
"""

from __future__ import annotations

from typing import Any

import torch

from cluster.kv_transport.api import (
    KV_LAYOUT,
    FailureReason,
    KVSpec,
    KVTransferError,
    KVTransport,
    PeerRef,
    SendStream,
    TransferFuture,
    TransferResult,
    TransportConfig,
    TransportStats,
)

BACKENDS = ("gloo", "nccl", "fake")


def make_transport(
    backend: str,
    *,
    kv: torch.Tensor,
    local: PeerRef,
    model_hash: str,
    config: TransportConfig | None = None,
    **kwargs: Any,
) -> KVTransport:
    """Build the `backend` transport for this worker's KV cache `kv[L, 2, N, B, Hkv, D]`.

    `local` names this worker (its host/port are filled in from `config`); the fake backend also
    takes `hub=FakeHub()`, shared by the transports that should reach each other.
    """
    if backend in ("gloo", "nccl"):
        from cluster.kv_transport.dist import DistTransport

        return DistTransport(kv, local, model_hash, config, backend=backend, **kwargs)
    if backend == "fake":
        from cluster.kv_transport.fake import FakeTransport

        return FakeTransport(kv, local, model_hash, config, **kwargs)
    raise ValueError(f"unknown KV transport backend {backend!r}; choose one of {BACKENDS}")


__all__ = [
    "BACKENDS",
    "KV_LAYOUT",
    "FailureReason",
    "KVSpec",
    "KVTransferError",
    "KVTransport",
    "PeerRef",
    "SendStream",
    "TransferFuture",
    "TransferResult",
    "TransportConfig",
    "TransportStats",
    "make_transport",
]
