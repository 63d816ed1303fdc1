"""DP randomness: a ChaCha20 keystream, its uniforms, coin flips and Gaussians (privacy.mechanism.randomness).

What would fail if the generator were swapped for a seeded Mersenne Twister, a Philox or
NumPy's default: the known-answer test (RFC 7539 / RFC 8439 keystream), the check against
an independent ChaCha20 from the ``cryptography`` package, and the Box-Muller reference
computed here from raw keystream words.
"""

import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from privacy.mechanism.randomness import KEY_BYTES, DpRandom, fresh_key, round_key, seed_key

# RFC 7539 appendix A.1, test vector 1 (= RFC 8439 A.1): key 0, nonce 0, block counter 0.
RFC_8439_A1 = bytes.fromhex("76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
                            "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586")


def test_the_keystream_is_chacha20_by_its_known_answer():
    assert DpRandom(bytes(32)).keystream(64) == RFC_8439_A1


def test_the_keystream_continues_as_one_chacha20_stream():
    key = fresh_key()
    rng = DpRandom(key)
    drawn = rng.keystream(10) + rng.keystream(1000) + rng.keystream(77)  # reads in pieces, as rounds do
    reference = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(1087))
    assert drawn == reference


def test_uniforms_are_53_bit_words_of_the_stream():
    key = fresh_key()
    words = np.frombuffer(DpRandom(key).keystream(8 * 1000), dtype="<u8")
    u = DpRandom(key).uniform(1000)
    assert np.array_equal(u, (words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)
    assert u.min() >= 0.0 and u.max() < 1.0


def test_normals_are_box_muller_of_the_stream_in_float64():
    key = fresh_key()
    u = DpRandom(key).uniform(10)
    r, theta = np.sqrt(-2.0 * np.log(1.0 - u[:5])), 2.0 * math.pi * u[5:]
    expected = np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:9] * 0.25
    got = DpRandom(key).normal((3, 3), 0.25)
    assert got.dtype == np.float64 and got.shape == (3, 3)
    assert np.allclose(got.ravel(), expected, rtol=0, atol=1e-15)


def test_normals_have_gaussian_moments_and_pass_kolmogorov_smirnov():
    z = DpRandom.fresh().normal((400_000,), 1.0)
    assert abs(z.mean()) < 0.006 and abs(z.std() - 1.0) < 0.005
    assert abs(stats.kurtosis(z)) < 0.05 and abs(stats.skew(z)) < 0.03
    assert stats.kstest(z, "norm").pvalue > 1e-4


def test_coin_flips_have_the_asked_rate():
    flips = DpRandom.fresh().bernoulli(200_000, 0.03)
    assert abs(flips.mean() - 0.03) < 5 * math.sqrt(0.03 * 0.97 / 200_000)
    assert not DpRandom.fresh().bernoulli(1000, 0.0).any() and DpRandom.fresh().bernoulli(1000, 1.0).all()
    with pytest.raises(ValueError):
        DpRandom.fresh().bernoulli(3, 1.5)


def test_fresh_keys_are_256_bits_and_never_repeat():
    keys = {fresh_key() for _ in range(50)}
    assert len(keys) == 50 and all(len(k) == KEY_BYTES for k in keys)
    assert len({round_key(-1, "site", "run", 1) for _ in range(20)}) == 20
    with pytest.raises(ValueError):
        DpRandom(b"\x00" * 16)  # 128 bits: not a ChaCha20 key


def test_a_configured_seed_is_reproducible_and_distinct_per_site_and_round():
    assert round_key(7, "GHR", "run-1", 3) == round_key(7, "GHR", "run-1", 3) == seed_key(7, "GHR", "run-1", 3)
    assert len({round_key(7, c, "run-1", r) for c in ("GHR", "GARD") for r in (1, 2)}) == 4
    a, b = (DpRandom(seed_key(7, "x")).normal((64,)) for _ in range(2))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, DpRandom(seed_key(7 + (1 << 40), "x")).normal((64,)))  # every bit of the seed
