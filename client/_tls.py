"""The clients' TLS settings: a CA to trust (else the system's) and, for a
server that wants mutual TLS, this client's certificate and key."""

from __future__ import annotations

import ssl
from typing import Any


class TlsFiles:
    """``ca_file``: PEM CA certificates to trust instead of the system's;
    ``cert_file`` / ``key_file``: this client's certificate chain and key
    (PEM), for servers that ask for one. Unset: system CAs, no certificate."""

    def __init__(self, ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None) -> None:
        if key_file and not cert_file:
            raise ValueError("key_file needs cert_file (the certificate that goes with the key)")
        self.ca_file, self.cert_file, self.key_file = ca_file, cert_file, key_file

    def any(self) -> bool:
        return bool(self.ca_file or self.cert_file)

    def check_scheme(self, url: str, tls: bool) -> None:
        """ValueError for TLS files with a plaintext URL: the caller meant
        TLS, and would otherwise send its key in the clear."""
        if self.any() and not tls:
            raise ValueError(f"URL {url!r}: ca_file / cert_file need TLS: use https:// (gRPC: grpcs://)")

    def ssl_context(self) -> ssl.SSLContext:
        """For HTTPS: verifies the server's certificate and name."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def grpc_credentials(self, grpc: Any):
        """For grpcs://: grpc.ssl_channel_credentials from the same files."""

        def read(path: str | None) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file), private_key=read(self.key_file or self.cert_file),
            certificate_chain=read(self.cert_file),
        )
