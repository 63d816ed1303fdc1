"""Server-side DP-FedAvg: clipping bound, noise moments, where its randomness comes from, accounting."""

import numpy as np
import pytest
import torch

from privacy.mechanism.accountant import epsilon
from privacy.mechanism.randomness import DpRandom, seed_key
from server.user_dp import UserDpSpec, clip_update, noisy_mean, poisson_cohort, private_round, server_random

REF = {"w": torch.zeros(200, 50)}


def test_clipping_bounds_the_norm_and_keeps_small_updates():
    big, norm = clip_update({"w": torch.full((3, 4), 10.0)}, clip_norm=2.0)
    assert norm == pytest.approx(10.0 * 12 ** 0.5) and float(big["w"].norm()) == pytest.approx(2.0)
    small, _ = clip_update({"w": torch.full((3, 4), 0.01)}, clip_norm=2.0)
    torch.testing.assert_close(small["w"], torch.full((3, 4), 0.01, dtype=torch.float64))


def test_noise_has_the_calibrated_std_and_zero_mean():
    spec = UserDpSpec(clip_norm=1.0, noise_multiplier=2.0, sample_rate=0.1, delta=1e-5)
    out = noisy_mean([], REF, spec, eligible=100, rng=DpRandom(seed_key(0)))["w"]
    expected_std = 2.0 * 1.0 / (0.1 * 100)
    assert float(out.std()) == pytest.approx(expected_std, rel=0.02)
    assert abs(float(out.mean())) < 4 * expected_std / out.numel() ** 0.5


def test_mean_uses_the_expected_cohort_and_seed_is_reproducible():
    spec = UserDpSpec(clip_norm=1.0, noise_multiplier=0.0, sample_rate=0.5, delta=1e-5)
    updates = [{"w": torch.ones(200, 50, dtype=torch.float64)}] * 3
    out = noisy_mean(updates, REF, spec, eligible=10, rng=DpRandom(seed_key(0)))
    torch.testing.assert_close(out["w"], torch.full((200, 50), 3 / 5, dtype=torch.float64))
    noisy = UserDpSpec(clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.5, delta=1e-5)
    a = noisy_mean(updates, REF, noisy, 10, DpRandom(seed_key(5)))["w"]
    b = noisy_mean(updates, REF, noisy, 10, DpRandom(seed_key(5)))["w"]
    c = noisy_mean(updates, REF, noisy, 10, DpRandom(seed_key(6)))["w"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_user_level_accounting_matches_dp_notes():
    """dp-notes: z=1, q=0.01 over 100 / 1000 rounds -> PLD 0.72 / 1.83."""
    spec = UserDpSpec(clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.01, delta=1e-5)
    assert epsilon([spec.event()] * 100, delta=1e-5) == pytest.approx(0.72, rel=0.03)
    assert epsilon([spec.event()] * 1000, delta=1e-5) == pytest.approx(1.83, rel=0.02)


def test_user_level_draws_come_from_a_fresh_chacha20_key(monkeypatch):
    """Not a saved state, not a default generator: each server process keys its own ChaCha20 stream."""
    import server.user_dp as user_dp
    from privacy.mechanism import randomness

    assert not np.array_equal(server_random(-1, 0).normal((64,)), server_random(-1, 0).normal((64,)))
    monkeypatch.setattr(randomness, "fresh_key", lambda: b"\x42" * 32)
    assert np.array_equal(server_random(-1, 0).normal((64,)), randomness.DpRandom(b"\x42" * 32).normal((64,)))
    assert user_dp.DpRandom is randomness.DpRandom


def test_debugging_noise_seed_is_reproducible_but_not_replayed_after_a_resume():
    def draw(seed, counted):
        return server_random(seed, counted).normal((64,))

    assert np.array_equal(draw(3, 0), draw(3, 0))  # the same fresh run twice: same noise (debugging only)
    assert not np.array_equal(draw(3, 0), draw(3, 2))  # a process resuming after 2 counted rounds: other noise


def test_cohorts_are_poisson_draws_of_the_stream():
    rng = server_random(-1, 0)
    nodes = list(range(512))
    assert poisson_cohort(nodes, 1.0, rng) == nodes and poisson_cohort(nodes, 0.0, rng) == []
    assert poisson_cohort(nodes, 0.5, rng) != poisson_cohort(nodes, 0.5, rng)  # a tie: 2^-512
    key = b"\x07" * 32
    from privacy.mechanism.randomness import DpRandom

    expected = [n for n, u in zip(nodes, DpRandom(key).uniform(512)) if u < 0.3]
    assert poisson_cohort(nodes, 0.3, DpRandom(key)) == expected


def test_a_user_level_release_draws_no_default_generator(monkeypatch):
    """The server's cohort and noise with torch's and NumPy's default random functions made to raise."""
    def refuse(*_, **__):
        raise AssertionError("a default generator was used")

    for name in ("rand", "randn", "normal", "randint", "randperm", "bernoulli", "Generator", "manual_seed"):
        monkeypatch.setattr(torch, name, refuse)
    for name in ("random", "rand", "randn", "normal", "default_rng", "seed", "RandomState", "Generator"):
        monkeypatch.setattr(np.random, name, refuse)
    rng = server_random(-1, 0)
    sent = {"b": torch.zeros(4, 3)}
    states = [{"b": torch.ones(4, 3)} for _ in poisson_cohort(list(range(10)), 0.5, rng)]
    spec = UserDpSpec(clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.5, delta=1e-5)
    new, record = private_round(1, states, sent, spec, 10, rng, [])
    assert new["b"].shape == (4, 3) and "clipped_fraction" not in record