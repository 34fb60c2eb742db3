"""Tensors on the wire: raw little-endian bytes + dtype + shape (``adjointdpm.v1.Tensor``).

Decoding checks the declared size against limits and against the bytes actually sent before
anything is allocated, and never unpickles: a tensor is numbers and nothing else.
"""

from __future__ import annotations

import math

import numpy as np

from .v1 import tensor_pb2

__all__ = ["DTYPES", "TensorError", "encode_tensor", "decode_tensor"]

DTYPES = {name: np.dtype(name).newbyteorder("<") for name in
          ("float16", "float32", "float64", "int32", "int64", "uint8", "bool")}
MAX_DIMS = 8


class TensorError(ValueError):
    """A tensor message that does not describe a valid array (or exceeds a limit)."""


def encode_tensor(array) -> tensor_pb2.Tensor:
    """A numpy array (or anything ``np.asarray`` takes, e.g. a CPU torch tensor) → message."""
    a = np.asarray(array)
    if a.dtype.name not in DTYPES:
        raise TensorError(f"dtype {a.dtype} cannot travel; use one of {', '.join(DTYPES)}")
    a = np.asarray(a, dtype=DTYPES[a.dtype.name])  # (ascontiguousarray would make a 0-d array 1-d)
    return tensor_pb2.Tensor(dtype=a.dtype.name, shape=list(a.shape), data=a.tobytes(order="C"))


def decode_tensor(msg: tensor_pb2.Tensor, *, name: str = "tensor", max_elements: int | None = None,
                  shape: tuple | None = None, dtypes: tuple[str, ...] | None = None) -> np.ndarray:
    """Message → a writable numpy array in native byte order, validated before allocation.

    ``shape``: the expected shape, ``None`` entries free; ``dtypes``: the accepted dtypes.
    """
    if msg.dtype not in DTYPES:
        raise TensorError(f"{name}: unknown dtype {msg.dtype!r}; use one of {', '.join(DTYPES)}")
    if dtypes is not None and msg.dtype not in dtypes:
        raise TensorError(f"{name}: dtype {msg.dtype} is not accepted here; use {', '.join(dtypes)}")
    dims = tuple(int(d) for d in msg.shape)
    if len(dims) > MAX_DIMS or any(d < 0 for d in dims):
        raise TensorError(f"{name}: invalid shape {list(dims)}")
    count = math.prod(dims)
    if max_elements is not None and count > max_elements:
        raise TensorError(f"{name}: {count} elements exceed the limit of {max_elements}")
    if shape is not None and (len(shape) != len(dims) or
                              any(s is not None and s != d for s, d in zip(shape, dims))):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise TensorError(f"{name}: shape {dims} does not match the expected {want}")
    dtype = DTYPES[msg.dtype]
    if len(msg.data) != count * dtype.itemsize:
        raise TensorError(f"{name}: {len(msg.data)} bytes do not hold {list(dims)} × {msg.dtype} "
                          f"({count * dtype.itemsize} bytes)")
    return np.frombuffer(msg.data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))
