"""TLS and mutual TLS server credentials from PEM files."""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS {what} file {path}: {exc.strerror}") from exc
    if b"-----BEGIN" not in data:
        raise ValueError(f"the TLS {what} file {path} is not PEM")
    return data


def server_credentials(cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> grpc.ServerCredentials:
    """TLS with the certificate chain and key; with `client_ca_file`, clients must present a certificate it signed.

    The files are read once, at start-up; rotating certificates means restarting the pods (a rolling restart).
    """
    chain = _read(cert_file, "certificate")
    key = _read(key_file, "private key")
    client_ca = _read(client_ca_file, "client CA") if client_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
