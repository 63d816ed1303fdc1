"""GGUF block quantization (Q4_0, Q5_0, Q8_0) with a per-block scale search.

gguf-py's own quantizers are the reference ones: each block of 32 weights gets the scale
d = max / -8 (Q4_0), i.e. the largest weight lands exactly on the extra negative level and
everything else is rounded to the nearest level of that grid. That is the fastest choice,
not the most accurate: a slightly smaller or larger scale often lowers the block's error,
because the largest weight is one value while the other 31 share the grid. llama.cpp's
quantizer (``make_qx_quants``, used when given an importance matrix) therefore tries a
range of scales per block and keeps the one with the smallest weighted squared error; we
do the same, vectorized with numpy over all blocks of a tensor:

- for every candidate inverse scale ``-(nmax + step * i) / max`` the block is rounded and
  clipped, then the scale is refitted by weighted least squares (d = sum w x q / sum w q^2);
- the candidate with the smallest error sum w (x - d q)^2 wins; the scale is stored as
  fp16 and the block re-rounded against that fp16 scale (nearest level: optimal per weight).

``weights`` (same shape as the tensor, or one value per input column) says which errors
matter: uniform = plain MSE; an importance matrix (mean squared activation of each input
column, collected on calibration text) makes the error the expected error of the layer's
output, which is what the loss sees. The bytes are exactly gguf's block layout; tests check
them with ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

BLOCK = 32
# (lowest level, highest level) of each symmetric format: value = d * q
_LEVELS = {T.Q4_0: (-8, 7), T.Q5_0: (-16, 15), T.Q8_0: (-127, 127)}
_CHUNK = 1 << 16  # blocks per vectorized pass: bounds the temporary arrays to ~100 MB


def searchable(qtype) -> bool:
    return qtype in _LEVELS


def quantize(data: np.ndarray, qtype, weights: np.ndarray | None = None, steps: int = 9) -> np.ndarray:
    """``data`` (rows, cols) float32 -> gguf's raw block bytes (rows, bytes per row) for ``qtype``.

    ``weights``: None (plain MSE), shape (cols,) (one importance per input column) or the
    shape of ``data``. ``steps``: candidate scales on each side of the reference one (0 =
    the reference quantizer's scale, refitted).
    """
    rows, cols = data.shape
    if cols % BLOCK:
        raise ValueError(f"row length {cols} is not a multiple of {BLOCK}")
    blocks = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, BLOCK)
    if weights is None:
        w = None
    elif weights.shape == (cols,):
        w = np.broadcast_to(weights.astype(np.float32).reshape(1, -1), (rows, cols)).reshape(-1, BLOCK)
    else:
        w = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1, BLOCK)
    out = [_quantize_blocks(blocks[i:i + _CHUNK], None if w is None else w[i:i + _CHUNK], qtype, steps)
           for i in range(0, len(blocks), _CHUNK)]
    return np.concatenate(out).reshape(rows, -1)


def _quantize_blocks(x: np.ndarray, w: np.ndarray | None, qtype, steps: int) -> np.ndarray:
    lo, hi = _LEVELS[qtype]
    if w is None:
        w = np.ones_like(x)
    imax = np.abs(x).argmax(axis=1)
    peak = x[np.arange(len(x)), imax][:, None]  # signed largest-magnitude weight
    safe_peak = np.where(peak == 0, 1.0, peak).astype(np.float32)
    nmax = -lo if qtype != T.Q8_0 else hi  # reference: peak -> lo (Q4_0/Q5_0), |peak| -> hi (Q8_0)
    sign = -1.0 if qtype != T.Q8_0 else 1.0
    best_err = np.full((len(x), 1), np.inf, dtype=np.float32)
    best_d = np.zeros((len(x), 1), dtype=np.float32)
    step = 0.1 if qtype != T.Q8_0 else 1.0
    for i in range(-steps, steps + 1):
        iscale = sign * (nmax + step * i) / safe_peak
        q = np.clip(np.rint(x * iscale), lo, hi)
        sum_wxq = (w * x * q).sum(axis=1, keepdims=True)
        sum_wqq = (w * q * q).sum(axis=1, keepdims=True)
        d = np.where(sum_wqq > 0, sum_wxq / np.where(sum_wqq > 0, sum_wqq, 1), 0).astype(np.float32)
        err = (w * (x - d * q) ** 2).sum(axis=1, keepdims=True)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_d = np.where(better, d, best_d)
    d16 = best_d.astype(np.float16)
    d32 = d16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d32 == 0, 0, np.clip(np.rint(x / d32), lo, hi)).astype(np.int16)
    return _pack(d16, q, qtype)


def _pack(d16: np.ndarray, q: np.ndarray, qtype) -> np.ndarray:
    n = len(q)
    scale = d16.reshape(n, 1).view(np.uint8)
    if qtype == T.Q8_0:
        return np.concatenate([scale, q.astype(np.int8).view(np.uint8)], axis=1)
    u = (q - _LEVELS[qtype][0]).astype(np.uint8)  # 0..15 or 0..31
    halves = u.reshape(n, 2, BLOCK // 2)
    low = (halves[:, 0, :] & 0x0F) | ((halves[:, 1, :] & 0x0F) << 4)
    if qtype == T.Q4_0:
        return np.concatenate([scale, low], axis=1)
    high = np.packbits((u >> 4).reshape(n, 1, BLOCK), axis=-1, bitorder="little").reshape(n, 4)
    return np.concatenate([scale, high, low], axis=1)
