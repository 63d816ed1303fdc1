from client.app import noise_seed


def test_default_seed_is_fresh_entropy_not_derivable_by_the_server():
    seeds = {noise_seed(-1, "GHR", "run-1", 3) for _ in range(20)}
    assert len(seeds) == 20


def test_configured_seed_is_reproducible_and_distinct_per_client_and_round():
    assert noise_seed(7, "GHR", "run-1", 3) == noise_seed(7, "GHR", "run-1", 3)
    assert len({noise_seed(7, c, "run-1", r) for c in ("GHR", "GARD") for r in (1, 2)}) == 4
