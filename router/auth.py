"""Optional API keys for the router's two front ends.

Off unless a key is configured (`--api-key`, `--api-key-file` with one key per line, or the
`PDSERVE_API_KEY` environment variable, which `router.main` reads and passes here); the Helm
chart turns it on by mounting a key file. With keys set:

* HTTP: every route except `GET /health` needs `Authorization: Bearer <key>` (what the
  `openai` client sends for `api_key=...`); otherwise 401 with an OpenAI-shaped error.
* gRPC: the public `pdserve.v1.Generation` methods need the metadata entry
  `authorization: Bearer <key>`; otherwise UNAUTHENTICATED. Health probes, reflection and the
  embedded registry that workers heartbeat into stay open (they carry no user data).

Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

import grpc

_PROTECTED_GRPC_PREFIXES = ("/pdserve.v1.Generation/",)


class ApiKeys:
    """The set of accepted keys; empty means authentication is off. Immutable; thread-safe."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = tuple(k for k in keys if k)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check_header(self, authorization: str | None) -> bool:
        """True when auth is off or `authorization` is `Bearer <an accepted key>`."""
        if not self._keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        token = token.strip().encode()
        # Compare against every key (no early exit) so timing reveals nothing about which matched.
        matches = [hmac.compare_digest(token, key.encode()) for key in self._keys]
        return any(matches)


def load_api_keys(key: str | None = None, key_file: str | None = None, env_key: str | None = None) -> ApiKeys:
    """Keys from a command-line value, a file (one per line, `#` comments) and the environment."""
    keys = [key or "", env_key or ""]
    if key_file:
        path = Path(key_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read --api-key-file {key_file!r}: {exc}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not any(keys):
            raise ValueError(f"--api-key-file {key_file!r} holds no key")
    return ApiKeys(k.strip() for k in keys)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses public gRPC calls without an accepted key with UNAUTHENTICATED."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(_PROTECTED_GRPC_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if self.keys.check_header(metadata.get("authorization")):
            return handler
        return _refusing(handler)


_MESSAGE = "missing or invalid API key: send metadata 'authorization: Bearer <key>'"


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with UNAUTHENTICATED."""

    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)

    async def refuse_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse_stream if handler.response_streaming else refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
