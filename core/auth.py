"""Bearer-token (JWT) authentication and per-RPC scope authorization, as a grpc.aio server interceptor.

Every RPC except the health and reflection services must carry `authorization: Bearer <JWT>`. The token is
verified with PyJWT against the configured public key (PEM) or key set (JWKS), with a required issuer,
audience and expiry and an allow-list of asymmetric algorithms; then the RPC's service decides which scope the
token needs (`scope` claim, space-separated, or `scp` list). Failures are UNAUTHENTICATED (who are you?) or
PERMISSION_DENIED (you may not), with a short reason; the token itself is never logged.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from core.grpc_server import ServerInterceptorBase, ServerSecurity, responses_of
from core.log_throttle import per_request

log = logging.getLogger(__name__)

# Probes and discovery must work without a token.
OPEN_SERVICES: Final = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection"})
MAX_TOKEN_CHARS: Final = 16 * 1024

PublicKey: TypeAlias = Any  # a cryptography public key object (RSA, EC or EdDSA)
Claims: TypeAlias = dict[str, Any]

# The `sub` claim of the current call's validated token, set by `AuthInterceptor` for the handler of a unary call
# ("" when auth is off or the token has no subject): the command side records it in the events' metadata.
_subject: contextvars.ContextVar[str] = contextvars.ContextVar("authenticated_subject", default="")


def authenticated_subject() -> str:
    """Who the current call's validated token names (`sub`), or "" when auth is off."""
    return _subject.get()


class AuthError(Exception):
    """A rejected call: `code` is UNAUTHENTICATED or PERMISSION_DENIED, `reason` is safe to return and log."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _unauthenticated(reason: str) -> AuthError:
    return AuthError(grpc.StatusCode.UNAUTHENTICATED, reason)


def _key_algorithms(key: PublicKey) -> frozenset[str]:
    """The algorithms a key type can verify: an RSA key never verifies ES256, and no public key verifies HS*."""
    if isinstance(key, rsa.RSAPublicKey):
        return frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
    if isinstance(key, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        return frozenset({by_curve[key.curve.name]}) if key.curve.name in by_curve else frozenset()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


@dataclass(frozen=True)
class _Key:
    key: PublicKey
    kid: str | None
    algorithm: str | None  # the JWK's own `alg`, when it names one


def load_keys(path: Path) -> list[_Key]:
    """Reads a PEM public key or a JWKS file (`{"keys": [...]}`); private and symmetric keys are refused."""
    data = path.read_bytes()
    if data.lstrip().startswith(b"{"):
        document = json.loads(data)
        keys: list[_Key] = []
        for entry in document.get("keys", []):
            if entry.get("kty") == "oct":
                raise ValueError(f"{path}: symmetric (oct) keys are not accepted")
            if entry.get("use", "sig") != "sig":
                continue
            jwk = jwt.PyJWK.from_dict(entry)
            keys.append(_Key(_public(jwk.key, path), entry.get("kid"), entry.get("alg")))
        if not keys:
            raise ValueError(f"{path}: the key set has no signing keys")
        return keys
    return [_Key(_public(load_pem_public_key(data), path), None, None)]


def _public(key: Any, path: Path) -> PublicKey:
    if not _key_algorithms(key):
        raise ValueError(f"{path}: {type(key).__name__} is not a supported public key (RSA, EC P-256/384/521, EdDSA)")
    return key


class TokenValidator:
    """Verifies a JWT: signature with an allowed algorithm matching the key, issuer, audience, expiry."""

    def __init__(
        self, keys: Sequence[_Key], *, issuer: str, audience: str, algorithms: Iterable[str], leeway: float = 30.0
    ) -> None:
        self._keys = list(keys)
        self._issuer = issuer
        self._audience = audience
        self._algorithms = frozenset(algorithms) - {"none"}
        self.leeway = leeway

    def validate(self, token: str) -> Claims:
        """Returns the claims, or raises AuthError(UNAUTHENTICATED) with the reason."""
        if len(token) > MAX_TOKEN_CHARS:
            raise _unauthenticated("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _unauthenticated("malformed token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise _unauthenticated(f"algorithm not allowed: {algorithm!r}")
        key = self._key_for(header.get("kid"), algorithm)
        try:
            return jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise _unauthenticated("token expired") from None
        except jwt.InvalidAudienceError:
            raise _unauthenticated("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise _unauthenticated("wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _unauthenticated(f"token lacks the {exc.claim!r} claim") from None
        except jwt.ImmatureSignatureError:
            raise _unauthenticated("token not yet valid") from None
        except jwt.InvalidSignatureError:
            raise _unauthenticated("bad signature") from None
        except jwt.PyJWTError:
            raise _unauthenticated("invalid token") from None

    def _key_for(self, kid: Any, algorithm: str) -> _Key:
        candidates = [k for k in self._keys if kid is None or k.kid is None or k.kid == kid]
        for key in candidates:
            if algorithm in _key_algorithms(key.key) and key.algorithm in (None, algorithm):
                return key
        if kid is not None and not any(k.kid == kid for k in self._keys):
            raise _unauthenticated("unknown signing key (kid)")
        raise _unauthenticated(f"algorithm not allowed for the configured key: {algorithm!r}")


def token_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """Scopes from `scope` (space-separated string, OAuth 2) and/or `scp` (list or string, e.g. Azure AD/Okta)."""
    scopes: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            scopes.update(value.split())
        elif isinstance(value, list):
            scopes.update(item for item in value if isinstance(item, str))
    return frozenset(scopes)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of the `authorization: Bearer ...` header, or AuthError."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise _unauthenticated("authorization header is not 'Bearer <token>'")
            return token.strip()
    raise _unauthenticated("missing bearer token")


def _service_of(method: str) -> str:
    """'/pkg.Service/Method' -> 'pkg.Service'."""
    return method.lstrip("/").partition("/")[0]


Behavior: TypeAlias = Callable[..., Any]


def _denying_handler(handler: grpc.RpcMethodHandler[Any, Any], error: AuthError) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind (unary/streaming) as `handler` that ends the call with `error`."""

    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(error.code, error.reason)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(error.code, error.reason)
        yield  # pragma: no cover - makes this an async generator, as a streaming handler must be

    kwargs: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


def _subject_handler(handler: grpc.RpcMethodHandler[Any, Any], subject: str) -> grpc.RpcMethodHandler[Any, Any]:
    """The unary `handler`, run with `authenticated_subject()` naming the token's subject (set inside the call,
    so nothing depends on the interceptor and the handler sharing a task context)."""
    behavior = handler.unary_unary
    assert behavior is not None

    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        token = _subject.set(subject)
        try:
            return await behavior(request, context)  # type: ignore[arg-type]  # an aio context
        finally:
            _subject.reset(token)

    return grpc.unary_unary_rpc_method_handler(
        call, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def _expiring_stream_handler(
    handler: grpc.RpcMethodHandler[Any, Any], expires_at: float
) -> grpc.RpcMethodHandler[Any, Any]:
    """The server-streaming `handler`, ended with UNAUTHENTICATED when the bearer token expires (epoch seconds).

    A token is checked when a call starts; a stream (WatchOrder) may outlive it by hours, and must not: the
    client reconnects with a fresh token.
    """
    behavior = handler.unary_stream
    assert behavior is not None

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        responses = responses_of(behavior(request, context))  # type: ignore[arg-type]  # aio context
        try:
            while True:
                remaining = expires_at - time.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        response = await anext(responses)
                except TimeoutError:
                    break
                except StopAsyncIteration:
                    return
                yield response
        finally:
            await responses.aclose()
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bearer token expired; call again with a fresh token")

    return grpc.unary_stream_rpc_method_handler(
        stream, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class AuthInterceptor(ServerInterceptorBase):
    """Authenticates every call outside OPEN_SERVICES, then requires the scope its service maps to.

    `scopes` maps a full service name ('cqrs.orders.v1.OrderCommandService') to the scope its RPCs need; a
    service not in it (and not open) is denied to everyone, so a new service cannot be exposed by accident.
    """

    def __init__(self, validator: TokenValidator, scopes: Mapping[str, str]) -> None:
        self._validator = validator
        self._scopes = dict(scopes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        service = _service_of(method)
        handler = await continuation(handler_call_details)
        if service in OPEN_SERVICES or handler is None:  # None: unknown method, gRPC answers UNIMPLEMENTED
            return handler
        try:
            claims = self.authorize(method, handler_call_details.invocation_metadata)
        except AuthError as error:
            # A client with a bad token is refused on every call: one line per method and code a window.
            per_request.log(
                log, logging.WARNING, (method, error.code), "rejected %s: %s (%s)", method, error.reason,
                error.code.name,
            )  # fmt: skip
            return _denying_handler(handler, error)
        expires = claims.get("exp")
        if handler.response_streaming and not handler.request_streaming and isinstance(expires, int | float):
            return _expiring_stream_handler(handler, float(expires) + self._validator.leeway)
        subject = claims.get("sub")
        if isinstance(subject, str) and subject and not handler.request_streaming and not handler.response_streaming:
            return _subject_handler(handler, subject)
        return handler

    def authorize(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> Claims:
        """Validates the call's token and scope; returns the claims or raises AuthError."""
        claims = self._validator.validate(bearer_token(metadata))
        needed = self._scopes.get(_service_of(method))
        if needed is None:
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED, f"no scope grants {method}")
        if needed not in token_scopes(claims):
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED, f"needs scope {needed}")
        return claims


def auth_interceptors(
    settings: ServerSecurity, read_services: Iterable[str] = (), write_services: Iterable[str] = ()
) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
    """[AuthInterceptor] when CQRS_AUTH_ENABLED, else []; reads the key file now (start-up), not per call."""
    if not settings.auth_enabled:
        return []
    assert settings.auth_jwt_key_file and settings.auth_issuer and settings.auth_audience  # checked by the settings
    validator = TokenValidator(
        load_keys(settings.auth_jwt_key_file),
        issuer=settings.auth_issuer,
        audience=settings.auth_audience,
        algorithms=settings.jwt_algorithms,
        leeway=settings.auth_leeway_seconds,
    )
    scopes = {name: settings.auth_read_scope for name in read_services}
    scopes.update({name: settings.auth_write_scope for name in write_services})
    log.info("bearer-token authentication on (issuer %s, audience %s)", settings.auth_issuer, settings.auth_audience)
    return [AuthInterceptor(validator, scopes)]
