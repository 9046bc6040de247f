"""Request limits and safe exposure defaults."""

import numpy as np
import pytest

from flywheel.protocol.errors import ConfigError, InvalidInputError
from flywheel.serving.config import AuthConfig, ServerConfig, TlsConfig
from flywheel.serving.replica import check_limits

LIMITS = ServerConfig(max_batch_rows=8, max_bytes_element=16).request_limits()


def test_rows_and_bytes_within_limits_pass():
    check_limits({"x": np.zeros((8, 3), np.float32), "s": np.array([[b"a" * 16]], dtype=object)}, True, LIMITS)


def test_too_many_rows_names_the_limit():
    with pytest.raises(InvalidInputError, match=r"input 'x' has 9 rows, more than server.max_batch_rows 8"):
        check_limits({"x": np.zeros((9, 3), np.float32)}, True, LIMITS)
    with pytest.raises(InvalidInputError, match="must be >= 1"):
        check_limits({"x": np.zeros((0, 3), np.float32)}, True, LIMITS)
    # a model without a batch axis has no rows to count
    check_limits({"x": np.zeros((9, 3), np.float32)}, False, LIMITS)


def test_long_bytes_elements_name_the_limit():
    with pytest.raises(InvalidInputError, match="BYTES element of 17 bytes, more than server.max_bytes_element 16"):
        check_limits({"s": np.array([[b"ok"], [b"b" * 17]], dtype=object)}, True, LIMITS)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "example.org"])
def test_serving_beyond_loopback_without_auth_is_refused_with_how_to_fix(host):
    with pytest.raises(ConfigError) as err:
        ServerConfig(host=host).check_exposure()
    assert "server.auth" in err.value.message
    assert "flywheel keys create" in err.value.message
    ServerConfig(host=host, auth=AuthConfig(enabled=True), allow_plaintext=True).check_exposure()


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "example.org"])
def test_serving_beyond_loopback_in_plaintext_needs_saying_so(host):
    with pytest.raises(ConfigError) as err:
        ServerConfig(host=host, auth=AuthConfig(enabled=True)).check_exposure()
    assert "server.tls is not set" in err.value.message
    assert "allow_plaintext: true" in err.value.message
    tls = TlsConfig(cert_file="/etc/tls/tls.crt", key_file="/etc/tls/tls.key")
    ServerConfig(host=host, auth=AuthConfig(enabled=True), tls=tls).check_exposure()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_needs_no_auth(host):
    ServerConfig(host=host).check_exposure()


def test_flywheel_serve_refuses_before_starting_anything(tmp_path, capsys):
    from flywheel.cli import main

    cfg = tmp_path / "open.yaml"
    cfg.write_text("server: {host: 0.0.0.0}\nmodels: [{name: m, path: m.onnx}]\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    out = capsys.readouterr()
    assert "reachable from other hosts" in out.err
    assert "starting Ray" not in out.out


@pytest.mark.parametrize("field", ["max_batch_rows", "max_bytes_element"])
def test_limits_must_be_positive(field):
    with pytest.raises(ConfigError, match=field):
        ServerConfig(**{field: 0})
