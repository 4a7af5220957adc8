"""The one way both gRPC servers are built and bound: limits, keepalive, TLS, and the settings for them.

`ServerSecurity` is a settings mixin: `CommandServiceSettings` and `QuerySettings` inherit it, so both services
read the same CQRS_GRPC_*, CQRS_TLS_* and CQRS_AUTH_* variables (see the README's Security section).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

import grpc
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.tls import server_credentials

MIB: Final = 1024 * 1024

# The stubs make ServerInterceptor generic, the runtime class is not subscriptable: subclass this alias instead.
if TYPE_CHECKING:
    ServerInterceptorBase = grpc.aio.ServerInterceptor[Any, Any]
else:
    ServerInterceptorBase = grpc.aio.ServerInterceptor

# Keepalive, server side. A client must not ping more often than MIN_PING_INTERVAL_MS (else the server answers
# GOAWAY "too_many_pings"), so the shipped client uses keepalive_time_ms = KEEPALIVE_TIME_MS too.
# Health service name that is SERVING while the process can answer at all, whatever its databases do: the
# Kubernetes liveness probe asks for it (a database outage must make pods unready, never restart them).
LIVENESS_SERVICE: Final = "liveness"

KEEPALIVE_TIME_MS: Final = 30_000
KEEPALIVE_TIMEOUT_MS: Final = 10_000
MIN_PING_INTERVAL_MS: Final = 10_000

# Asymmetric algorithms only: the key file holds public keys, and an HMAC "verified" with a public key is a
# forgery anyone can make. `none` is never accepted.
SUPPORTED_JWT_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class ServerSecurity(BaseSettings):
    """gRPC server limits, TLS and bearer-token authentication (environment variables CQRS_<FIELD>)."""

    model_config = SettingsConfigDict(env_prefix="CQRS_", extra="ignore")

    # Limits
    grpc_max_message_bytes: Annotated[int, Field(gt=0, le=1024 * MIB)] = 4 * MIB
    grpc_max_concurrent_rpcs: Annotated[int, Field(gt=0)] = 1000
    # TLS: both files set = TLS; a client CA as well = mutual TLS (client certificates required).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # Bearer-token (JWT) authentication and per-RPC scopes
    auth_enabled: bool = False
    auth_jwt_key_file: Path | None = None  # a PEM public key or a JWKS (JSON) file
    auth_issuer: str | None = None
    auth_audience: str | None = None
    auth_algorithms: str = "RS256,ES256"  # comma-separated allow-list
    auth_leeway_seconds: Annotated[float, Field(ge=0, le=300)] = 30.0
    auth_read_scope: Annotated[str, Field(min_length=1)] = "orders:read"
    auth_write_scope: Annotated[str, Field(min_length=1)] = "orders:write"

    @field_validator("auth_algorithms")
    @classmethod
    def _asymmetric_only(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",") if name.strip()]
        if not names:
            raise ValueError("at least one algorithm is needed")
        unsupported = [name for name in names if name not in SUPPORTED_JWT_ALGORITHMS]
        if unsupported:
            raise ValueError(
                f"algorithms {unsupported} are not allowed (only {sorted(SUPPORTED_JWT_ALGORITHMS)}; "
                "never 'none' or HMAC with a public key)"
            )
        return ",".join(names)

    @model_validator(mode="after")
    def _consistent(self) -> ServerSecurity:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("CQRS_TLS_CERT_FILE and CQRS_TLS_KEY_FILE must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("CQRS_TLS_CLIENT_CA_FILE (mutual TLS) needs CQRS_TLS_CERT_FILE and CQRS_TLS_KEY_FILE")
        if self.auth_enabled:
            missing = [
                f"CQRS_{name.upper()}"
                for name in ("auth_jwt_key_file", "auth_issuer", "auth_audience")
                if not getattr(self, name)
            ]
            if missing:
                raise ValueError(f"CQRS_AUTH_ENABLED=true needs {', '.join(missing)}")
        return self

    @property
    def jwt_algorithms(self) -> list[str]:
        return self.auth_algorithms.split(",")


def server_options(settings: ServerSecurity) -> list[tuple[str, int]]:
    """The channel arguments both servers use."""
    return [
        # SO_REUSEPORT (gRPC's default on Linux) would let a second process bind the same port silently.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
        # Detect dead peers (half-open connections through load balancers) and keep idle connections warm.
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def build_server(
    settings: ServerSecurity, interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]]
) -> grpc.aio.Server:
    """A grpc.aio server with our limits and keepalive; the first interceptor is the outermost."""
    return grpc.aio.server(
        interceptors=list(interceptors),
        options=server_options(settings),
        # Beyond this many RPCs in flight gRPC answers RESOURCE_EXHAUSTED instead of queueing without bound.
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
    )


def tls_credentials(settings: ServerSecurity) -> grpc.ServerCredentials | None:
    """Server credentials from the configured files, or None for plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return server_credentials(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)


def bind(server: grpc.aio.Server, listen: str, tls: grpc.ServerCredentials | None) -> int:
    """Binds `listen` (port 0 picks a free one) with TLS when given; returns the port, raises RuntimeError."""
    port = server.add_secure_port(listen, tls) if tls is not None else server.add_insecure_port(listen)
    if port == 0:  # older grpc versions return 0 instead of raising
        raise RuntimeError(f"cannot bind {listen}")
    return port


async def responses_of(result: Any) -> AsyncGenerator[Any, None]:
    """The responses of a server-streaming behaviour, whatever its shape: an async generator (ours), a coroutine
    that writes with `context.write()`, or a plain iterable. Every interceptor that wraps a stream uses this."""
    if hasattr(result, "__aiter__"):
        async for response in result:
            yield response
    elif inspect.isawaitable(result):
        await result
    else:
        for response in result:
            yield response


_CODES_BY_VALUE: Final = {code.value[0]: code for code in grpc.StatusCode}

# Called when a call ends (returned, aborted, raised or cancelled) with its context and the exception, if any.
CallEnded = Callable[[Any, BaseException | None], None]


def final_code(context: Any, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with: what the handler set or aborted with (abort_with_status included), else OK,
    CANCELLED (the client left or the deadline passed) or UNKNOWN (an unhandled exception)."""
    code: Any = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int) and code in _CODES_BY_VALUE:
        return _CODES_BY_VALUE[code]
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def observed(
    handler: grpc.RpcMethodHandler[Any, Any] | None, begin: Callable[[], CallEnded]
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with each behaviour wrapped: `begin()` runs when a call starts and returns what to call when it
    ends. The wrappers are a coroutine / an async generator whatever the behaviour is (a plain function, a coroutine
    that writes with `context.write()`), the shapes grpc.aio interceptors (ours and OpenTelemetry's) expect."""
    if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
        return handler  # type: ignore[return-value]  # (the stubs do not admit None; grpc does)

    def unary(behavior: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(request: Any, context: Any) -> Any:
            ended = begin()
            error: BaseException | None = None
            try:
                result = behavior(request, context)
                return (await result) if inspect.isawaitable(result) else result
            except BaseException as exc:
                error = exc
                raise
            finally:
                ended(context, error)

        return wrapper

    def streaming(behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def wrapper(request: Any, context: Any) -> AsyncIterator[Any]:
            ended = begin()
            error: BaseException | None = None
            try:
                async for item in responses_of(behavior(request, context)):
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                ended(context, error)

        return wrapper

    kwargs: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kwargs)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kwargs)
    return handler
