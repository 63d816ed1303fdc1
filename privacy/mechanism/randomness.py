"""Where every DP random draw comes from: a ChaCha20 keystream keyed by 256 bits of OS entropy.

Why a cryptographic generator. A DP release is private only while its noise is unknown.
torch's and NumPy's default generators are Mersenne Twisters (torch's CUDA one a Philox):
MT19937 is linear over GF(2), so from a few thousand released values that are pure noise
(a coordinator can ask for such releases: a clip norm near 0, dropout near 1, a float32
wire) its whole state follows by linear algebra, and with it every later noise value of
the round — the noise can then be subtracted and what remains is a record's clipped
gradient. No seeding fixes that: it is the generator's structure. A stream cipher's
keystream reveals nothing about its key or about other parts of the stream (that is
what makes it a cipher), so seeing any number of draws tells nothing about the others.

The generator: ChaCha20 (Bernstein 2008; IETF variant, RFC 8439) from the ``cryptography``
package (OpenSSL), keyed by ``KEY_BYTES`` of ``os.urandom``; the keystream is read as
little-endian 64-bit words. Every DP decision draws from it:

- Poisson sampling (``bernoulli``): record i is in the batch iff u_i < q, with u_i a
  uniform in [0, 1) carrying 53 random bits (w >> 11) * 2^-53, the float64 grid.
- Gaussian noise (``normal``): the Box-Muller transform (Box & Muller 1958) in float64,
  z = sqrt(-2 ln u1) * cos(2 pi u2) and sqrt(-2 ln u1) * sin(2 pi u2), with u1 in (0, 1]
  (1 - u, so ln never sees 0) and u2 in [0, 1); scaled by the standard deviation in
  float64 and only then rounded to the parameter's dtype.

What this does not give (docs/THREAT-MODEL.md): a continuous Gaussian on a floating-point
grid is not exactly a Gaussian; the floating-point attacks of Mironov (CCS 2012) on
Laplace samplers and of Jin et al. (IEEE S&P 2022) on Gaussian ones (Box-Muller and
polar) read which outputs are reachable. Our releases are a function of many noised
coordinates passed through Adam and rounded to the wire dtype, which these attacks do not
address; a discrete Gaussian (Canonne, Kamath & Steinke, NeurIPS 2020) would remove the
question and is weighed in BENCHMARKS.md.

A fixed seed (``dp.noise-seed`` / ``server.noise-seed`` >= 0, simulation only) keys the same
cipher with sha256 of the seed and the round's identity: reproducible, and NOT private
against whoever knows the seed.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32  # 256 bits: ChaCha20's key size
_NONCE = bytes(16)  # cryptography's ChaCha20 nonce: 4-byte block counter + 12-byte nonce; a key is used once
_UNIT = 2.0 ** -53


def fresh_key() -> bytes:
    return os.urandom(KEY_BYTES)


def seed_key(seed: int, *parts) -> bytes:
    """The key of a reproducible debugging run (NOT private against whoever knows the seed)."""
    return hashlib.sha256("|".join(map(str, (seed, *parts))).encode()).digest()


def round_key(configured_seed: int, *parts) -> bytes:
    """A round's key: fresh from the OS, or (configured seed >= 0, debugging only) derived from it."""
    return fresh_key() if configured_seed < 0 else seed_key(configured_seed, *parts)


class DpRandom:
    """One ChaCha20 keystream; every DP draw of a round (or of a server process) reads it in order.

    Not thread-safe and not copyable on purpose: two readers of one key would release
    correlated noise.
    """

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise ValueError(f"a DP random key has {KEY_BYTES} bytes (256 bits), got {len(key)}")
        self._stream = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()

    @classmethod
    def fresh(cls) -> "DpRandom":
        return cls(fresh_key())

    def keystream(self, n: int) -> bytes:
        """The next ``n`` bytes of the keystream (ChaCha20 encrypting zeros)."""
        return self._stream.update(bytes(n))

    def words(self, n: int) -> np.ndarray:
        return np.frombuffer(self.keystream(8 * n), dtype="<u8").astype(np.uint64, copy=False)

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 uniforms in [0, 1), 53 random bits each."""
        return (self.words(n) >> np.uint64(11)).astype(np.float64) * _UNIT

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        """``n`` independent coin flips with P(True) = p: Poisson sampling's inclusion mask."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"a probability is in [0, 1], got {p!r}")
        return self.uniform(n) < p

    def normal(self, shape, std: float = 1.0) -> np.ndarray:
        """float64 N(0, std^2) of ``shape`` by Box-Muller (two normals per pair of uniforms)."""
        shape = tuple(shape)
        count = math.prod(shape)
        pairs = (count + 1) // 2
        u = self.uniform(2 * pairs)
        radius = np.sqrt(-2.0 * np.log1p(-u[:pairs]))  # ln(1 - u), 1 - u in (0, 1]
        angle = (2.0 * math.pi) * u[pairs:]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]
        return (z * float(std)).reshape(shape)
