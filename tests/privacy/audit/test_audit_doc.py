"""Verdicts and plain words of an audit document, on hand-made trials."""

import json

import pytest

from fedslm.common.errors import UserError
from privacy.audit.doc import audit_sentences, can_refute, read_audit, summary_sentence, verdict


def trial(epsilon, lower, max_provable=3.0):
    return {"name": "t", "epsilon": epsilon, "noise_multiplier": 0.0 if epsilon is None else 1.0, "delta": 1e-5,
            "bound": {"epsilon_lower": lower, "max_provable": max_provable, "beta": 0.05, "canaries": 128,
                      "best": {"correct": 60, "guesses": 64}}, "exposure": None}


def test_verdicts():
    assert verdict(trial(None, 2.0)) == "leaks"
    assert verdict(trial(None, 0.0)) == "no leak detected"
    assert verdict(trial(1.0, 0.3)) == "consistent"
    assert verdict(trial(1.0, 1.2)) == "violation"
    assert can_refute(trial(1.0, 0.3)) and not can_refute(trial(8.0, 0.3)) and not can_refute(trial(None, 2.0))


def doc(*trials):
    for t in trials:
        t["verdict"] = verdict(t)
    return {"trials": list(trials), "frozen_a": True,
            "canaries": {"count": 128, "format": "P -> S", "space_log2": 26.6, "inserted": 64},
            "training": {"base_records": 0, "records": 64, "steps": 80, "sample_rate": 0.125, "batch_size": 8,
                         "lr": 0.01, "clip_norm": 1.0}}


def test_sentences_say_what_the_audit_could_and_could_not_show():
    text = audit_sentences(doc(trial(None, 2.5), trial(7.9, 0.1), trial(1.0, 0.2)))
    assert len(text) == 5 and "not the true epsilon" in text[-1]
    assert "out of this audit's reach" in text[2] and "out of this audit's reach" not in text[3]
    summary = summary_sentence(doc(trial(None, 2.5), trial(7.9, 0.1)))
    assert summary.startswith("An empirical audit") and "could not exceed 3.00" in summary
    assert summary_sentence(doc(trial(1.0, 1.5))).startswith("WARNING")


def test_read_audit(tmp_path):
    assert read_audit(tmp_path) is None
    (tmp_path / "audit.json").write_text(json.dumps({"schema": "fedslm-audit/1", "trials": []}))
    assert read_audit(tmp_path)["schema"] == "fedslm-audit/1"
    (tmp_path / "audit.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a fedslm audit"):
        read_audit(tmp_path)
    (tmp_path / "audit.json").write_text("{")
    with pytest.raises(UserError, match="corrupt JSON"):
        read_audit(tmp_path)
