"""Flower's SecAgg+ as the server drives it (server.secure_aggregation) against sites answering with
Flower's secaggplus_mod (client.secure_aggregation), in one process: real protocol and cryptography
on both sides, the sites' training replaced by fixed B factors (the integration test trains)."""

import copy

import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.secure_aggregation import OUT_OF_BOUNDS, masked_train
from fedslm.common.config import resolve
from fedslm.common.errors import UserError
from fedslm.common.vocabulary import RunConfig
from server.aggregate import aggregate
from server.intake import check_secure_training
from server.round_spec import RoundSpec
from server.secure_aggregation import error_bound, quantization_range, secure_mean
from slm.lora import from_arrays, to_arrays

B1, B2 = "m.q_proj.lora_B.weight", "m.v_proj.lora_B.weight"


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What Flower sets in a ServerApp process before any Message is built."""
    from flwr.supercore.task_identity import TaskIdentity

    for field, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, field, value)


def site_update(node: int) -> dict:
    g = torch.Generator().manual_seed(node)
    return {B1: 0.05 * torch.randn(16, 8, generator=g), B2: 0.05 * torch.randn(12, 8, generator=g)}


CONTRIBUTE = ("ok", "strict")  # the behaviours whose update is in the sum


def node_config(node: int, behaviour: str) -> dict:
    """A simulated site ({}), or for strict[-k] a deployed one that requires secure aggregation
    (min-secure-cohort k, default 3): it bounds the protocol (client.secure_aggregation)."""
    if not behaviour.startswith("strict"):
        return {}
    config = {"name": f"site-{node}", "data-path": "/nonexistent/records.jsonl", "ledger-dir": "/nonexistent/ledger",
              "max-epsilon": 1.0, "model-dir": "tiny", "require-secure-aggregation": True}
    if "-" in behaviour:
        config["min-secure-cohort"] = int(behaviour.split("-")[1])
    return config


class LocalSites:
    """A Grid that hands each message to a site in this process; behaviours: ok, crash-in-training,
    crash (every stage), crash-in-share-keys, refuse, nan, strict[-k] (a deployed site bounding the protocol)."""

    def __init__(self, behaviours: dict[int, str], records: dict[int, int]):
        self.behaviours, self.records = behaviours, records
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=node_config(n, b), state=RecordDict(),
                                    run_config={}) for n, b in behaviours.items()}

    def send_and_receive(self, messages, *, timeout=None):
        replies = [self._answer(copy.deepcopy(m)) for m in messages]  # each site its own copy, as over a wire
        for message, reply in zip(messages, replies):  # what the SuperLink stamps on a node's reply
            reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
        return replies

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        behaviour = self.behaviours[node]
        try:
            stage = msg.content.config_records[RECORD_KEY_CONFIGS]["stage"]
            if behaviour == "crash" or (behaviour == "crash-in-share-keys" and stage == "share_keys"):
                raise RuntimeError("injected crash")
            return masked_train(msg, self.contexts[node], self._train(node, behaviour))
        except Exception as err:  # what Flower turns into an error reply
            return Message(Error(code=0, reason=str(err)), reply_to=msg)

    def _train(self, node: int, behaviour: str):
        def train_clear(msg, context):
            if behaviour == "crash-in-training":
                raise RuntimeError("injected crash while training")
            privacy = {"client": f"site-{node}", "status": "refused" if behaviour == "refuse" else "committed"}
            content = RecordDict({"privacy": ConfigRecord(privacy),
                                  "metrics": MetricRecord({"num-examples": self.records[node], "steps": 5})})
            if behaviour != "refuse":
                update = site_update(node)
                if behaviour == "nan":
                    update[B1][0, 0] = float("nan")
                content["arrays"] = to_arrays(update, "float32")
            return Message(content, reply_to=msg)
        return train_clear


def run(behaviours, records=None):
    records = records or {n: 100 + 40 * n for n in behaviours}
    sites = LocalSites(behaviours, records)
    for context in sites.contexts.values():
        context.run_config = {"server.max-update-norm": 1000.0}
    sent = {B1: torch.zeros(16, 8), B2: torch.zeros(12, 8)}
    request = RecordDict({"arrays": to_arrays(sent, "float32"), "config": ConfigRecord({"server-round": 1})})
    result = secure_mean(sites, sorted(behaviours), request, sent, 1000, 1, timeout=10.0)
    contributors = [n for n in sorted(behaviours) if behaviours[n] in CONTRIBUTE]
    clear = aggregate("ffa", [site_update(n) for n in contributors], [records[n] for n in contributors])
    bound = error_bound(len(behaviours), [records[n] for n in contributors], 1000)
    return result, clear, bound


def max_error(mean, clear):
    return max(float((mean[k].double() - clear[k].double()).abs().max()) for k in clear)


def test_the_secure_mean_is_the_clear_ffa_mean_within_the_quantization_step():
    result, clear, bound = run({1: "ok", 2: "ok", 3: "ok", 4: "ok"})
    assert result.mean is not None and set(result.mean) == {B1, B2}
    error = max_error(result.mean, clear)
    assert error <= bound < 1e-6, (error, bound)
    assert result.messages == 4 * 4 and result.threshold == 3
    masked = [from_arrays(r.content["arrays"]) for r in result.replies if "arrays" in r.content]
    assert all(not state for state in masked), "a clear adapter left a site"


def test_a_site_crashing_after_the_keys_are_shared_still_gives_the_others_sum():
    result, clear, bound = run({1: "ok", 2: "ok", 3: "ok", 4: "crash-in-training"})
    assert max_error(result.mean, clear) <= bound


def test_refused_and_invalid_updates_are_masked_as_zeros_with_weight_zero():
    result, clear, bound = run({1: "ok", 2: "ok", 3: "refuse", 4: "nan", 5: "ok"})
    assert max_error(result.mean, clear) <= bound
    secure = {dict(r.content["privacy"])["client"]: dict(r.content["secure"]) for r in result.replies}
    assert secure["site-4"]["contributed"] is False and "non-finite" in secure["site-4"]["reason"]
    assert secure["site-3"] == {"contributed": False, "weight": 0, "reason": "the site refused the round"}
    assert secure["site-1"]["weight"] == 140


def test_below_the_threshold_the_round_halts_without_a_sum():
    result, _, _ = run({1: "ok", 2: "ok", 3: "crash", 4: "crash-in-training"})
    assert result.mean is None


def test_the_quantized_sum_cannot_wrap():
    for cohort in (2, 4, 11, 1000):
        assert cohort * quantization_range(cohort) < 2**32 <= 2 * cohort * quantization_range(cohort)


@pytest.mark.parametrize("overrides", [{"server.aggregation": "fedavg"}, {"server.aggregation": "svd"},
                                       {"dp.enabled": False}, {"user-dp.enabled": True}])
def test_secure_aggregation_needs_ffa_without_user_level_dp(overrides):
    config = resolve({"server.secure-aggregation": True, **overrides})  # auto without DP resolves to fedavg
    with pytest.raises(UserError, match="server.secure-aggregation"):
        RoundSpec.of(RunConfig.parse(config))
    assert RoundSpec.of(RunConfig.parse(resolve({"server.secure-aggregation": True}))).secure


def test_sites_that_bound_the_protocol_take_part_in_an_honest_round():
    """The honest workflow is within every deployed site's default bounds (cohort 3, threshold > half)."""
    for cohort in (3, 4, 6):
        result, clear, bound = run({n: "strict" for n in range(1, cohort + 1)})
        assert result.mean is not None and not result.refusals, cohort
        assert max_error(result.mean, clear) <= bound


def test_a_site_refusing_the_setup_is_a_dropout_and_the_others_are_summed(capsys):
    """Site 5 wants 6 sites sharing keys; the cohort is 5: it refuses before any key exists. Flower's
    workflow alone would then halt (it asks for shares of the refusing site's secrets nobody holds)."""
    result, clear, bound = run({1: "ok", 2: "ok", 3: "ok", 4: "strict", 5: "strict-6"})
    assert result.mean is not None and max_error(result.mean, clear) <= bound
    (refusal,) = result.refusals
    assert refusal.metadata.src_node_id == 5 and RECORD_KEY_CONFIGS not in refusal.content
    secure = dict(refusal.content["secure"])
    assert secure["code"] == OUT_OF_BOUNDS and secure["stage"] == "setup"
    assert secure["reason"] == "the request is outside the site's policy"  # the detail is in the site's log only
    assert "min-secure-cohort 6" in capsys.readouterr().err
    assert refusal in result.replies  # reported with the masked stage's replies: each sampled site is accounted for
    usable = [(r.metadata.src_node_id, dict(r.content["privacy"]).get("client", "?"), r) for r in result.replies]
    training = check_secure_training(usable, lambda name, privacy: None)
    assert [name for name, _ in training.refused] == ["site-5"] and len(training.updates) == 4
    assert training.refused[0][1] == "the request is outside the site's policy"


def test_sites_leaving_before_or_after_sharing_keys_still_leave_a_correct_sum():
    """One site crashes in share keys, one refuses the setup, one drops out after sharing keys: the
    dropped site's masks are rebuilt over the sites that did share keys, and the sum stays exact."""
    behaviours = {1: "ok", 2: "ok", 3: "strict", 4: "ok", 5: "ok", 6: "strict", 7: "crash-in-share-keys",
                  8: "strict-13", 9: "crash-in-training", 10: "ok", 11: "strict", 12: "ok"}  # threshold 9 of 12
    result, clear, bound = run(behaviours)
    assert result.mean is not None and max_error(result.mean, clear) <= bound
    assert [r.metadata.src_node_id for r in result.refusals] == [8]


def test_a_site_refuses_to_mask_among_fewer_sites_than_its_minimum(capsys):
    """Five sites list their keys, then one leaves before sending its shares: site 5 (min-secure-cohort 5)
    would be masked among four; it refuses in the masked stage, before training."""
    result, _, _ = run({1: "ok", 2: "ok", 3: "ok", 4: "crash-in-share-keys", 5: "strict-5"})
    (refusal,) = result.refusals
    secure = dict(refusal.content["secure"])
    assert secure["stage"] == "collect_masked_vectors" and "masked among 4" in capsys.readouterr().err
    assert "arrays" not in refusal.content and RECORD_KEY_CONFIGS not in refusal.content
    assert result.mean is None  # 3 sites left, below the threshold 4 of 5: the round halts


def test_below_the_threshold_after_refusals_the_round_halts():
    result, _, _ = run({1: "ok", 2: "ok", 3: "strict", 4: "strict-5"})  # threshold 3 of 4; 4 refuses, 3 stay
    assert result.mean is not None
    result, _, _ = run({1: "ok", 2: "ok", 3: "strict-5", 4: "strict-5"})  # 2 stay < 3
    assert result.mean is None and len(result.refusals) == 2
