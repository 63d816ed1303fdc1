"""Named federations: a scenario is a number of simulated clients plus config overrides.

- ``tiny``: the tiny config-built Llama on 2 iid shares of the packaged MedQuAD excerpt,
  with DP. Seconds per round; for smoke tests.
- ``hospital`` (the demo): SmolLM2-135M-Instruct, 4 clients = 4 MedQuAD source
  institutes (natural partition by ``source``), instruction SFT, DP-SGD with a per-client
  target epsilon of 8 over the planned rounds; at the end the merged model is exported as
  Q8_0 and Q4_0 GGUF files, shipped to the 4 clients and evaluated there.
- ``phone``: SmolLM2-135M as a keyboard model: 1,090 clients = 1,090 Shakespeare roles
  (one user each, 3 lines to train on, 1 held out), next-word prediction (perplexity,
  top-1/top-3), about 11 clients Poisson-sampled per round, user-level DP on the server
  (the unit of privacy is the whole user); sample-level DP-SGD is off, since 3 records
  give it nothing to average over. A fixed 5% of the users evaluate each round. Each phone
  trains within a phone's memory: int8 base, freed memory returned, one example per pass,
  recomputed layers (docs/PHONE.md). At the end each evaluating phone gets the untrained
  base as Q4_0 GGUF once (the app's install) and the global adapter as a 0.9 MB llama.cpp
  LoRA file, evaluated on that base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedslm.common.errors import UserError
from fedslm.common.vocabulary import Partition, RunConfig

EXAMPLES = Path(__file__).resolve().parent / "examples"  # package data: the scenarios' records, never a site's
DEMO_DATA = EXAMPLES / "medquad_4_institutes.jsonl"  # the hospital demo's (and the tiny scenario's) 4 institutes
PHONE_DATA = EXAMPLES / "shakespeare_roles.jsonl"
PHONE_USERS = 1090  # roles in the packaged excerpt (natural partition: one client per role)


@dataclass(frozen=True)
class Scenario:
    name: str
    clients: int
    overrides: dict = field(default_factory=dict)
    about: str = ""


SCENARIOS = {
    "tiny": Scenario(
        name="tiny",
        clients=2,
        about="tiny Llama, 2 iid clients of the MedQuAD excerpt, DP on, seconds per round",
        overrides={
            "model.name": "tiny",
            "model.max-length-cap": 64,
            "data.path": str(DEMO_DATA),
            "data.partition": "iid",
            "data.max-train-examples": 64,
            "data.max-eval-examples": 16,
            "train.local-steps": 3,
            "train.batch-size": 4,
            "server.rounds": 2,
            "server.min-clients": 1,
        },
    ),
    "hospital": Scenario(
        name="hospital",
        clients=4,
        about="SmolLM2-135M, 4 MedQuAD institutes (natural split), instruction SFT, DP eps 8 per client",
        overrides={
            "model.name": "smollm2",
            "data.path": str(DEMO_DATA),
            "data.task": "sft",
            "data.partition": "natural",
            "data.partition-by": "source",
            "dp.enabled": True,
            "dp.target-epsilon": 8.0,
            "dp.max-epsilon": 8.0,
            "server.rounds": 3,
            "server.min-clients": 2,
            "ship.quantizations": "q8_0,q4_0",
        },
    ),
    "phone": Scenario(
        name="phone",
        clients=PHONE_USERS,
        about="SmolLM2-135M, 1,090 phone users (Shakespeare roles), next-word prediction, ~11 users per round, "
              "user-level DP",
        overrides={
            "model.name": "smollm2",
            "model.max-length": 32,
            # a phone's memory (BENCHMARKS.md, "Phone memory"): int8 base, freed memory returned to the OS,
            # one example per forward/backward pass, decoder layers recomputed in the backward pass; the
            # update is the same as without them
            "model.dtype": "int8",
            "model.return-freed-memory": True,
            "train.physical-batch-size": 1,
            "train.recompute": True,
            "data.path": str(PHONE_DATA),
            "data.task": "next-word",
            "data.text-field": "text",
            "data.partition": "natural",
            "data.partition-by": "user",
            "data.test-fraction": 0.25,
            "data.max-eval-examples": 0,
            "train.batch-size": 3,
            "train.local-steps": 2,
            "dp.enabled": False,
            "user-dp.enabled": True,
            "user-dp.clip-norm": 0.5,
            "user-dp.noise-multiplier": 1.0,
            "server.aggregation": "ffa",
            "server.fraction-train": 0.01,
            "server.fraction-evaluate": 0.05,
            "server.min-clients": 1,
            "server.rounds": 5,
            "ship.kind": "adapter",  # a keyboard app ships its base once; updates are the 0.9 MB adapter
            "ship.quantizations": "q4_0",
        },
    ),
}


def describe(scenario: Scenario, specs: RunConfig, clients: int, overrides: dict) -> str:
    """The banner's words: the scenario's own, unless the user changed its data, model or clients;
    then the file, task, fields, labels and split actually used (``specs`` as the preflight left them)."""
    changed = clients != scenario.clients or any(key.startswith(("data.", "model.name")) for key in overrides)
    if not changed:
        return scenario.about
    from fedslm.common.config import describe_fields

    path = specs.site_data.path
    file = "the packaged MedQuAD excerpt" if path == str(DEMO_DATA) else Path(path).name
    return (f"{specs.model.name}, {file}, {specs.task.task} task ({describe_fields(specs.task)}), "
            f"{describe_split(specs.partition, clients)}")


def describe_split(split: Partition, clients: int) -> str:
    by = split.partition_by
    words = {"iid": "iid split", "natural": f"natural split by '{by}'",
             "dirichlet": f"dirichlet split by '{by}' (alpha {split.dirichlet_alpha:g})"}
    return f"{words[split.partition]} over {clients} clients"


def get_scenario(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise UserError(f"unknown scenario '{name}' (choose from {', '.join(SCENARIOS)})")
    return SCENARIOS[name]
