"""DP randomness: every bit of the entropy matters, and torch's own seeding would not do."""

import torch

from privacy.mechanism.entropy import fresh_entropy, generator_from_entropy, round_entropy, seed_entropy


def noise(entropy: bytes, n: int = 64) -> torch.Tensor:
    return torch.normal(0.0, 1.0, (n,), generator=generator_from_entropy(entropy))


def test_entropies_differing_only_above_bit_32_give_different_noise():
    low = (5).to_bytes(32, "little")
    for bit in (32, 40, 63, 64, 127, 255):
        high = (5 + (1 << bit)).to_bytes(32, "little")
        assert not torch.equal(noise(low), noise(high)), bit


def test_torch_manual_seed_keeps_only_32_bits_which_is_why_we_do_not_use_it():
    # The attack this module closes: two seeds differing above bit 32 give the same stream.
    a = torch.rand(8, generator=torch.Generator().manual_seed(5))
    b = torch.rand(8, generator=torch.Generator().manual_seed(5 + (1 << 40)))
    assert torch.equal(a, b)


def test_same_entropy_same_stream_and_gaussian_moments():
    entropy = fresh_entropy()
    assert torch.equal(noise(entropy), noise(entropy))
    sample = noise(entropy, 200_000)
    assert abs(float(sample.mean())) < 0.01 and abs(float(sample.std()) - 1.0) < 0.01


def test_fresh_entropy_is_256_bits_and_never_repeats():
    draws = {fresh_entropy() for _ in range(50)}
    assert len(draws) == 50 and all(len(d) == 32 for d in draws)
    assert len({round_entropy(-1, "site", "run", 1) for _ in range(20)}) == 20


def test_a_configured_seed_is_reproducible_and_distinct_per_site_and_round():
    assert round_entropy(7, "GHR", "run-1", 3) == round_entropy(7, "GHR", "run-1", 3) == seed_entropy(7, "GHR", "run-1", 3)
    assert len({round_entropy(7, c, "run-1", r) for c in ("GHR", "GARD") for r in (1, 2)}) == 4
