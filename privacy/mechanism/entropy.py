"""Where DP randomness comes from: generators whose whole state is fresh OS entropy.

Why not ``torch.Generator().manual_seed(secrets.randbits(63))``: torch's CPU generator is
a Mersenne Twister, and ``manual_seed`` initialises it from the low 32 bits of the seed
(at::mt19937 ``init_with_uint32``). Anyone who knows the initial adapter, sigma, q and the
steps could try all 2^32 seeds, regenerate the Poisson batches and the noise, and
subtract the noise from the released update. So the twister's entire 624-word state is
filled from ``ENTROPY_BYTES`` (256 bits) of ``os.urandom``, expanded with SHAKE-256:
guessing the state is as hard as guessing 256 random bits.

What this does NOT give: the Mersenne Twister is not a cryptographic generator (624
consecutive raw outputs reveal its state; nobody outside the process sees raw outputs
here, only noised sums), and the Gaussian sampler is torch's floating-point one (the
floating-point attacks of Mironov 2012 are not mitigated; Opacus' secure_mode, which
would, needs torchcsprng, not installable here). Reports say so.

A fixed seed (``dp.noise-seed`` >= 0, simulation only) goes through the same expansion,
so debugging runs are reproducible and still differ in every bit of the seed.
"""

from __future__ import annotations

import hashlib
import os
import struct

import torch

ENTROPY_BYTES = 32  # 256 bits, above the 128 the threat model asks for
_MT_WORDS = 624
_STATE_OFFSET = 24  # CPUGeneratorImplStateLegacy: seed u64, left i32, seeded i32, next u64, state u64[624], ...
_STATE_BYTES = 5056


def fresh_entropy() -> bytes:
    return os.urandom(ENTROPY_BYTES)


def seed_entropy(seed: int, *parts) -> bytes:
    """Entropy for a reproducible (NOT private against whoever knows the seed) debugging run."""
    return hashlib.sha256("|".join(map(str, (seed, *parts))).encode()).digest()


def round_entropy(configured_seed: int, *parts) -> bytes:
    """A round's entropy: fresh from the OS, or (configured seed >= 0, debugging only) derived from it."""
    return fresh_entropy() if configured_seed < 0 else seed_entropy(configured_seed, *parts)


def generator_from_entropy(entropy: bytes) -> torch.Generator:
    """A CPU generator whose full Mersenne-Twister state is derived from ``entropy``.

    Every bit of ``entropy`` changes the state (SHAKE-256 expansion), so two entropies
    that differ only above bit 32 give unrelated streams.
    """
    if len(entropy) < 16:
        raise ValueError("at least 128 bits of entropy are required")
    generator = torch.Generator()
    raw = bytearray(bytes(generator.get_state().numpy()))
    if len(raw) != _STATE_BYTES:  # a torch whose state layout we have not checked
        raise RuntimeError(f"unexpected torch CPU generator state size {len(raw)}; update privacy.mechanism.entropy")
    words = struct.unpack(f"<{_MT_WORDS}I", hashlib.shake_256(entropy).digest(4 * _MT_WORDS))
    struct.pack_into("<QiiQ", raw, 0, 0, 1, 1, 0)  # initial seed (unused), left = 1 (twist next), seeded, next
    struct.pack_into(f"<{_MT_WORDS}Q", raw, _STATE_OFFSET, *words)
    raw[_STATE_OFFSET + 8 * _MT_WORDS:] = bytes(len(raw) - _STATE_OFFSET - 8 * _MT_WORDS)  # no cached normals
    generator.set_state(torch.tensor(list(raw), dtype=torch.uint8))
    return generator
