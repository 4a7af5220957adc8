"""Token validation and scope rules of core/auth.py, with keys and tokens made here (no servers)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from core.auth import AuthError, AuthInterceptor, TokenValidator, bearer_token, load_keys, token_scopes
from core.grpc_server import ServerSecurity

ISSUER = "https://issuer.test"
AUDIENCE = "cqrs-orders"
WRITE_METHOD = "/cqrs.orders.v1.OrderCommandService/CreateOrder"


class Signer:
    """A key pair and the PEM of its public half, making tokens with any claims."""

    def __init__(self, kind: str = "rsa", kid: str | None = None) -> None:
        if kind == "rsa":
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.algorithm = "RS256"
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())
            self.algorithm = "ES256"
        self.kid = kid
        self.public_pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(self, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc-a", "iat": now, "exp": now + 300}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        headers = {"kid": self.kid} if self.kid else None
        return jwt.encode(claims, self.private, algorithm=self.algorithm, headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(**claims: Any) -> str:
    """`alg: none`, made by hand (PyJWT would refuse to verify it, which is the point of the test)."""
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "scope": "orders:read orders:write", **claims}
    return f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(body).encode())}."


def hs256_with_public_key(public_pem: bytes, **claims: Any) -> str:
    """The classic key-confusion forgery: HMAC-SHA256 keyed with the (public) verification key's PEM text."""
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "scope": "orders:read orders:write", **claims}
    signing_input = f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(body).encode())}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def write_pem(tmp_path: Path, signer: Signer) -> Path:
    path = tmp_path / "jwt-public.pem"
    path.write_bytes(signer.public_pem)
    return path


def validator_for(path: Path, algorithms: tuple[str, ...] = ("RS256", "ES256")) -> TokenValidator:
    return TokenValidator(load_keys(path), issuer=ISSUER, audience=AUDIENCE, algorithms=algorithms, leeway=5)


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer()


def reason(validator: TokenValidator, token: str) -> str:
    with pytest.raises(AuthError) as caught:
        validator.validate(token)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    return caught.value.reason


def test_a_valid_token_gives_its_claims(tmp_path: Path, signer: Signer) -> None:
    claims = validator_for(write_pem(tmp_path, signer)).validate(signer.token(scope="orders:read"))
    assert claims["sub"] == "svc-a"


def test_rejections_say_why(tmp_path: Path, signer: Signer) -> None:
    validator = validator_for(write_pem(tmp_path, signer))
    assert reason(validator, signer.token(exp=int(time.time()) - 60)) == "token expired"
    assert reason(validator, signer.token(aud="someone-else")) == "wrong audience"
    assert reason(validator, signer.token(iss="https://evil.test")) == "wrong issuer"
    assert "exp" in reason(validator, signer.token(exp=None))
    assert reason(validator, Signer().token()) == "bad signature"  # another key
    assert reason(validator, "not-a-jwt") == "malformed token"
    assert reason(validator, unsigned_token()).startswith("algorithm not allowed")
    assert reason(validator, hs256_with_public_key(signer.public_pem)).startswith("algorithm not allowed")


def test_within_leeway_an_expired_token_still_passes(tmp_path: Path, signer: Signer) -> None:
    validator_for(write_pem(tmp_path, signer)).validate(signer.token(exp=int(time.time()) - 2))


def test_hs256_is_refused_even_when_listed_by_mistake(tmp_path: Path, signer: Signer) -> None:
    validator = validator_for(write_pem(tmp_path, signer), algorithms=("RS256", "HS256"))
    assert reason(validator, hs256_with_public_key(signer.public_pem)).startswith("algorithm not allowed")


def test_an_algorithm_must_match_the_key_type(tmp_path: Path) -> None:
    ec_signer = Signer("ec")
    validator = validator_for(write_pem(tmp_path, ec_signer))
    validator.validate(ec_signer.token())
    rsa_path = tmp_path / "rsa.pem"
    rsa_path.write_bytes(Signer().public_pem)
    assert "configured key" in reason(validator_for(rsa_path), ec_signer.token())


def test_a_jwks_file_selects_the_key_by_kid(tmp_path: Path) -> None:
    first, second = Signer(kid="k1"), Signer("ec", kid="k2")
    keys = []
    for one in (first, second):
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[one.algorithm].to_jwk(one.private.public_key()))
        keys.append({**jwk, "kid": one.kid, "use": "sig"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    validator = validator_for(path)
    validator.validate(first.token())
    validator.validate(second.token())
    assert reason(validator, Signer(kid="k3").token()) == "unknown signing key (kid)"


def test_a_jwks_with_a_symmetric_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": _b64(b"secret"), "kid": "s"}]}))
    with pytest.raises(ValueError, match="symmetric"):
        load_keys(path)


def test_scopes_come_from_scope_or_scp() -> None:
    assert token_scopes({"scope": "orders:read  orders:write"}) == {"orders:read", "orders:write"}
    assert token_scopes({"scp": ["orders:read"]}) == {"orders:read"}
    assert token_scopes({"scp": "orders:write"}) == {"orders:write"}
    assert token_scopes({}) == frozenset()


def test_bearer_header_parsing() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("x-other", "1"), ("authorization", "bearer  abc ")]) == "abc"
    for metadata in ([], None, [("authorization", "Basic dXNlcg==")], [("authorization", "Bearer ")]):
        with pytest.raises(AuthError) as caught:
            bearer_token(metadata)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_per_rpc_scopes(tmp_path: Path, signer: Signer) -> None:
    interceptor = AuthInterceptor(
        validator_for(write_pem(tmp_path, signer)), {"cqrs.orders.v1.OrderCommandService": "orders:write"}
    )

    def metadata(token: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {token}")]

    interceptor.authorize(WRITE_METHOD, metadata(signer.token(scope="orders:write")))
    interceptor.authorize(WRITE_METHOD, metadata(signer.token(scp=["orders:read", "orders:write"])))
    with pytest.raises(AuthError) as caught:
        interceptor.authorize(WRITE_METHOD, metadata(signer.token(scope="orders:read")))
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.PERMISSION_DENIED, "needs scope orders:write")
    with pytest.raises(AuthError) as caught:  # a service nobody mapped is closed to everyone
        interceptor.authorize("/some.Other/Method", metadata(signer.token(scope="orders:write")))
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_settings_refuse_none_hmac_and_incomplete_configs(tmp_path: Path) -> None:
    for algorithms in ("none", "HS256", "RS256,HS512", ""):
        with pytest.raises(ValidationError):
            ServerSecurity(auth_algorithms=algorithms)
    with pytest.raises(ValidationError, match="CQRS_AUTH_ISSUER"):
        ServerSecurity(auth_enabled=True, auth_jwt_key_file=tmp_path / "k.pem", auth_audience="a")
    with pytest.raises(ValidationError, match="together"):
        ServerSecurity(tls_cert_file=tmp_path / "cert.pem")
    with pytest.raises(ValidationError, match="mutual TLS"):
        ServerSecurity(tls_client_ca_file=tmp_path / "ca.pem")
    assert ServerSecurity(auth_algorithms=" RS256 , ES256").jwt_algorithms == ["RS256", "ES256"]


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CQRS_AUTH_ALGORITHMS", "ES256")
    monkeypatch.setenv("CQRS_GRPC_MAX_CONCURRENT_RPCS", "7")
    settings = ServerSecurity()
    assert settings.jwt_algorithms == ["ES256"]
    assert settings.grpc_max_concurrent_rpcs == 7
    assert settings.grpc_max_message_bytes == 4 * 1024 * 1024
