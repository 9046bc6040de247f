"""server.tls's files: every server gets them checked the same way, with
errors that name the field and the file, and HAProxy's PEM stays private."""

from __future__ import annotations

import os
import stat

import pytest

from flywheel.protocol.errors import ConfigError
from flywheel.serving import parse_config
from flywheel.serving._private.tls import haproxy_bind_options, server_context
from flywheel.serving.config import TlsConfig

from _certs import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_needs_both_files():
    with pytest.raises(ConfigError, match="key_file"):
        parse_config({"server": {"tls": {"cert_file": "/c.pem"}}, "models": []})
    with pytest.raises(ConfigError, match=r"server.tls.cert_file must name a PEM file"):
        TlsConfig(cert_file="", key_file="/k.pem")


def test_a_missing_file_is_named(pki, tmp_path):
    with pytest.raises(ConfigError, match=r"server.tls.key_file '.*nowhere.key': No such file"):
        server_context(TlsConfig(cert_file=pki.server_cert, key_file=str(tmp_path / "nowhere.key")))
    with pytest.raises(ConfigError, match=r"server.tls.client_ca_file"):
        server_context(TlsConfig(pki.server_cert, pki.server_key, client_ca_file=str(tmp_path / "ca.pem")))


def test_a_key_that_does_not_match_the_certificate_is_refused(pki, tmp_path):
    other = make_pki(tmp_path, prefix="other-")
    with pytest.raises(ConfigError, match="the key does not match the certificate"):
        server_context(TlsConfig(cert_file=pki.server_cert, key_file=other.server_key))


def test_mutual_tls_requires_a_client_certificate(pki):
    import ssl

    assert server_context(TlsConfig(pki.server_cert, pki.server_key)).verify_mode == ssl.CERT_NONE
    ctx = server_context(TlsConfig(pki.server_cert, pki.server_key, client_ca_file=pki.ca))
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_haproxys_pem_holds_chain_and_key_and_only_its_owner_reads_it(pki, tmp_path):
    options = haproxy_bind_options(TlsConfig(pki.server_cert, pki.server_key, client_ca_file=pki.ca), str(tmp_path))
    pem = tmp_path / "server.pem"
    assert f'crt "{pem}"' in options and "alpn h2" in options
    assert f'ca-file "{pki.ca}" verify required' in options
    text = pem.read_text()
    assert "BEGIN CERTIFICATE" in text and "PRIVATE KEY" in text
    assert stat.S_IMODE(os.stat(pem).st_mode) == 0o600


def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(pki, tmp_path):
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(open(pki.server_key, "rb").read(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError, match="is encrypted"):
        server_context(TlsConfig(cert_file=pki.server_cert, key_file=str(locked)))


def test_relative_tls_paths_are_resolved_like_model_paths(tmp_path):
    cfg = parse_config({"server": {"tls": {"cert_file": "tls/c.pem", "key_file": "/abs/k.pem",
                                           "client_ca_file": "ca.pem"}},
                        "models": [{"name": "m", "path": "m.onnx"}]}, base_dir=tmp_path)
    tls = cfg.server.tls
    assert (tls.cert_file, tls.key_file, tls.client_ca_file) == (
        str(tmp_path / "tls/c.pem"), "/abs/k.pem", str(tmp_path / "ca.pem"))


def test_clients_refuse_tls_files_with_a_plaintext_url(pki):
    from flywheel.client import AsyncClient, Client

    for make in (Client, AsyncClient):
        with pytest.raises(ValueError, match="https://"):
            make("http://127.0.0.1:8000", ca_file=pki.ca)
