"""``fedslm data FILE``: what each simulated client would get, before anything trains.

A newcomer with their own file sees, per client, the records it trains on and holds out,
its labels (label task) or its values of the partition column, and how long its examples
are in the model's tokens (and how many the window cuts); then the resolved verbalizers, the
window fitted to the file (slm.window) and one example exactly as the model will see it. The same checks as
``fedslm simulate`` run first (simulation.preflight.check_data), so a bad value is the same
one line. Only the tokenizer is loaded (slm.tokenizer), never the weights.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import replace

from fedslm.common.config import describe_fields, parse_assignment, resolve
from fedslm.common.vocabulary import RunConfig
from simulation.preflight import check_data, fit_window
from simulation.scenarios import describe_split, get_scenario
from slm.tasks import IGNORE, Task, encode

SHOWN_CLIENTS = 12  # a phone federation has 1,090: the first ones and a summary
SHOWN_VALUES = 8  # label / partition values per client


def show_data(path: str, assignments: list[str], clients: int | None = None, scenario: str = "hospital") -> str:
    from slm.tokenizer import load_tokenizer

    chosen = get_scenario(scenario)
    overrides = {**dict(parse_assignment(item) for item in assignments), "data.path": path}
    config = resolve(overrides, base=chosen.overrides)
    clients = clients if clients is not None else chosen.clients
    shares = check_data(config, clients)  # resolves a label task's verbalizers into config
    tokenizer = load_tokenizer(RunConfig.parse(config).model.name)
    fitted = fit_window(config, shares, tokenizer)  # and the window
    specs = RunConfig.parse(config)
    task = Task.of(specs)
    uncut = replace(task, max_length=10**9)  # the whole example, to count what max-length cuts
    column = specs.task.label_field if task.kind == "label" else specs.partition.partition_by
    lines = [f"data {path}: {specs.task.task} task ({describe_fields(specs.task)}), "
             f"{describe_split(specs.partition, clients)}, {specs.site_data.test_fraction:g} of each held out; "
             f"tokens of model {specs.model.name}"]
    if task.kind == "label":
        lines.append(f"verbalizers (value=word, as every client scores them): {specs.task.verbalizers}")
    lines.append(f"window: {fitted.describe()}")
    for local in shares[:SHOWN_CLIENTS]:
        records = local.train + local.test
        lengths = sorted(len(encode(uncut, tokenizer, r, where=f"of client '{local.name}'").input_ids)
                         for r in records)
        over = sum(n > task.max_length for n in lengths)
        line = (f"{local.name}: {len(local.train)} train / {len(local.test)} held out; tokens min {lengths[0]} / "
                f"median {statistics.median(lengths):g} / max {lengths[-1]}, {over} over the window "
                f"{task.max_length}")
        if column in records[0] and (task.kind == "label" or specs.partition.partition != "iid"):
            counts = Counter(str(r[column]).strip() for r in records).most_common()
            shown = ", ".join(f"{value} {n}" for value, n in counts[:SHOWN_VALUES])
            more = f", and {len(counts) - SHOWN_VALUES} more values" if len(counts) > SHOWN_VALUES else ""
            line += f"; {column}: {shown}{more}"
        lines.append(line)
    if len(shares) > SHOWN_CLIENTS:
        sizes = [len(local.train) for local in shares]
        lines.append(f"... and {len(shares) - SHOWN_CLIENTS} more clients ({min(sizes)} to {max(sizes)} train "
                     "records each)")
    example = encode(task, tokenizer, shares[0].train[0], where=f"of client '{shares[0].name}'")
    lines.append(f"example ({shares[0].name}'s first training record, {len(example.input_ids)} tokens, "
                 "as the model sees it; loss on the part after '>>>'):")
    cut = next((i for i, label in enumerate(example.labels) if label != IGNORE), len(example.labels))
    lines.append(tokenizer.decode(example.input_ids[:cut]) + ">>>" + tokenizer.decode(example.input_ids[cut:]))
    return "\n".join(lines)
