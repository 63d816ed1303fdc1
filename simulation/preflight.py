"""Check a simulated federation's inputs before any worker starts.

A bad file, field or batch size found inside a Ray worker surfaces as a remote traceback
after the engine has spun up (and the run may still end "done"); checked here it is one
clear line and exit 2. Key ranges were checked when the config was resolved
(fedslm.common.vocabulary.RANGES); here come the checks that need the file, the number of clients and
the tokenizer. Also converts the default model once, in this process, before workers race
to do it.
"""

from __future__ import annotations

import itertools

from client.data import DataSpec, LocalData, check_fields, held_out_table, load_local_data, resolve_verbalizers
from client.records import read_table
from client.units import group_by_unit, sample_rate
from fedslm.common.errors import UserError
from fedslm.common.vocabulary import RunConfig
from slm.tasks import Task, encode
from slm.window import Fit, fit

WINDOW_SAMPLE = 400  # training records encoded to fit the window and count what it cuts (about a second each pass)


def preflight(config: dict, num_clients: int) -> list[str]:
    """Validate everything; return one description line per client, then what the window cuts.

    A label task's verbalizers are resolved here, once, from the whole file, and written
    into ``config`` (which every ClientApp receives): every party scores the same candidates.
    The file is checked first, with nothing heavier than the standard library imported: a
    bad file is one line within a second; torch, peft and the model come after.
    """
    least = RunConfig.parse(config).server.min_clients
    if least > num_clients:
        raise UserError(f"config key 'server.min-clients': {least} is more than the "
                        f"{num_clients} clients: every round would be skipped")
    clients = check_data(config, num_clients)
    from client.site import SitePolicy
    from server.round_spec import RoundSpec
    from slm.base import resolve_model_dir
    from slm.lora import LoraSpec

    specs = RunConfig.parse(config)
    LoraSpec.of(specs.lora)
    RoundSpec.of(specs)
    if specs.dp.privacy_unit_field and specs.dp.enabled and specs.train.grad_sample_mode == "ghost":
        raise UserError("config key 'train.grad-sample-mode' = ghost cannot train with dp.privacy-unit-field: a "
                        "unit's gradient is the mean of its records' gradients, which ghost clipping never forms; "
                        "use hooks or functorch")
    resolve_model_dir(specs.model.name)
    if specs.server.initial_adapter:
        from server.initial_adapter import check_directory

        check_directory(specs.server.initial_adapter)
    for local in clients:
        SitePolicy.for_simulation(specs, local.name, run_dir="")
    lines = [f"{local.name}: {len(local.train)} train / {len(local.test)} test records" for local in clients]
    return [*lines, window_line(config, clients)]


def window_line(config: dict, clients: list[LocalData]) -> str:
    """The window fitted to the data (slm.window, written into ``config``), and how many records it cuts, and how.

    Measured on a sample of up to WINDOW_SAMPLE training records, round robin over the clients.
    Also the check that the template and a label task's candidate words leave room for the text
    (encode raises, naming model.max-length, on the first record).
    """
    from slm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(RunConfig.parse(config).model.name)
    fitted = fit_window(config, clients, tokenizer)
    task = Task.from_config(config)
    sample = training_sample(clients)
    cut = sum(encode(task, tokenizer, r, where="a training record").cut for r in sample)
    how = {"sft": "the prompt in the middle of its text, chat template and instruction kept; the response at its "
                  "end", "label": "the text at its end, instruction and labels kept",
           "next-word": "the text at its end"}[task.kind]
    return (f"window: {fitted.describe()}; " + (f"{cut} of {len(sample)} sampled training records exceed it and "
                                                f"are cut: {how}" if cut else
                                                f"all {len(sample)} sampled training records fit"))


def fit_window(config: dict, clients: list[LocalData], tokenizer) -> Fit:
    """model.max-length and data.label-list fitted to the training records, written into ``config``."""
    fitted = fit(RunConfig.parse(config), tokenizer, training_sample(clients))
    config.update(fitted.settings())
    return fitted


def training_sample(clients: list[LocalData]) -> list[dict]:
    """Up to WINDOW_SAMPLE training records, round robin over the clients (each client's first ones)."""
    rounds = itertools.zip_longest(*(local.train for local in clients))
    return [r for rows in rounds for r in rows if r is not None][:WINDOW_SAMPLE]


def check_data(config: dict, num_clients: int) -> list[LocalData]:
    """The file, its fields and labels, and every client's share (train and held out non-empty).

    Resolves a label task's data.verbalizers into ``config`` (see ``preflight``).
    """
    if num_clients < 1:
        raise UserError("--clients: must be at least 1")
    spec = DataSpec.from_config(config)
    table = read_table(spec.path)
    check_fields(table, spec)
    held = held_out_table(spec)
    config["data.verbalizers"] = resolve_verbalizers(spec, table, *held)
    check_record_count(spec, num_clients, table, *held)
    specs = RunConfig.parse(config)
    Task.of(specs)  # the prompt template's placeholders
    spec, unit, batch = DataSpec.of(specs), specs.dp.privacy_unit_field, specs.train.batch_size
    clients = []
    for pid in range(num_clients):
        local = load_local_data(spec, pid, num_clients)
        if unit:  # the batch counts expected units (client.unit_sgd)
            units = group_by_unit(local.train, unit, f"data file {spec.path}")
            sample_rate(batch, len(units), where=f"client '{local.name}'", what=f"units ({unit})")
        else:
            sample_rate(batch, len(local.train), where=f"client '{local.name}'")
        if not local.test:
            raise UserError(f"data file {spec.path}: client '{local.name}' has no held-out records "
                            f"({len(local.train)} records; data.test-fraction {spec.test_fraction:g})")
        clients.append(local)
    return clients


def check_record_count(spec: DataSpec, num_clients: int, table, *held) -> None:
    """Each simulated client needs a record to train on and one to hold out (from data.eval-path when set).

    Too few records for the clients is the file's size or the client count, said as such,
    not the batch size or an empty held-out side that it would surface as client by client.
    A natural split's client count is its number of groups, checked by the partition.
    """
    if spec.partition == "natural" and num_clients > 1:
        return
    needs = [(spec.path, table, 1, "one to train") if held else (spec.path, table, 2, "one to train, one to hold out")]
    needs += [(spec.eval_path, records, 1, "one to hold out") for records in held]
    for path, records, each, why in needs:
        if len(records) < each * num_clients:
            most = len(records) // each
            fix = f"use --clients {most} or fewer, or give" if most else "give"
            raise UserError(f"data file {path}: {_count(len(records), 'record')} for {_count(num_clients, 'client')}, "
                            f"and each client needs at least {each} ({why}): {fix} a file of at least "
                            f"{each * num_clients} records")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
