"""A hostile coordinator against one deployed site, message by message (tiny model, real Opacus).

Each test is one attack from docs/THREAT-MODEL.md: the coordinator crafts the run config
and the round fields of real Flower messages and hands them to the real ClientApp. The
site must refuse, with its reason in the reply and in its own log, or account the release;
and whatever happens, what it released, recomputed from the replies alone with an
independent accountant (dp_accounting PLD), stays within the site's own budget.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from coordinator import Coordinator, Site, independent_epsilon, wire_text

from privacy.mechanism.policy import default_delta
from privacy.mechanism.record import Reason

# PRV (what the site enforces) returns the upper end of its error interval (eps_error 0.01);
# PLD's pessimistic estimate at a 1e-4 grid can sit a little above the true value too.
ACCOUNTANT_TOLERANCE = 0.02
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def site(tmp_path):
    return Site(tmp_path / "site", max_epsilon=2.0)


@pytest.fixture(scope="module")
def coordinator():
    return Coordinator()


def status(reply) -> str:
    return str(reply.content["privacy"]["status"])


def reason(reply) -> str:
    return str(reply.content["privacy"]["reason"])


def code(reply) -> str:
    return str(reply.content["privacy"]["code"])


def refused_with(reply, expected_code: str, detail: str, log: str) -> None:
    """A deployed site's refusal: the code and its fixed sentence leave, the detail stays in the site's log."""
    assert code(reply) == expected_code and reason(reply) == Reason(expected_code).sentence
    assert "arrays" not in reply.content and detail in log and detail not in wire_text(reply)


def spent_within_budget(coordinator: Coordinator, site: Site) -> float:
    """What the site released (the replies), composed independently, is within its budget.

    delta is the site's own rule recomputed here from the record count the replies state
    (the node config sets none), never read from the site's ledger: a ledger whose delta
    regressed would otherwise pass its own check.
    """
    released = [r for r in coordinator.released() if r["client"] == "site-a"]
    records = {int(r["records"]) for r in released if r.get("mechanism", "dp-sgd") == "dp-sgd"}
    delta = default_delta(max(records)) if records else 1e-5
    assert all(r["delta"] == delta for r in released)
    eps = independent_epsilon(released, delta=delta)
    assert eps <= site.max_epsilon + ACCOUNTANT_TOLERANCE
    return eps


def test_changing_the_split_keys_never_opens_a_fresh_ledger(site, coordinator):
    """Issue 13 item 1: data.seed / test-fraction / caps used to key a new ledger at zero spend."""
    coordinator.replies.clear()
    tricks = [{}, {"data.seed": 1}, {"data.test-fraction": 0.3}, {"data.max-train-examples": 20},
              {"data.max-eval-examples": 1}, {"data.path": "/somewhere/else.jsonl"},
              {"dp.ledger-dir": str(site.root / "fresh")}]
    replies = [coordinator.train(site, trick, run_id=f"run-{i}", num_rounds=1) for i, trick in enumerate(tricks)]
    ledger = site.ledger()
    assert list(site.root.glob("**/ledger.json")) == [site.ledger_dir / "ledger.json"]
    trained = [e for e in ledger["entries"] if e["status"] != "refused"]
    assert len({e["data_fingerprint"] for e in trained}) == 1  # the same records, whatever was asked
    assert [e["epsilon_after"] for e in trained] == sorted(e["epsilon_after"] for e in trained)  # only grows
    assert any(status(r) == "refused" and code(r) == "budget" for r in replies)
    spent_within_budget(coordinator, site)


def test_an_appended_record_is_no_fresh_budget_and_waits_for_the_operator(site, coordinator, capsys):
    from client.confirm import confirm_data

    coordinator.replies.clear()
    assert status(coordinator.train(site, num_rounds=3)) == "committed"
    with site.data.open("a") as handle:  # five more: some land on the training side (the split is by record hash)
        handle.write("".join(f'{{"question": "one more {i}?", "answer": "yes"}}\n' for i in range(5)))
    refused = coordinator.train(site, server_round=2, num_rounds=3)
    assert status(refused) == "refused"
    refused_with(refused, "data-changed", "changed since the ledger last accepted them", capsys.readouterr().err)
    toml = site.root / "node.toml"
    toml.write_text("".join(f'{k} = "{v}"\n' if isinstance(v, str) else f"{k} = {v}\n"
                            for k, v in site.node_config.items()))
    assert "confirmed" in confirm_data(toml)
    again = coordinator.train(site, server_round=2, num_rounds=3)
    assert status(again) == "committed"
    first, second = (e for e in site.ledger()["entries"] if e["status"] == "committed")
    assert second["epsilon_after"] > first["epsilon_after"]  # the spend continued
    spent_within_budget(coordinator, site)


def test_delta_is_the_sites_never_the_coordinators(site, coordinator, capsys):
    """Issue 13 item 2: dp.delta came from the run config (0.2 was accepted)."""
    reply = coordinator.train(site, {"dp.delta": 0.2, "dp.max-epsilon": 1000.0})
    assert status(reply) == "committed"
    records = int(reply.content["privacy"]["records"])
    assert site.ledger()["delta"] == reply.content["privacy"]["delta"] == default_delta(records)
    assert reply.content["privacy"]["max_epsilon"] == site.max_epsilon
    log = capsys.readouterr().err
    assert "ignored the coordinator's dp.delta=0.2" in log and "ignored the coordinator's dp.max-epsilon=1000.0" in log


@pytest.mark.parametrize("round_fields, run_config, why", [
    ({"server_round": 5, "num_rounds": 3}, {}, "round 5 of 3 is not a round of the run"),
    ({"server_round": 0, "num_rounds": 3}, {}, "round 0 of 3 is not a round of the run"),
    ({"server_round": -2, "num_rounds": -1}, {}, "is not a round of the run"),
    ({"num_rounds": 10**9}, {}, "exceed the site's max-rounds 1000"),
    ({}, {"train.local-steps": 10**7}, "local steps: the site allows 1 to 1000"),
    ({}, {"train.batch-size": 10**6}, "expected batch 1000000: the site has"),
    ({}, {"train.lr": float("nan")}, "learning rate nan"),
    ({}, {"dp.clip-norm": 0.0}, "clip norm 0.0"),
    ({}, {"dp.clip-norm": float("inf")}, "clip norm inf"),
    ({}, {"dp.clip-norm": 1e-11}, "clip norm 1e-11: the site allows 0.01 or more"),
    ({}, {"lora.dropout": 0.99994}, "LoRA dropout 0.99994: the site allows at most 0.5"),
    ({}, {"model.max-length": 10**6}, "a window of 1000000 tokens: the site allows at most 512"),
    ({}, {"model.max-length": 0, "model.max-length-cap": 4096}, "a window of 4096 tokens: the site allows at most 512"),
    ({}, {"server.wire-dtype": "float32"}, "wire dtype float32: the site sends float16"),
    ({}, {"train.lr": 5.0}, "learning rate 5.0: the site allows (0, 0.1]"),
    ({}, {"data.prompt-template": "{prompt:>100000000}"}, "data.prompt-template"),
    ({}, {"train.grad-sample-mode": "ghost", "train.autocast": "bf16"}, "ghost clipping needs a float32 base"),
    ({}, {"train.grad-sample-mode": "ghost", "model.dtype": "bfloat16"}, "ghost clipping needs a float32 base"),
    ({}, {"train.grad-sample-mode": "ghost", "model.dtype": "int8"}, "ghost clipping needs a float32 base"),
    ({}, {"lora.r": 0}, "config key 'lora.r': must be >= 1"),
    ({}, {"train.local-steps": 1000, "train.batch-size": 30}, "more than 100 times in one round"),
    ({}, {"no.such-key": 1}, "unknown config key 'no.such-key'"),
    ({}, {"data.prompt-field": "diagnosis"}, "not among the columns the site allows"),
    ({}, {"data.task": "label", "data.label-field": "answer"}, "the site approves no label words"),
    ({"run_id": "run\n[fedslm site site-a] forged"}, {}, "run id must be"),
    ({}, {"dp.noise-multiplier": -1.0}, "requested noise multiplier -1.0"),
    ({}, {"dp.target-epsilon": float("nan")}, "target epsilon nan"),
    ({"aggregation": "nothing"}, {}, "aggregation 'nothing'"),
    ({"run_id": ""}, {}, "run id must be"),
])
def test_out_of_bounds_requests_are_refused_with_their_reason(site, coordinator, capsys, round_fields, run_config,
                                                               why):
    """Issue 13 item 3 and the other request fields: refused before anything trains."""
    reply = coordinator.train(site, run_config, **round_fields)
    assert status(reply) == "rejected"
    refused_with(reply, "request-out-of-bounds", why, capsys.readouterr().err)  # the site's own log says why
    assert not (site.ledger_dir / "ledger.json").exists()  # nothing spent, nothing written


def test_the_budget_check_does_not_rest_on_round_numbers(site, coordinator):
    """A coordinator that says 'last round' every time gets each round planned for the whole remainder:
    the reservation (past + this round <= budget) still stops it at the budget."""
    coordinator.replies.clear()
    statuses = [status(coordinator.train(site, {"train.local-steps": 20}, server_round=1, num_rounds=1,
                                         run_id=f"r{i}")) for i in range(6)]
    assert "refused" in statuses and statuses.index("refused") >= 1
    assert all(s == "refused" for s in statuses[statuses.index("refused"):])
    spent_within_budget(coordinator, site)


def test_switching_dp_off_fixing_the_seed_or_asking_for_little_noise_changes_nothing(site, coordinator):
    reply = coordinator.train(site, {"dp.enabled": False, "dp.noise-seed": 7, "dp.noise-multiplier": 0.01})
    privacy = reply.content["privacy"]
    assert privacy["dp"] and privacy["noise_seed"] == "os-entropy" and privacy["noise_multiplier"] >= 0.3
    assert status(reply) == "committed"


def test_nothing_computed_from_training_records_leaves_in_clear(site, coordinator):
    """Issue 13 item 6: train loss and timing used to leave un-noised (batch 1, 1 step: one record's loss)."""
    reply = coordinator.train(site, {"train.batch-size": 1, "train.local-steps": 1})
    assert set(reply.content["metrics"]) == {"num-examples", "steps"}
    assert set(reply.content) == {"arrays", "metrics", "privacy"}
    assert "train_loss" not in str(dict(reply.content["privacy"])) and "seconds" not in reply.content["privacy"]


def test_a_replayed_round_is_accounted_again(site, coordinator):
    coordinator.replies.clear()
    for _ in range(2):
        assert status(coordinator.train(site, run_id="replay", server_round=1)) == "committed"
    entries = [e for e in site.ledger()["entries"] if e["run_id"] == "replay"]
    assert [e["status"] for e in entries] == ["committed", "committed"]
    assert entries[1]["epsilon_after"] > entries[0]["epsilon_after"]
    spent_within_budget(coordinator, site)


def test_concurrent_runs_on_one_site_lose_no_spend(site):
    """Issue 13 item 4: two runs at once used to leave eps 3.51 on disk for a true 4.78.

    Two processes, as two deployed runs' ClientApps are, each training three rounds."""
    script = Path(__file__).with_name("site_process.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent), str(ROOT)])}
    procs = [subprocess.Popen([sys.executable, str(script), json.dumps(site.node_config), run, "3"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for run in ("x", "y")]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    released = [json.loads(line) for out in outputs for line in out.splitlines() if line.strip()]
    spending = [e for e in site.ledger()["entries"] if e["status"] != "refused"]
    assert len(released) >= 2 and len(spending) == len(released)  # every release is on disk
    assert {(e["run_id"], e["round"]) for e in spending} == {(r["run"], r["round"]) for r in released}
    assert independent_epsilon(released, site.ledger()["delta"]) <= site.max_epsilon + ACCOUNTANT_TOLERANCE


def test_evaluation_is_off_unless_the_site_turns_it_on(tmp_path, coordinator, capsys):
    """Attack 6b: clear held-out metrics for any adapter the coordinator sends. A deployed site refuses
    evaluation by default; with evaluate = dp every answer is noised and charged; the cap ends a run's queries."""
    quiet = Site(tmp_path / "quiet")
    reply = coordinator.evaluate(quiet)
    refused_with(reply, "evaluation-off", "evaluate = off", capsys.readouterr().err)
    assert "metrics" not in reply.content and not (quiet.ledger_dir / "ledger.json").exists()


def test_a_dp_evaluation_is_noised_charged_and_capped(tmp_path, coordinator, capsys):
    site = Site(tmp_path / "dp-eval", records=800, extra={"evaluate": "dp", "max-evaluations-per-run": 2,
                                                           "max-eval-examples": 0, "evaluation-loss-bound": 20.0})
    coordinator.replies.clear()
    first, second = (coordinator.evaluate(site, server_round=r) for r in (1, 2))
    losses = [float(r.content["metrics"]["eval_loss"]) for r in (first, second)]
    assert losses[0] != losses[1]  # the same adapter and records: only the noise differs
    entries = site.ledger()["entries"]
    assert [e["mechanism"] for e in entries] == ["dp-evaluation"] * 2 and all(e["status"] == "committed"
                                                                              for e in entries)
    assert entries[1]["epsilon_after"] > entries[0]["epsilon_after"] > 0  # charged to the same ledger
    assert all(e["adapter_sha256"] for e in entries)  # the audit trail names what was evaluated
    privacy = dict(second.content["privacy"])
    assert privacy["mechanism"] == "dp-evaluation" and privacy["sample_rate"] == 1.0
    assert float(second.content["metrics"]["eval_tokens"]) == float(second.content["metrics"]["eval_examples"])
    refused_with(coordinator.evaluate(site, server_round=3), "evaluation-off", "max-evaluations-per-run",
                 capsys.readouterr().err)
    spent_within_budget(coordinator, site)


def test_a_non_sensitive_evaluation_reads_the_declared_file_only(tmp_path, coordinator):
    public = tmp_path / "public.jsonl"
    public.write_text("".join(f'{{"question": "public {i}?", "answer": "yes"}}\n' for i in range(6)))
    site = Site(tmp_path / "public-eval", extra={"evaluate": "non-sensitive", "test-data-path": str(public)})
    reply = coordinator.evaluate(site)
    assert reply.content["metrics"]["num-examples"] == 6 and "eval_loss" in reply.content["metrics"]
    assert [e["mechanism"] for e in site.ledger()["entries"]] == ["evaluation"]  # counted, nothing spent
    assert site.ledger()["entries"][0]["steps"] == 0


def test_a_misspelt_or_partial_node_config_fails_closed(tmp_path, coordinator, capsys, monkeypatch):
    """Attack: 'data-path' misspelt used to make the run config the policy (DP off, clear train loss)."""
    site = Site(tmp_path / "typo")
    site.node_config["data_path"] = site.node_config.pop("data-path")
    for reply in (coordinator.train(site, {"dp.enabled": False}), coordinator.evaluate(site)):
        assert code(reply) == "internal-error" and "arrays" not in reply.content
        assert "metrics" not in reply.content or set(reply.content["metrics"]) == {"num-examples"}
    assert "unknown key 'data_path'" in capsys.readouterr().err  # the site's log says why; the reply does not
    unnamed = Site(tmp_path / "nameless")
    del unnamed.node_config["name"]
    assert code(coordinator.train(unnamed)) == "internal-error"
    assert "'name' is required in a deployment" in capsys.readouterr().err
    guarded_only = Site(tmp_path / "simulation-keys")  # a site's app guard ran: a deployment, whatever the keys
    guarded_only.node_config = {"partition-id": 0, "num-partitions": 1}
    monkeypatch.setenv("FEDSLM_APPROVED_APPS", str(tmp_path / "allow-list"))
    reply = coordinator.train(guarded_only, {"dp.enabled": False, "model.name": "tiny"})
    assert code(reply) == "internal-error" and "arrays" not in reply.content


def test_a_shipped_model_cannot_pick_a_directory_on_the_site(tmp_path, coordinator, capsys):
    """Attack 13: without the site's own shipped-dir, the coordinator's run-dir would choose where files go."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from client.app import evaluate_shipped

    site = Site(tmp_path / "no-models")
    payload = np.frombuffer(b"GGUF" * 8, dtype=np.uint8)
    msg = Message(content=RecordDict({
        "artifact": ArrayRecord({"file": Array(payload)}),
        "config": ConfigRecord({"run-dir": str(tmp_path / "chosen-by-coordinator"), "file": "m.gguf", "bytes": 32,
                                "sha256": "0" * 64, "quant": "q8_0", "run-id": "run-1", "server-round": 1,
                                "aggregation": "ffa"})}), dst_node_id=7, message_type="evaluate.ship")
    context = Context(run_id=1, node_id=7, node_config=site.node_config, state=RecordDict(),
                      run_config={"model.name": "tiny"})
    reply = evaluate_shipped(msg, context)
    refused_with(reply, "request-out-of-bounds", "no shipped-dir in the node config", capsys.readouterr().err)
    assert not (tmp_path / "chosen-by-coordinator").exists()


def test_a_site_that_requires_secure_aggregation_never_trains_in_clear(tmp_path, coordinator, capsys):
    """A coordinator cannot switch SecAgg+ off for a site that requires it: the clear request is refused,
    nothing trains, nothing is spent, and the reply carries no adapter."""
    site = Site(tmp_path / "secure-only", extra={"require-secure-aggregation": True})
    reply = coordinator.train(site, {"server.secure-aggregation": False})
    assert status(reply) == "rejected"
    refused_with(reply, "request-out-of-bounds", "require-secure-aggregation", capsys.readouterr().err)
    assert not (site.ledger_dir / "ledger.json").exists()


# ---- what leaves a site: errors, releases, randomness ------------------------------------------------------

SECRETS = [f"patient {i}, born 19{50 + i}: HIV positive" for i in range(12)]


def sensitive_site(tmp_path) -> Site:
    """A site whose file has a sensitive free-text column ('note') that the coordinator may not name, and an
    allowed column ('diagnosis') that is empty in some records (a data error inside the site)."""
    import json

    site = Site(tmp_path / "sensitive", extra={"fields": "question,answer,diagnosis"})
    rows = [{"question": f"What is condition {i}?", "answer": f"Condition {i} is rare.", "note": SECRETS[i % 12],
             "diagnosis": "" if i % 7 == 3 else f"code {i}"} for i in range(40)]
    site.data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return site


def test_errors_carry_no_records_column_names_indexes_or_paths(tmp_path, coordinator, capsys):
    """Attack 18: a site's exception text went to the coordinator word for word; pointing data.label-field at a
    sensitive column and paging data.verbalizers recovered every value. Every reply, train and evaluate, is
    scanned byte for byte for the values, the column names, record indexes and the site's paths."""
    site = sensitive_site(tmp_path)
    pages = [",".join(f"{value}=w{j}" for j, value in enumerate(SECRETS[k:k + 3])) for k in range(0, 12, 3)]
    requests = [
        *({"data.task": "label", "data.text-field": "question", "data.label-field": "note", "data.verbalizers": page}
          for page in pages),
        {"data.task": "label", "data.text-field": "question", "data.label-field": "answer"},
        {"data.prompt-field": "no-such-column"},
        {"data.prompt-field": "diagnosis"},  # allowed, empty in some records: fails inside the site
        {"data.task": "next-word", "data.text-field": "note"},
        {"model.name": str(tmp_path / "no-such-model")},
        {"data.prompt-template": "{prompt.__class__}"},
    ]
    replies = []
    for run_config in requests:
        replies.append(coordinator.train(site, run_config, run_id="probe"))
        replies.append(coordinator.evaluate(site, run_config, run_id="probe"))
    log = capsys.readouterr().err
    assert "site-a" in log  # the details went to the site's own log
    forbidden = [*SECRETS, "HIV", "born 19", "note", "diagnosis", "no-such-column", "#3", "#10", str(tmp_path),
                 "records.jsonl", "Traceback", "Error"]
    for reply in replies:
        text = wire_text(reply)
        assert code(reply) in {r.value for r in Reason} or status(reply) == "committed"  # model.name: ignored
        leaked = [word for word in forbidden if word in text]
        assert not leaked, f"{leaked} left the site in: {text[:300]}"
    spending = [e for e in site.ledger()["entries"] if e["status"] in ("reserved", "committed")]
    assert len(spending) == len([r for r in replies if status(r) == "committed"])  # no failed round spent


def test_no_budget_is_spent_on_a_round_that_trains_nothing(tmp_path, coordinator):
    """Issue 24 item 3: requests used to fail after ledger.reserve, burning budget with rounds that trained
    nothing. Each request below fails, and the site's ledger holds no spend."""
    site = sensitive_site(tmp_path)
    failing = [{"data.prompt-template": "{prompt:>100000000}"},
               {"train.grad-sample-mode": "ghost", "train.autocast": "bf16"},
               {"train.grad-sample-mode": "ghost", "model.dtype": "bfloat16"},
               {"data.prompt-field": "diagnosis"},  # a record that does not encode: found before reserving
               {"lora.seed": 99},  # A factors differ from the coordinator's digest
               {"train.batch-size": 10**6}]
    for run_config in failing:
        reply = coordinator.train(site, run_config)
        assert status(reply) == "rejected" and "arrays" not in reply.content, run_config
    ledger = site.ledger_dir / "ledger.json"
    assert not ledger.exists() or not [e for e in site.ledger()["entries"] if e["status"] in ("reserved",
                                                                                               "committed")]


@pytest.mark.parametrize("optimizer", ["adam", "adam-bc"])  # adam-bc: post-processing, it draws nothing
def test_a_worst_case_release_draws_no_default_generator(tmp_path, coordinator, monkeypatch, optimizer):
    """Attack 19: with torch's Mersenne Twister the noise of a release made of pure noise (clip -> 0, dropout
    -> 1, float32 wire) gave away the generator's state and with it every other noise value. A site that
    allows such a release still draws every DP random value from ChaCha20: torch's and NumPy's default random
    functions raise during the whole round, and two identical worst-case requests release unrelated noise."""
    import numpy as np
    import torch

    import client.train_round

    site = Site(tmp_path / "permissive", extra={"min-clip-norm": 1e-12, "max-lora-dropout": 0.9,
                                                 "wire-dtypes": "float16,float32"})
    worst = {"dp.clip-norm": 1e-11, "server.wire-dtype": "float32", "train.local-steps": 3,
             "train.optimizer": optimizer}
    real = client.train_round.train_adapter

    def no_default_generators(*args, **kwargs):
        def refuse(*_, **__):
            raise AssertionError("a default generator was used in the DP path")

        with pytest.MonkeyPatch.context() as patch:
            for name in ("rand", "randn", "randint", "randperm", "normal", "bernoulli", "poisson", "multinomial",
                         "Generator", "manual_seed", "seed"):
                patch.setattr(torch, name, refuse)
            for name in ("random", "rand", "randn", "normal", "default_rng", "seed", "RandomState", "Generator"):
                patch.setattr(np.random, name, refuse)
            return real(*args, **kwargs)

    monkeypatch.setattr(client.train_round, "train_adapter", no_default_generators)
    replies = [coordinator.train(site, worst, wire="float32", run_id=f"worst-{i}") for i in range(2)]
    assert [status(r) for r in replies] == ["committed", "committed"]
    first, second = ({k: v.numpy().astype(np.float64) for k, v in r.content["arrays"].items()} for r in replies)
    for name in first:  # pure noise through Adam: independent draws, so the two releases are uncorrelated
        a, b = first[name].ravel(), second[name].ravel()
        if a.size >= 64:
            assert abs(np.corrcoef(a, b)[0, 1]) < 0.5


# ---- secure aggregation: a site that requires it also bounds the protocol the coordinator runs ----------
SETUP = {"stage": "setup", "sample_num": 3, "share_num": 3, "threshold": 2, "clipping_range": 8.0,
         "target_range": 2**22, "mod_range": 2**32, "max_weight": 1000.0}


def public_keys(n: int) -> list[list[bytes]]:
    """Key pairs of sites the coordinator makes up (only their public halves travel)."""
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    return [[public_key_to_bytes(generate_key_pairs()[1]), public_key_to_bytes(generate_key_pairs()[1])]
            for _ in range(n)]


def refused_stage(reply, stage: str, why: str, capsys) -> None:
    """Refused with a reason code: no keys, shares or masked vector (no SecAgg+ record), no adapter; the
    reason's detail in the site's log only."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    from client.secure_aggregation import OUT_OF_BOUNDS

    assert RECORD_KEY_CONFIGS not in reply.content and "arrays" not in reply.content
    secure = dict(reply.content["secure"])
    assert secure["refused"] and secure["code"] == OUT_OF_BOUNDS and secure["stage"] == stage, secure
    assert secure["reason"] == Reason.OUT_OF_BOUNDS.sentence and why in capsys.readouterr().err
    assert status(reply) == "rejected" and reason(reply) == secure["reason"] and code(reply) == OUT_OF_BOUNDS
    assert secure["contributed"] is False and reply.content["metrics"]["num-examples"] == 0


@pytest.mark.parametrize("share_num, threshold, why", [
    (1, 1, "share_num 1: fewer than min-secure-cohort 3"),  # a cohort of one: the 'sum' is the site's update
    (2, 2, "share_num 2: fewer than min-secure-cohort 3"),  # two sites: each learns the other's update
    (3, 1, "threshold 1 of 3 shares is not more than half"),
    (4, 2, "threshold 2 of 4 shares is not more than half"),  # two disjoint halves: both secrets
    (3, 4, "threshold 4 exceeds share_num 3"),
])
def test_a_secure_round_out_of_the_sites_bounds_is_refused_at_setup(tmp_path, coordinator, capsys, share_num,
                                                                    threshold, why):
    """Flower's secaggplus_mod checks only types: share_num 1 / threshold 1 would unmask the site. Refused
    before the mod makes a key; the coordinator carrying on gets every later stage refused, nothing trains."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    site = Site(tmp_path / "secure-only", extra={"require-secure-aggregation": True})
    context = coordinator.site_context(site)
    reply = coordinator.secure_stage(context, {**SETUP, "sample_num": share_num, "share_num": share_num,
                                               "threshold": threshold})
    refused_stage(reply, "setup", why, capsys)
    assert RECORD_KEY_STATE not in context.state.config_records  # Flower's mod never ran: no key pair exists
    keys = public_keys(3)
    later = coordinator.secure_stage(context, {"stage": "share_keys", "7": keys[0], "8": keys[1], "9": keys[2]})
    refused_stage(later, "share_keys", "after refused", capsys)
    masked = coordinator.secure_stage(context, {"stage": "collect_masked_vectors", "ctxts": [], "srcs": []},
                                      train_request=True)
    refused_stage(masked, "collect_masked_vectors", "after refused", capsys)
    assert not (site.ledger_dir / "ledger.json").exists()  # nothing trained, nothing spent


@pytest.mark.parametrize("extra, share_num, threshold, neighbours, why", [
    ({}, 3, 2, 1, "2 sites share keys with this one (itself included), fewer than min-secure-cohort 3"),
    ({"min-secure-cohort": 4}, 5, 3, 2, "3 sites share keys with this one (itself included), fewer than "
                                        "min-secure-cohort 4"),
    ({}, 5, 4, 2, "3 sites share keys with this one (itself included), fewer than the threshold 4"),
])
def test_a_share_keys_stage_listing_too_few_sites_is_refused(capsys, tmp_path, coordinator, extra, share_num, threshold,
                                                            neighbours, why):
    """An honest-looking setup, then a share-keys stage listing fewer public keys than the site's minimum:
    refused before the site splits its secrets into shares; the masked stage after it is refused too."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE

    site = Site(tmp_path / "secure-only", extra={"require-secure-aggregation": True, **extra})
    context = coordinator.site_context(site)
    setup = coordinator.secure_stage(context, {**SETUP, "sample_num": share_num, "share_num": share_num,
                                               "threshold": threshold})
    own = setup.content[RECORD_KEY_CONFIGS]
    listed = {"stage": "share_keys", "7": [own["pk1"], own["pk2"]],
              **{str(8 + i): pair for i, pair in enumerate(public_keys(neighbours))}}
    refused_stage(coordinator.secure_stage(context, listed), "share_keys", why, capsys)
    flower = context.state.config_records[RECORD_KEY_STATE]
    assert flower["current_stage"] == "setup" and not flower.get("rd_seed")  # no mask seed made
    assert flower["rd_seed_share_dict:K"] == [] and flower["sk1_share_dict:K"] == []  # no shares made
    masked = coordinator.secure_stage(context, {"stage": "collect_masked_vectors", "ctxts": [b"x"], "srcs": [8]},
                                      train_request=True)
    refused_stage(masked, "collect_masked_vectors", "after refused", capsys)
    assert not (site.ledger_dir / "ledger.json").exists()


@pytest.mark.parametrize("stage, configs, why", [
    ("collect_masked_vectors", {"srcs": [8, 8], "ctxts": [b"a", b"b"]}, "twice"),
    ("collect_masked_vectors", {"srcs": [8, 12], "ctxts": [b"a", b"b"]}, "did not share keys with this one"),
    ("collect_masked_vectors", {"srcs": [8], "ctxts": [b"a"]}, "masked among 2, fewer than min-secure-cohort 3"),
    ("collect_masked_vectors", {"srcs": [8, 9], "ctxts": [b"a"]}, "one ciphertext each"),
    ("unmask", {"active_nids": [7, 8, 9], "dead_nids": [9]}, "both active and dropped out"),
    ("unmask", {"active_nids": [8, 9], "dead_nids": [7]}, "this site is called dropped out"),
    ("unmask", {"active_nids": [7, 8, 12], "dead_nids": []}, "did not share keys with this one"),
    ("unmask", {"active_nids": [7], "dead_nids": [8, 9]}, "1 active sites, fewer than the threshold 2"),
    ("unmask", {"active_nids": [7, 7], "dead_nids": []}, "listed twice"),
])
def test_later_stages_are_bounded_by_what_the_site_accepted(stage, configs, why):
    """The checks of the masked and the unmask stage, against a site (node 7) that accepted share_num 3,
    threshold 2, keys from 7, 8, 9 and shares from 8, 9. Listing a site both active and dropped out would
    make it reveal both of that site's secrets, whatever the threshold."""
    from flwr.app import ConfigRecord

    from client.secure_aggregation import out_of_bounds

    before = {"collect_masked_vectors": "share_keys", "unmask": "collect_masked_vectors"}[stage]
    guard = ConfigRecord({"stage": before, "share_num": 3, "threshold": 2, "neighbours": [7, 8, 9],
                          "sources": [8, 9]})
    assert why in out_of_bounds(stage, ConfigRecord(configs), guard, 7, 3)
    honest = {"collect_masked_vectors": {"srcs": [8, 9], "ctxts": [b"a", b"b"]},
              "unmask": {"active_nids": [7, 8], "dead_nids": [9]}}[stage]
    assert out_of_bounds(stage, ConfigRecord(honest), guard, 7, 3) is None
    assert "expected it after" in out_of_bounds(stage, ConfigRecord(honest), ConfigRecord({"stage": "setup"}), 7, 3)


class SecureSites:
    """A Grid for the honest coordinator (server.secure_aggregation): each message goes to the real
    ClientApp of one deployed site, with that site's persistent Context."""

    def __init__(self, contexts: dict):
        self.contexts = contexts

    def send_and_receive(self, messages, *, timeout=None):
        import copy

        from client.app import train

        replies = []
        for message in messages:
            message = copy.deepcopy(message)  # each site its own copy, as over a wire
            reply = train(message, self.contexts[message.metadata.dst_node_id])
            reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id  # what the SuperLink stamps
            replies.append(reply)
        return replies


def test_sites_that_bound_secure_aggregation_train_in_an_honest_round(tmp_path, coordinator):
    """Four deployed sites that require secure aggregation, the coordinator's own SecAgg+ workflow: the
    site wanting 5 sites refuses at setup (nothing spent), the three others train, mask and are summed."""
    from server.secure_aggregation import secure_mean
    from slm.lora import sent_tensors

    sites = {n: Site(tmp_path / f"site-{n}", extra={"name": f"site-{n}", "require-secure-aggregation": True,
                                                     **({"min-secure-cohort": 5} if n == 4 else {})})
             for n in (1, 2, 3, 4)}
    contexts = {n: coordinator.site_context(site, node_id=n) for n, site in sites.items()}
    request = coordinator.message("train").content
    sent = sent_tensors(coordinator.adapter, "ffa")
    result = secure_mean(SecureSites(contexts), [1, 2, 3, 4], request, sent, 1000, 1, timeout=60.0)
    assert result.mean is not None and set(result.mean) == set(sent)
    assert any(not bool((result.mean[k].float() == sent[k].float()).all()) for k in sent)  # the sites trained
    (refusal,) = result.refusals
    assert dict(refusal.content["privacy"])["client"] == "site-4"
    assert dict(refusal.content["secure"])["code"] == "request-out-of-bounds"
    assert not (sites[4].ledger_dir / "ledger.json").exists()
    for n in (1, 2, 3):
        assert [e["status"] for e in sites[n].ledger()["entries"]] == ["committed"]
    secure = [dict(r.content["secure"]) for r in result.replies if r.metadata.src_node_id != 4]
    assert len(secure) == 3 and all(s["contributed"] and s["weight"] > 0 for s in secure)
