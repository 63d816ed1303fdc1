"""Ray resources a simulation cannot be given are refused in one line, before Ray starts."""

import pytest
import torch

from fedslm.common.errors import UserError
from simulation.engine import run_in_simulation


@pytest.mark.parametrize("kwargs, words", [
    ({"gpus_per_client": -0.5}, "--gpus-per-client -0.5: must be 0 or more"),
    ({"gpus_per_client": 1.5}, "--gpus-per-client 1.5: above 1 it must be a whole number"),
    ({"cpus_per_client": 0}, "--cpus-per-client 0: must be 1 to"),
    ({"ray_address": "my cluster"}, "--ray-address 'my cluster': expected HOST:PORT"),
])
def test_impossible_resources_are_refused(config, kwargs, words):
    with pytest.raises(UserError, match=words):
        run_in_simulation(config, 2, **kwargs)


def test_a_cuda_model_needs_a_gpu_reservation(config):
    with pytest.raises(UserError, match="model.device=cuda needs --gpus-per-client"):
        run_in_simulation({**config, "model.device": "cuda"}, 2)


def test_more_gpus_than_this_machine_has_are_refused(config):
    too_many = torch.cuda.device_count() + 1  # would never be placed: Ray would wait forever
    with pytest.raises(UserError, match=f"--gpus-per-client {too_many}: this machine has"):
        run_in_simulation(config, 2, gpus_per_client=too_many)
