"""The wire format of tensors: exact round trips, and refusals before any allocation."""

import numpy as np
import pytest

from adjointdpm import TensorError, decode_tensor, encode_tensor
from adjointdpm.v1 import tensor_pb2


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int32", "int64", "uint8", "bool"])
def test_round_trip(dtype):
    a = (np.random.default_rng(0).normal(size=(2, 3, 4)) * 10).astype(dtype)
    msg = encode_tensor(a)
    assert msg.dtype == dtype and list(msg.shape) == [2, 3, 4]
    b = decode_tensor(tensor_pb2.Tensor.FromString(msg.SerializeToString()))
    assert b.dtype == a.dtype and np.array_equal(a, b) and b.flags.writeable


def test_big_endian_and_non_contiguous_inputs_travel_little_endian():
    a = np.arange(12, dtype=">f4").reshape(3, 4).T
    msg = encode_tensor(a)
    assert msg.data == np.ascontiguousarray(a, dtype="<f4").tobytes()
    assert np.array_equal(decode_tensor(msg), a)


def test_scalar():
    assert decode_tensor(encode_tensor(np.float32(2.5))).shape == ()


@pytest.mark.parametrize("msg, match", [
    (tensor_pb2.Tensor(dtype="object", shape=[1], data=b"x"), "unknown dtype"),
    (tensor_pb2.Tensor(dtype="float32", shape=[2], data=b"\0" * 7), "bytes do not hold"),
    (tensor_pb2.Tensor(dtype="float32", shape=[-1], data=b""), "invalid shape"),
    (tensor_pb2.Tensor(dtype="float32", shape=[1] * 9, data=b"\0" * 4), "invalid shape"),
])
def test_malformed(msg, match):
    with pytest.raises(TensorError, match=match):
        decode_tensor(msg)


def test_huge_declared_shape_is_refused_before_allocation():
    # 2**62 elements declared with 4 bytes sent: refused on the numbers alone, instantly
    msg = tensor_pb2.Tensor(dtype="float32", shape=[2**31, 2**31], data=b"\0" * 4)
    with pytest.raises(TensorError, match="exceed the limit"):
        decode_tensor(msg, max_elements=10**6)
    with pytest.raises(TensorError, match="bytes do not hold"):
        decode_tensor(msg)


def test_expected_shape_and_dtype():
    msg = encode_tensor(np.zeros((2, 1, 8, 8), np.float32))
    assert decode_tensor(msg, shape=(None, 1, 8, 8)).shape == (2, 1, 8, 8)
    with pytest.raises(TensorError, match="does not match"):
        decode_tensor(msg, shape=(None, 1, 8, 9))
    with pytest.raises(TensorError, match="not accepted"):
        decode_tensor(encode_tensor(np.zeros(3, np.int64)), dtypes=("float32",))
