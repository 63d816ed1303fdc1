"""``fedslm warm-start FILE --out DIR``: the coordinator trains the starting adapter on PUBLIC data.

Why: at epsilon 8 a small site's DP-SGD steps are mostly noise, and every step taken from
data that needs no protection is a step the sites' budgets do not pay for. The coordinator
trains the adapter on a public file of the same kind (e.g. medical QA that no site holds)
without DP, before the first round, and the run starts from it (``server.initial-adapter``).
No site's record is read, so no site's budget is spent; the guarantee the sites' DP-SGD
gives holds for any starting adapter chosen independently of their data. What fedslm
cannot check is that the file is public: a file holding a site's records would be trained
on without any protection, and the report says where the starting adapter came from.

Same model, LoRA settings, task, fields and verbalizers as the run (``--scenario`` and
``--set`` as ``fedslm simulate`` takes them); with FFA-LoRA (the aggregation under DP) only
the B factors train, so the A factors stay the shared seed's that every site derives. The
file is split as a site's is (``data.test-fraction`` held out) and the held-out loss before
and after is recorded. Writes DIR as PEFT's adapter format plus ``warm_start.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedslm.common.errors import UserError
from fedslm.common.vocabulary import RunConfig
from server.initial_adapter import WARM_START_FILE
from slm.digest import sha256_of


def warm_start(path: str, out: str, assignments: list[str], scenario: str = "hospital", steps: int = 100,
               batch_size: int = 8, lr: float = 1e-3, say=print) -> dict:
    """Train the starting adapter on ``path``; write it to ``out``; return what warm_start.json records."""
    from client.data import DataSpec, check_fields, load_local_data, resolve_verbalizers
    from client.records import read_table
    from fedslm.common.config import parse_assignment, resolve
    from simulation.scenarios import get_scenario
    from slm.window import fit

    target = Path(out).expanduser().resolve()
    if target.exists() and any(target.iterdir()):
        raise UserError(f"--out {target}: not empty; a warm start writes a new directory")
    specs = RunConfig.parse(resolve({**dict(parse_assignment(item) for item in assignments), "data.path": path},
                                    base=get_scenario(scenario).overrides))
    spec = DataSpec.of(specs)
    table = read_table(spec.path)
    check_fields(table, spec)
    specs = specs.changed("task", verbalizers=resolve_verbalizers(spec, table))
    local = load_local_data(DataSpec.of(specs), 0, 1)
    if not local.test:
        raise UserError(f"data file {path}: no held-out records (data.test-fraction {spec.test_fraction:g})")
    import torch

    from client.train import train_adapter
    from slm.base import resolve_model_dir
    from slm.evaluate import evaluate
    from slm.lora import LoraSpec, adapter_state, attach, frozen_a_factors, save_adapter, set_adapter_state
    from slm.tasks import Task
    from slm.tokenizer import load_tokenizer

    specs = fit(specs, load_tokenizer(specs.model.name), local.train[:400]).applied(specs)
    task, lora, aggregation = Task.of(specs), LoraSpec.of(specs.lora), specs.server.aggregation
    model, tokenizer = attach(specs.model.name, lora, specs.model.dtype)
    seeded = {k: v.clone() for k, v in adapter_state(model).items()}  # the cached model is shared: restored below
    started = time.perf_counter()
    try:
        before = evaluate(model, tokenizer, task, local.test)
        with frozen_a_factors(model, freeze=aggregation == "ffa"), torch.random.fork_rng():
            torch.manual_seed(specs.partition.seed)
            train_adapter(model, tokenizer, task, local.train, steps=steps,
                          batch_size=min(batch_size, len(local.train)), lr=lr, noise_multiplier=None, clip_norm=0.0,
                          seed=specs.partition.seed, physical_batch_size=specs.train.physical_batch_size,
                          on_step=lambda step, total: say(f"[fedslm] warm start: step {step}/{total}")
                          if step % 20 == 0 or step == total else None)
        after = evaluate(model, tokenizer, task, local.test)
        state = {k: v.detach().clone() for k, v in adapter_state(model).items()}
    finally:
        set_adapter_state(model, seeded)
    save_adapter(state, lora, str(resolve_model_dir(specs.model.name)), target)
    record = {
        "adapter_sha256": sha256_of(target / "adapter_model.safetensors"), "file": Path(path).name,
        "file_sha256": sha256_of(Path(path)), "train_records": len(local.train), "held_out_records": len(local.test),
        "steps": steps, "batch_size": batch_size, "lr": lr, "model": specs.model.name, "task": task.kind,
        "verbalizers": specs.task.verbalizers, "max_length": task.max_length, "lora_r": lora.r,
        "lora_seed": specs.lora.seed, "aggregation": aggregation,
        "trained": "B factors only (FFA-LoRA)" if aggregation == "ffa" else "A and B",
        "held_out_before": _metric(before), "held_out_after": _metric(after),
        "seconds": round(time.perf_counter() - started, 1)}
    from fedslm.common.jsonfiles import write_json_atomic

    write_json_atomic(target / WARM_START_FILE, record, strict=True)
    return record


def _metric(result: dict) -> dict:
    return {k: round(float(v), 4) for k, v in result.items() if k in ("eval_loss", "accuracy")}
