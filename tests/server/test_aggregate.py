"""The three aggregations, checked against the quantity each one claims to compute."""

import pytest
import torch

from server.aggregate import aggregate, average_lora_factors, average_lora_products, lora_pairs

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


def client(seed, rank=2, out=6, inp=5, a=None):
    g = torch.Generator().manual_seed(seed)
    return {A: a if a is not None else torch.randn(rank, inp, generator=g), B: torch.randn(out, rank, generator=g)}


def mean_product(states, weights):
    total = sum(weights)
    return sum(s[B].double() @ s[A].double() * (w / total) for s, w in zip(states, weights))


@pytest.mark.parametrize("kind", ["fedavg", "ffa", "svd"])
def test_one_client_is_returned_unchanged(kind):
    state = client(0)
    out = aggregate(kind, [state], [17])
    if kind == "svd":  # the factorization may differ; the update B A may not
        torch.testing.assert_close(out[B] @ out[A], state[B] @ state[A], rtol=1e-5, atol=1e-6)
    else:
        assert all(torch.equal(out[k], state[k]) for k in state)


def test_ffa_equals_the_mean_of_the_products_exactly():
    shared_a = torch.randn(2, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    states = [{k: v.double() for k, v in client(s, a=shared_a).items()} for s in (1, 2, 3)]  # float64: no rounding
    weights = [10, 30, 60]
    b_only = [{B: s[B]} for s in states]
    out = aggregate("ffa", b_only, weights)
    torch.testing.assert_close((out[B].double() @ shared_a.double()), mean_product(states, weights),
                               rtol=1e-12, atol=1e-12)


def test_fedavg_cross_terms_are_not_the_mean_update():
    """mean(B) mean(A) != mean(B A) once clients' A differ: the reason ffa and svd exist."""
    states, weights = [client(1), client(2)], [1, 1]
    out = average_lora_factors(states, weights)
    error = (out[B].double() @ out[A].double() - mean_product(states, weights)).norm()
    assert error > 0.1 * mean_product(states, weights).norm()


def test_svd_reconstructs_a_rank_r_mean_exactly():
    """Two rank-1 clients sharing their column space: the mean has rank 1 <= r, so it is exact."""
    g = torch.Generator().manual_seed(4)
    u = torch.randn(6, 1, generator=g)
    states = [{A: torch.cat([torch.randn(1, 5, generator=g), torch.zeros(1, 5)]), B: torch.cat([u * c, torch.zeros(6, 1)], 1)}
              for c in (1.0, -2.0)]
    out = average_lora_products(states, [3, 1])
    torch.testing.assert_close(out[B].double() @ out[A].double(), mean_product(states, [3, 1]), rtol=1e-6, atol=1e-9)
    assert out[A].shape == (2, 5) and out[B].shape == (6, 2)


def test_svd_is_the_best_rank_r_approximation_of_the_mean():
    states, weights = [client(s) for s in range(4)], [1, 2, 3, 4]
    out = average_lora_products(states, weights)
    mean = mean_product(states, weights)
    singular = torch.linalg.svdvals(mean)
    residual = (out[B].double() @ out[A].double() - mean).norm()
    torch.testing.assert_close(residual, singular[2:].norm(), rtol=1e-6, atol=1e-9)  # Eckart-Young


def test_invalid_weights_and_unpaired_factors():
    with pytest.raises(ValueError):
        average_lora_factors([client(0)], [0])
    with pytest.raises(ValueError, match="no matching lora_B"):
        lora_pairs({A})
