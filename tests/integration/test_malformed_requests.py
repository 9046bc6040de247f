"""A corpus of malformed requests against the real deployment: each gets the
right 4xx with a message that names the problem, and nothing breaks."""

from __future__ import annotations

import http.client
import json
import socket

import numpy as np
import pytest

pytestmark = pytest.mark.integration

INFER = "/v2/models/digits/infer"


def _inp(**over):
    d = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}
    d.update(over)
    return d


def _body(*inputs, **extra):
    return json.dumps({"inputs": list(inputs), **extra}).encode()


CORPUS = [
    # (kind, method, path, body, status, fragment of the error)
    ("truncated JSON", "POST", INFER, b'{"inputs": [{"name": "input"', 400, "not valid JSON"),
    ("empty body", "POST", INFER, b"", 400, "not valid JSON"),
    ("body is a list", "POST", INFER, b"[1, 2]", 400, "Expected `object`"),
    ("no inputs field", "POST", INFER, b"{}", 400, "inputs"),
    ("empty inputs", "POST", INFER, _body(), 400, "at least one"),
    ("inputs not a list", "POST", INFER, b'{"inputs": 5}', 400, "$.inputs"),
    ("name not a string", "POST", INFER, _body(_inp(name=5)), 400, "$.inputs[0].name"),
    ("unknown tensor name", "POST", INFER, _body(_inp(name="pixels")), 400, "unknown input 'pixels'"),
    ("wrong datatype", "POST", INFER, _body(_inp(datatype="INT32", data=[1] * 64)), 400, "datatype must be FP32"),
    ("unknown datatype", "POST", INFER, _body(_inp(datatype="FLOAT")), 400, "unknown datatype 'FLOAT'"),
    ("data count != shape", "POST", INFER, _body(_inp(data=[0.5] * 63)), 400, "needs 64 elements, data has 63"),
    ("negative shape", "POST", INFER, _body(_inp(shape=[-1, 64])), 400, "non-negative"),
    ("huge shape", "POST", INFER, _body(_inp(shape=[1 << 40, 64])), 400, "more than the limit"),
    ("wrong rank", "POST", INFER, _body(_inp(shape=[64])), 400, "does not match the model's [-1, 64]"),
    ("wrong fixed dim", "POST", INFER, _body(_inp(shape=[1, 63], data=[0.5] * 63)), 400, "does not match"),
    ("NaN where ints are due", "POST", INFER,
     b'{"inputs": [{"name": "input", "shape": [1], "datatype": "INT64", "data": [NaN]}]}', 400, "not valid JSON"),
    ("float where ints are due", "POST", INFER, _body(_inp(datatype="INT64", shape=[1], data=[1.5])), 400, "'input'"),
    ("string in numeric data", "POST", INFER, _body(_inp(data=["a"] * 64)), 400, "numbers"),
    ("bool in numeric data", "POST", INFER, _body(_inp(data=[True] * 64)), 400, "numbers"),
    ("duplicate input names", "POST", INFER, _body(_inp(), _inp()), 400, "more than once"),
    ("missing data", "POST", INFER, json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32"}]}).encode(), 400, "'data' is required"),
    ("ragged nested data", "POST", INFER, _body(_inp(data=[[0.5] * 64, [0.5]], shape=[2, 64])), 400, "rectangular"),
    ("shape holds a string", "POST", INFER, _body(_inp(shape=["1", 64])), 400, "$.inputs[0].shape[0]"),
    ("zero rows", "POST", INFER, _body(_inp(shape=[0, 64], data=[])), 400, "batch dimension"),
    ("batch over max_batch_size", "POST", INFER, _body(_inp(shape=[65, 64], data=[0.5] * 65 * 64)), 400, "max_batch_size"),
    ("unknown requested output", "POST", INFER, _body(_inp(), outputs=[{"name": "probs"}]), 400, "unknown requested output"),
    ("unknown field", "POST", INFER, _body(_inp(colour="red")), 400, "colour"),
    ("not UTF-8", "POST", INFER, b'{"inputs": "\xff\xfe"}', 400, "invalid infer request"),
    ("unknown model", "POST", "/v2/models/nope/infer", _body(_inp()), 404, "unknown model 'nope'"),
    ("unknown version", "POST", "/v2/models/digits/versions/7/infer", _body(_inp()), 404, "no version '7'"),
    ("GET on infer", "GET", INFER, None, 405, "takes POST"),
]


def _send(url, method, path, body):
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    c.request(method, path, body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    out = r.status, r.read()
    c.close()
    return out


def _valid_request_works(url):
    status, body = _send(url, "POST", INFER, _body(_inp()))
    assert status == 200, body
    assert np.array(json.loads(body)["outputs"][0]["data"]).shape == (10,)


def test_corpus_has_at_least_20_kinds():
    assert len({kind for kind, *_ in CORPUS}) >= 20


@pytest.mark.parametrize("kind, method, path, body, status, fragment", CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_request_gets_a_4xx_with_a_message(demo, kind, method, path, body, status, fragment):
    got, raw = _send(demo.url, method, path, body)
    assert got == status, raw
    message = json.loads(raw)["error"]
    assert fragment in message, message
    _valid_request_works(demo.url)


def test_body_over_the_limit_gets_413_and_serving_goes_on(demo):
    host, port = demo.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 40}\r\n\r\n".encode())
        s.settimeout(5)
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413")
    assert b"exceeds the limit" in head
    _valid_request_works(demo.url)


def test_no_request_of_the_corpus_was_an_internal_error(demo):
    for _, method, path, body, _, _ in CORPUS:
        _send(demo.url, method, path, body)
    _, text = _send(demo.url, "GET", "/metrics", None)
    assert b'outcome="internal"' not in text
    assert b'outcome="invalid_argument"' in text


def _binary(declared: int, tail: bytes, header_length: int | None = None):
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                     "parameters": {"binary_data_size": declared}}]}).encode()
    hl = len(header) if header_length is None else header_length
    return header + tail, hl


BINARY_CORPUS = [
    ("header length past the body", *_binary(256, b"\0" * 256, header_length=10_000), "exceeds the body"),
    ("header length not a number", _binary(256, b"\0" * 256)[0], "abc", "must be a positive integer"),
    ("binary size != shape x datatype", *_binary(252, b"\0" * 252), "252 raw bytes do not match"),
    ("truncated binary body", *_binary(256, b"\0" * 100), "runs past the end"),
    ("bytes left over", *_binary(256, b"\0" * 300), "not claimed"),
    ("header cuts the JSON", *_binary(256, b"\0" * 256, header_length=20), "not valid JSON"),
]


@pytest.mark.parametrize("kind, body, header_length, fragment", BINARY_CORPUS, ids=[c[0] for c in BINARY_CORPUS])
def test_malformed_binary_framing_gets_400(demo, kind, body, header_length, fragment):
    host, port = demo.url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    c.request("POST", INFER, body=body, headers={"Inference-Header-Content-Length": str(header_length),
                                                  "Content-Type": "application/octet-stream"})
    r = c.getresponse()
    status, raw = r.status, r.read()
    c.close()
    assert status == 400, raw
    assert fragment in json.loads(raw)["error"]
    _valid_request_works(demo.url)
