"""The request id a model server names in its reply, read back by the router
(so that rewards and labels for a captured request name the same id)."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.protocol.codec import encode_response
from flywheel.serving._private.reply_outputs import reply_request_id
from flywheel.serving._private.wire import OP_INFER, OP_INFER_GRPC, Reply

OUT = {"y": np.arange(4, dtype=np.float32).reshape(1, 4)}


@pytest.mark.parametrize("binary", [False, True])
def test_http_replies_give_their_id(binary):
    body, aux = encode_response("m", "1", OUT, "abc123", {"y"} if binary else set())
    assert reply_request_id(OP_INFER, Reply(0, body, aux=aux)) == "abc123"
    body, aux = encode_response("m", "1", OUT, None, {"y"} if binary else set())
    assert reply_request_id(OP_INFER, Reply(0, body, aux=aux)) is None


def test_grpc_replies_give_their_id():
    from flywheel.protocol.grpc_codec import encode_grpc_response

    assert reply_request_id(OP_INFER_GRPC, Reply(0, encode_grpc_response("m", "1", OUT, "r-9"))) == "r-9"
    assert reply_request_id(OP_INFER_GRPC, Reply(0, encode_grpc_response("m", "1", OUT, None))) is None


def test_a_reply_that_does_not_parse_names_no_id():
    assert reply_request_id(OP_INFER, Reply(0, b'{"id": 3')) is None
    assert reply_request_id(OP_INFER_GRPC, Reply(0, b"\xff\xff")) is None
