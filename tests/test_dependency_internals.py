"""The private names of our dependencies that fedslm relies on, pinned: an upgrade fails here, by name.

Each dependency's internals are used in one module of ours (named in each test), because the
public API does not offer what that module needs. Their behaviour is tested where they are
used; these tests say *which* internal moved when a pinned version changes (pyproject.toml
pins flwr 1.41.0, opacus 1.6.0), so the fix starts in the right file instead of in a
failing integration test twenty minutes later.
"""

import inspect
import re

import pytest


def source(obj) -> str:
    return re.sub(r"\s+", " ", inspect.getsource(obj))


def test_flower_simulation_engine_takes_what_simulation_engine_passes():
    """simulation/engine.py runs Flower's in-process engine with a Context that carries the run config."""
    from flwr.simulation.run_simulation import _run_simulation

    from simulation import engine

    passed = set(re.findall(r"(\w+)=", source(engine.run_in_simulation).split("_run_simulation(", 1)[1]
                            .split("finally:", 1)[0]))
    params = inspect.signature(_run_simulation).parameters
    assert passed <= set(params), passed - set(params)
    assert {"exit_event", "server_app_context", "is_app"} <= passed


def test_flower_serverapp_crash_log_is_what_server_status_rewrites():
    """server/status.py turns Flower's crash report for a PartialRun into one line."""
    import importlib

    from flwr.simulation import app as simulation_app
    from flwr.supercore.exit import exit as flower_exit

    serverapp_runtime = importlib.import_module("flwr.superlink.runtime.run_serverapp")  # the package shadows it
    for runtime in (serverapp_runtime.run_serverapp, simulation_app.run_simulation_process):
        assert 'log(ERROR, "%s raised an exception", exc_entity, exc_info=ex)' in source(runtime)
    assert 'exit_message = f"Exit Code: {code}\\n" if is_error' in source(flower_exit.flwr_exit)


def test_flower_clientapp_runtime_calls_the_two_names_the_app_guard_replaces():
    """deploy/app_guard.py replaces install_from_fab and get_load_client_app_fn in Flower's ClientApp runtime."""
    from flwr.supernode.runtime import run_clientapp as runtime

    from deploy.app_guard import REPLACED

    for name in REPLACED:
        assert hasattr(runtime, name) and name in runtime.run_clientapp.__code__.co_names
    assert list(inspect.signature(runtime.get_load_client_app_fn).parameters) == [
        "default_app_ref", "app_path", "multi_app"]
    assert {"install_dir", "skip_prompt"} <= set(inspect.signature(runtime.install_from_fab).parameters)


def test_ray_still_has_the_switch_that_keeps_a_local_instance_on_loopback():
    """simulation/engine.py refuses to start Ray on every interface when this constant was read too early."""
    from ray._private import ray_constants

    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in inspect.getsource(ray_constants)


@pytest.mark.parametrize("optimizer", ["DPOptimizer", "DPOptimizerFastGradientClipping"])
def test_opacus_noise_step_is_the_one_client_train_replaces(optimizer):
    """client/train.py's _CsprngNoise.add_noise mirrors Opacus' add_noise with the noise drawn from ChaCha20.

    If Opacus' step changes (another flag, a rescaling), ours must change with it.
    """
    import opacus
    from opacus.optimizers.optimizer import DPOptimizer
    from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping

    assert opacus.__version__ == "1.6.0"
    cls = {"DPOptimizer": DPOptimizer, "DPOptimizerFastGradientClipping": DPOptimizerFastGradientClipping}[optimizer]
    body = source(cls.add_noise)
    for statement in ("_check_processed_flag(p.summed_grad)", "p.grad = (p.summed_grad + noise).view_as(p)",
                      "_mark_as_processed(p.summed_grad)", "* self.max_grad_norm", "for p in self.params:"):
        assert statement in body, statement
    assert "add_noise()" in source(DPOptimizer.pre_step)


def test_opacus_ghost_clipping_hands_over_activations_and_backprops():
    """client/train.py's _GhostClippingFp32Norms upcasts what rearrange_grad_samples returns."""
    from opacus import GradSampleModule
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping

    assert list(inspect.signature(GradSampleModuleFastGradientClipping.rearrange_grad_samples).parameters) == [
        "self", "module", "backprops", "loss_reduction", "batch_first"]
    assert callable(GradSampleModule._close)  # train_adapter undoes make_private on a model it reuses


def test_peft_registers_the_int8_base_custom_module():
    """slm/lora.py registers PEFT's LoRA Linear for the int8 base (slm/int8_base.py) by a private method."""
    from peft import LoraConfig

    assert list(inspect.signature(LoraConfig._register_custom_module).parameters) == ["self", "mapping"]


def test_opacus_prv_sizes_its_grid_where_the_accountant_sizes_it():
    """privacy/mechanism/accountant.py overrides PRVAccountant._get_domain with the half-width it computed
    from cached RDP curves, which is compute_safe_domain_size's: both must still be what Opacus calls."""
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import domain

    assert list(inspect.signature(PRVAccountant._get_domain).parameters) == [
        "self", "prvs", "num_self_compositions", "eps_error", "delta_error"]
    assert "self._get_domain(" in source(PRVAccountant._get_dprv)
    assert "return max(L_max, eps_error) + 3" in source(domain.compute_safe_domain_size)
