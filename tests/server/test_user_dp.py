"""Server-side DP-FedAvg: clipping bound, noise moments, where its randomness comes from, accounting."""

import random

import pytest
import torch

from privacy.mechanism.accountant import epsilon
from server.user_dp import UserDpSpec, clip_update, cohort_rng, noise_generator, noisy_mean, poisson_cohort

REF = {"w": torch.zeros(200, 50)}


def test_clipping_bounds_the_norm_and_keeps_small_updates():
    big, norm = clip_update({"w": torch.full((3, 4), 10.0)}, clip_norm=2.0)
    assert norm == pytest.approx(10.0 * 12 ** 0.5) and float(big["w"].norm()) == pytest.approx(2.0)
    small, _ = clip_update({"w": torch.full((3, 4), 0.01)}, clip_norm=2.0)
    torch.testing.assert_close(small["w"], torch.full((3, 4), 0.01, dtype=torch.float64))


def test_noise_has_the_calibrated_std_and_zero_mean():
    spec = UserDpSpec(clip_norm=1.0, noise_multiplier=2.0, sample_rate=0.1, delta=1e-5)
    out = noisy_mean([], REF, spec, eligible=100, generator=torch.Generator().manual_seed(0))["w"]
    expected_std = 2.0 * 1.0 / (0.1 * 100)
    assert float(out.std()) == pytest.approx(expected_std, rel=0.02)
    assert abs(float(out.mean())) < 4 * expected_std / out.numel() ** 0.5


def test_mean_uses_the_expected_cohort_and_seed_is_reproducible():
    spec = UserDpSpec(clip_norm=1.0, noise_multiplier=0.0, sample_rate=0.5, delta=1e-5)
    updates = [{"w": torch.ones(200, 50, dtype=torch.float64)}] * 3
    out = noisy_mean(updates, REF, spec, eligible=10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["w"], torch.full((200, 50), 3 / 5, dtype=torch.float64))
    noisy = UserDpSpec(clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.5, delta=1e-5)
    a = noisy_mean(updates, REF, noisy, 10, torch.Generator().manual_seed(5))["w"]
    b = noisy_mean(updates, REF, noisy, 10, torch.Generator().manual_seed(5))["w"]
    c = noisy_mean(updates, REF, noisy, 10, torch.Generator().manual_seed(6))["w"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_user_level_accounting_matches_dp_notes():
    """dp-notes: z=1, q=0.01 over 100 / 1000 rounds -> PLD 0.72 / 1.83."""
    spec = UserDpSpec(clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.01, delta=1e-5)
    assert epsilon([spec.event()] * 100, delta=1e-5) == pytest.approx(0.72, rel=0.03)
    assert epsilon([spec.event()] * 1000, delta=1e-5) == pytest.approx(1.83, rel=0.02)


def test_noise_generator_is_filled_from_fresh_os_entropy(monkeypatch):
    """Not a 32-bit manual_seed, not a saved state: the generator is built from fresh_entropy() in each process."""
    import server.user_dp as user_dp
    from privacy.mechanism.entropy import generator_from_entropy

    assert not torch.equal(torch.randn(64, generator=noise_generator(-1, 0)),
                           torch.randn(64, generator=noise_generator(-1, 0)))
    monkeypatch.setattr(user_dp, "fresh_entropy", lambda: b"\x42" * 32)
    assert torch.equal(torch.randn(64, generator=noise_generator(-1, 0)),
                       torch.randn(64, generator=generator_from_entropy(b"\x42" * 32)))


def test_debugging_noise_seed_is_reproducible_but_not_replayed_after_a_resume():
    def draw(seed, counted):
        return torch.randn(64, generator=noise_generator(seed, counted))

    assert torch.equal(draw(3, 0), draw(3, 0))  # the same fresh run twice: same noise (debugging only)
    assert not torch.equal(draw(3, 0), draw(3, 2))  # a process resuming after 2 counted rounds: other noise
    assert not torch.equal(draw(3, 0), torch.randn(64, generator=torch.Generator().manual_seed(3)))


def test_cohorts_come_from_the_os_csprng():
    rng = cohort_rng()
    assert isinstance(rng, random.SystemRandom)
    nodes = list(range(512))
    assert poisson_cohort(nodes, 1.0, rng) == nodes
    assert poisson_cohort(nodes, 0.5, rng) != poisson_cohort(nodes, 0.5, rng)  # a tie: 2^-512
