"""LEB128 varints (7 bits per byte, high bit = more follows) for small side tables."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _encode(values: np.ndarray, out: np.ndarray) -> int:
    pos = 0
    for v in values:
        while v >= 128:
            out[pos] = (v & 127) | 128
            v >>= 7
            pos += 1
        out[pos] = v
        pos += 1
    return pos


@numba.njit(cache=True, nogil=True)
def _decode(data: np.ndarray, n: int, out: np.ndarray) -> int:
    """Fills out[:n]; returns bytes consumed, or -1 if the data is short or a value too long."""
    pos = 0
    for i in range(n):
        v = np.uint64(0)
        shift = 0
        while True:
            if pos >= data.shape[0] or shift > 35:
                return -1
            b = data[pos]
            pos += 1
            v |= np.uint64(b & 127) << np.uint64(shift)
            shift += 7
            if b < 128:
                break
        out[i] = v
    return pos


def varint_encode(values: np.ndarray) -> bytes:
    values = np.ascontiguousarray(values, dtype=np.uint64)
    out = np.empty(values.size * 10, dtype=np.uint8)
    return out[:_encode(values, out)].tobytes()


def varint_decode(data: bytes, n: int) -> np.ndarray:
    """Exactly n values (each < 2^35) that must use up all of data; ValueError otherwise."""
    arr = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(n, dtype=np.uint64)
    used = _decode(arr, n, out)
    if used != arr.size:
        raise ValueError(f"varint stream: expected {n} values in {arr.size} bytes, "
                         f"{'ran short' if used < 0 else f'{arr.size - used} bytes left over'}")
    return out
