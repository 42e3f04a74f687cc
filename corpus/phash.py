"""Perceptual hashes (pHash) of video frames, computed for a whole batch with numpy.

pHash of one frame: grayscale (ITU-R 601 weights, as PIL's ``"L"``), area-resize to 32x32,
2-D DCT-II, keep the ``side x side`` lowest frequencies, set a bit where a coefficient is
above the block's median. ``side`` is 8 for 64-bit hashes (the classic pHash, as
``imagehash.phash``) and 16 for 256-bit hashes. Both come from the same 32x32 image, so the
64-bit hash is the top-left quarter of the 256-bit coefficient block and one pass gives both.

Every step before the threshold is linear, so resize, grayscale and the low-frequency DCT
fold into two small matrices per frame size: the whole batch is two matrix products, not
one Python call per frame. Coefficients are rounded to integers before the threshold so
a flat frame (all AC coefficients zero) and exact ties hash the same on every machine and
in every summation order; the rounding is far below the scale of any real image detail.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

HASH_BITS = (64, 256)
# ITU-R 601 luma, what PIL uses for convert("L").
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# Float values per matrix product: about 1.5 MB, so the float copy stays in cache.
_CHUNK_VALUES = 200_000


def hash_side(bits: int) -> int:
    """Side of the low-frequency DCT block for a hash of ``bits`` bits."""
    if bits not in HASH_BITS:
        raise ValueError(f"hash size must be one of {HASH_BITS} bits, got {bits}")
    return math.isqrt(bits)


# Side of the grayscale square a frame is reduced to before the DCT.
RESIZE_SIDE = 32


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Row i averages the input pixels covered by output cell i (area resampling)."""
    scale = n_in / n_out
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        start, stop = i * scale, (i + 1) * scale
        for p in range(math.floor(start), min(math.ceil(stop), n_in)):
            matrix[i, p] = min(stop, p + 1) - max(start, p)
    return matrix / scale


def dct_matrix(n: int, k: int) -> np.ndarray:
    """First ``k`` rows of the unnormalised DCT-II of length ``n`` (scipy's ``norm=None``)."""
    rows = np.arange(k)[:, None]
    cols = np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * rows * (2 * cols + 1) / (2 * n))


@lru_cache(maxsize=32)
def _projections(height: int, width: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(side x H) row projection and (3W x side) column projection with grayscale folded in."""
    dct = dct_matrix(RESIZE_SIDE, side)
    rows = dct @ area_matrix(height, RESIZE_SIDE)
    cols = dct @ area_matrix(width, RESIZE_SIDE)  # side x W
    gray = np.asarray(GRAY_WEIGHTS)
    cols_gray = np.einsum("kw,c->wck", cols, gray).reshape(width * 3, side)
    return rows, cols_gray


def low_frequencies(frames: np.ndarray, side: int = 16) -> np.ndarray:
    """(B, side, side) low-frequency DCT-II block of a (B, H, W, 3) uint8 batch."""
    count, height, width, _ = frames.shape
    rows, cols = _projections(height, width, side)
    out = np.empty((count, side, side))
    # Small chunks in one reused buffer keep the float copy in cache; a fresh float array
    # per batch costs more in page faults than the arithmetic. float64 keeps the rounding
    # before the threshold exact (float32 drifts by whole units on 720p frames).
    chunk = max(1, min(count, _CHUNK_VALUES // (height * width * 3)))
    buffer = np.empty((chunk * height, width * 3))
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        block = buffer[: n * height]
        np.copyto(block, frames[start : start + n].reshape(n * height, width * 3))
        reduced = (block @ cols).reshape(n, height, side)
        out[start : start + n] = np.matmul(rows, reduced)
    return out


def threshold_bits(coefficients: np.ndarray) -> np.ndarray:
    """Packed hash bits (B, bits/8) uint8 from (B, side, side) DCT coefficients."""
    flat = np.rint(coefficients.reshape(len(coefficients), -1))
    median = np.median(flat, axis=1, keepdims=True)
    return np.packbits(flat > median, axis=1)


def detail(coefficients: np.ndarray) -> np.ndarray:
    """Standard deviation (grey levels) of the low-pass image the hash sees, per frame.

    Near zero on black, white and fade frames: their hash carries no information, so
    matching uses only frames above a minimum detail.
    """
    side, size = coefficients.shape[-1], RESIZE_SIDE
    # Orthonormal DCT scale factors turn the sum of squared AC coefficients into N^2 var.
    scale = np.full(side, math.sqrt(1.0 / (2 * size)))
    scale[0] = math.sqrt(1.0 / (4 * size))
    ortho = coefficients * np.outer(scale, scale)
    energy = (ortho**2).reshape(len(coefficients), -1)[:, 1:].sum(axis=1)
    return (np.sqrt(energy) / size).astype(np.float32)


@lru_cache(maxsize=1)
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    # Built once: it scans every loaded shared library, which costs milliseconds.
    return ThreadpoolController()


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    # The products here are skinny (N = 8 or 16 columns): BLAS threads only contend, and on
    # a shared 2-core machine OpenBLAS's spinning threads made hashing 4-10x slower.
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


def _as_batches(frames: np.ndarray | Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group frames by shape: (indices, stacked batch) per shape, keeping input order."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"expected a (B, H, W, 3) uint8 array, got {frames.shape} {frames.dtype}"
            )
        return [(np.arange(len(frames)), frames)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, frame in enumerate(frames):
        if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
            raise ValueError(
                f"frame {i}: expected an (H, W, 3) uint8 array, got {frame.shape} {frame.dtype}"
            )
        groups.setdefault(frame.shape, []).append(i)
    return [(np.array(idx), np.stack([frames[i] for i in idx])) for idx in groups.values()]


def phash_frames_multi(
    frames: np.ndarray | Sequence[np.ndarray], bits: Sequence[int] = HASH_BITS
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """pHashes of every frame at several sizes in one pass: ({bits: codes}, detail).

    ``frames`` is a (B, H, W, 3) uint8 RGB array or a list of (H, W, 3) arrays (sizes may
    differ). Codes are (B, bits/8) uint8, packed big-endian, the layout faiss binary indexes
    use. ``detail`` (B,) is the grey-level standard deviation of the low-pass image.
    """
    sides = {b: hash_side(b) for b in bits}
    side = max(sides.values())
    batches = _as_batches(frames)
    total = sum(len(idx) for idx, _ in batches)
    codes = {b: np.zeros((total, b // 8), dtype=np.uint8) for b in bits}
    details = np.zeros(total, dtype=np.float32)
    for idx, batch in batches:
        with _one_blas_thread():
            coefficients = low_frequencies(batch, side)
        for b, s in sides.items():
            codes[b][idx] = threshold_bits(coefficients[:, :s, :s])
        # Always from the 8x8 block, so a frame's detail does not depend on the hash sizes asked.
        details[idx] = detail(coefficients[:, :8, :8])
    return codes, details


def phash_frames(
    frames: np.ndarray | Sequence[np.ndarray], bits: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """pHash of every frame: (codes (B, bits/8) uint8, detail (B,) float32)."""
    codes, details = phash_frames_multi(frames, (bits,))
    return codes[bits], details


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount_bytes(packed: np.ndarray) -> np.ndarray:
    """Number of set bits along the last axis of a uint8 array."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(packed).sum(axis=-1, dtype=np.int32)
    return _POPCOUNT[packed].sum(axis=-1, dtype=np.int32)  # numpy < 2.0


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between packed codes, broadcasting over leading axes."""
    if hasattr(np, "bitwise_count") and a.shape[-1] % 8 == 0 and b.shape[-1] % 8 == 0:
        # 64-bit words: 8x fewer elements to XOR and count.
        a = np.ascontiguousarray(a).view(np.uint64)
        b = np.ascontiguousarray(b).view(np.uint64)
    return popcount_bytes(np.bitwise_xor(a, b))


def chance_match_probability(bits: int, distance: int) -> float:
    """Probability that two independent uniformly random hashes are within ``distance``.

    This is the floor of the false-match rate of one frame pair: P(Binomial(bits, 1/2) <=
    distance). For 64 bits and distance 30 it is 0.354.
    """
    return sum(math.comb(bits, k) for k in range(distance + 1)) / 2**bits
