"""TLS on the public ports: the HTTP server's SSL context, the HAProxy gRPC
front's bind options, and grpcio's server credentials, all from one
``server.tls`` (TlsConfig). A file that cannot be read or a key that does not
match its certificate is a ConfigError naming the field and the file."""

from __future__ import annotations

import os
import ssl

from flywheel.protocol.errors import ConfigError
from flywheel.serving.config import TlsConfig


def _read(tls: TlsConfig, field: str) -> bytes:
    path = getattr(tls, field)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"server.tls.{field} {path!r}: {exc.strerror or exc}") from None


def server_context(tls: TlsConfig, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    """A server context: TLS 1.2 or later, the configured certificate chain,
    and client certificates required when ``client_ca_file`` is set."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for field in ("cert_file", "key_file"):
        _read(tls, field)  # a missing or unreadable file, named
    def no_passphrase() -> str:  # else OpenSSL would ask on the terminal, or fail misleadingly without one
        raise ConfigError(f"server.tls.key_file {tls.key_file!r} is encrypted: give an unencrypted PEM key "
                          "(readable only by the user Flywheel runs as)")

    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file, password=no_passphrase)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"server.tls: cannot use certificate {tls.cert_file!r} with key {tls.key_file!r} "
            f"(not PEM, or the key does not match the certificate): {exc.reason or exc}"
        ) from None
    if tls.client_ca_file:
        _read(tls, "client_ca_file")
        try:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"server.tls.client_ca_file {tls.client_ca_file!r}: no PEM CA certificate: {exc.reason or exc}"
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def haproxy_bind_options(tls: TlsConfig, folder: str) -> str:
    """HAProxy's ``bind`` options for TLS (ALPN h2). HAProxy reads the chain
    and key from one PEM file: it is written into ``folder``, which must be
    private to this process (the front's 0700 folder)."""
    server_context(tls)  # the same checks and messages as the HTTP side
    pem = os.path.join(folder, "server.pem")
    fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        chain = _read(tls, "cert_file")
        f.write(chain if chain.endswith(b"\n") else chain + b"\n")
        f.write(_read(tls, "key_file"))
    options = f'ssl crt "{pem}" alpn h2 ssl-min-ver TLSv1.2'
    if tls.client_ca_file:
        options += f' ca-file "{tls.client_ca_file}" verify required'
    return options


def grpc_server_credentials(tls: TlsConfig):
    """grpcio's credentials for the same files (mutual TLS as configured)."""
    import grpc

    server_context(tls)
    ca = _read(tls, "client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(_read(tls, "key_file"), _read(tls, "cert_file"))], root_certificates=ca,
        require_client_auth=ca is not None,
    )
