"""Channel construction: TLS / mutual TLS, keepalive and message limits aligned with the servers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# Same values as the servers: a client that pings more often than the server permits gets GOAWAY
# (ENHANCE_YOUR_CALM), one that pings less notices dead connections late.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """TLS settings. `root_certificates` None means the system trust store; a certificate chain and private key
    make it mutual TLS. `server_name_override` is for tests and port-forwards whose address is not in the cert."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name_override: str | None = None

    @classmethod
    def from_files(
        cls,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        server_name_override: str | None = None,
    ) -> ClientTLS:
        """Reads PEM files (CA bundle; client certificate and key for mutual TLS)."""

        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        if (cert_file is None) != (key_file is None):
            raise ValueError("mutual TLS needs both cert_file and key_file")
        return cls(read(ca_file), read(cert_file), read(key_file), server_name_override)


def open_channel(address: str, tls: ClientTLS | None) -> grpc.aio.Channel:
    """A plaintext channel when `tls` is None, a TLS channel otherwise, with the shared options."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.root_certificates,
        private_key=tls.private_key,
        certificate_chain=tls.certificate_chain,
    )
    options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
    if tls.server_name_override:
        options.append(("grpc.ssl_target_name_override", tls.server_name_override))
    return grpc.aio.secure_channel(address, credentials, options=options)
