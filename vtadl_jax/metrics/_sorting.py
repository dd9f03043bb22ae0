"""Sorting scores together with a small integer payload (a label or a region id).

NumPy's ``argsort`` is several times slower than ``sort`` on large float arrays (``sort``
has a vectorised kernel, ``argsort`` mostly not), and the metrics only need each score's
payload in score order, not the permutation itself. When the scores are exactly
representable as float32 they are mapped to order-preserving unsigned 32-bit keys and
packed with the payload into one uint64 (score key in the high word, payload in the low
word), so a single ``np.sort`` of uint64 gives both. Other inputs fall back to argsort.
"""
from __future__ import annotations

import numpy as np

__all__ = ["sort_with_payload", "group_ends"]

_SIGN = np.uint32(0x80000000)


def _float32_to_key(x: np.ndarray) -> np.ndarray:
    """Order-preserving map float32 (no NaN) -> uint32: x < y  <=>  key(x) < key(y).

    Positive floats get the sign bit set, negative floats have all bits flipped; -0.0
    and +0.0 become two adjacent keys (they still compare equal as floats).
    """
    bits = x.view(np.uint32)
    flip = (bits >> np.uint32(31)) * np.uint32(0x7FFFFFFF)  # 0x7FFFFFFF where negative
    flip |= _SIGN
    flip ^= bits
    return flip


def _key_to_float32(key: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_float32_to_key`."""
    positive = (key >> np.uint32(31)).astype(bool)
    flip = np.where(positive, _SIGN, np.uint32(0xFFFFFFFF))
    flip ^= key
    return flip.view(np.float32)


def _exact_float32(scores: np.ndarray) -> np.ndarray | None:
    """``scores`` as float32 when that conversion is exact (order and ties kept), else None."""
    if scores.dtype == np.float32:
        return scores
    if scores.dtype != np.float64:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        as32 = scores.astype(np.float32)
    if np.array_equal(as32.astype(np.float64), scores):
        return as32
    return None


def sort_with_payload(scores: np.ndarray, payload: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Scores in increasing order, and the payload carried along.

    Args:
      scores: (P,) float32 or float64, no NaN.
      payload: (P,) non-negative integers below 2**32.

    Returns:
      sorted_scores: (P,) same dtype as ``scores``, increasing.
      sorted_payload: (P,) the payload permuted like the scores (order inside ties is
        unspecified, which the metrics never depend on).
    """
    scores = np.ascontiguousarray(scores).reshape(-1)
    payload = np.asarray(payload).reshape(-1)
    as32 = _exact_float32(scores)
    if as32 is None:
        order = np.argsort(scores)
        return scores[order], payload[order]
    packed = _float32_to_key(np.ascontiguousarray(as32)).astype(np.uint64)
    packed <<= np.uint64(32)
    unsigned = payload.view(payload.dtype.str.replace("i", "u")) if payload.dtype.kind == "i" \
        else payload  # non-negative, so the bits are the value
    np.bitwise_or(packed, unsigned, out=packed)  # cast in buffered chunks, no P-sized temp
    packed.sort()
    words = packed.view(np.uint32)  # (2P,) low and high words, without copies
    low, high = (words[0::2], words[1::2]) if np.little_endian else (words[1::2], words[0::2])
    sorted_payload = low.astype(payload.dtype)
    key = np.ascontiguousarray(high)
    del packed, words, low, high
    return _key_to_float32(key).astype(scores.dtype, copy=False), sorted_payload


def group_ends(s_sorted: np.ndarray) -> np.ndarray:
    """(T,) int64 index of the last element of each run of equal values in a sorted (P,)
    array (P >= 1); runs of equal scores are the thresholds of the metrics."""
    last = np.empty(s_sorted.size, dtype=bool)
    np.not_equal(s_sorted[1:], s_sorted[:-1], out=last[:-1])
    last[-1] = True
    return np.flatnonzero(last)
