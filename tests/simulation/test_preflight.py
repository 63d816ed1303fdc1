"""The preflight: every value checkable before training is checked before any worker starts."""

import pytest

from fedslm.common.config import resolve
from fedslm.common.errors import UserError
from simulation.preflight import preflight

LABELS = ["Psoriasis", "Acne", "Asthma", "Flu", "Migraine", "Eczema"]


def label_csv(path, labels=LABELS, per_label=6):
    path.write_text("label,text\n" + "".join(f"{label},patient {i} has signs of {label.lower()}\n"
                                             for i in range(per_label) for label in labels))
    return path


def config_for(path, **extra):
    return resolve({"model.name": "tiny", "model.max-length": 128, "data.path": str(path), "data.task": "label",
                    "data.partition": "dirichlet", "data.partition-by": "label", "train.batch-size": 2,
                    "server.min-clients": 1, **extra})


def test_verbalizers_are_resolved_once_from_the_whole_file_into_the_config(tmp_path):
    """Under a skewed split no client sees every label: the candidates must still be the same everywhere."""
    from types import SimpleNamespace

    from client.app import admitted
    from client.request import parse_evaluation

    config = config_for(label_csv(tmp_path / "d.csv"), **{"data.dirichlet-alpha": 0.1})
    *lines, window = preflight(config, 3)
    # six labels listed take the 128-token window from the text: the list is dropped, never the text
    assert len(lines) == 3 and window == ("window: 128 tokens (model.max-length); the labels are not listed in the "
                                          "prompt (with them 95% take up to 147); all 32 sampled training records fit")
    assert config["data.label-list"] == "no"
    assert config["data.verbalizers"] == ",".join(f"{w}={w}" for w in sorted(LABELS))
    for pid in range(3):
        context = SimpleNamespace(run_config=config, node_config={"partition-id": pid, "num-partitions": 3})
        round_cfg = {"run-id": "r", "server-round": 1, "aggregation": "ffa", "run-dir": str(tmp_path)}
        assert admitted(context, round_cfg, parse_evaluation)[1].specs.task.verbalizers == \
            config["data.verbalizers"]


@pytest.mark.parametrize("extra, clients, words", [
    ({"data.verbalizers": "Flu=flu,Acne=acne"}, 2, "labels Asthma, Eczema, Migraine, Psoriasis in data file"),
    ({"data.label-field": "diagnosis"}, 2, "field 'diagnosis' (data.label-field) is missing; columns are label, text"),
    ({"data.prompt-template": "{text} {label}"}, 2, "data.prompt-template': unknown placeholder {label}"),
    ({"model.max-length": 40}, 2, "config key 'model.max-length': 40 tokens leave no room for the text"),
    ({"server.min-clients": 3}, 2, "config key 'server.min-clients': 3 is more than the 2 clients"),
    ({"data.partition": "iid", "train.batch-size": 1}, 36, "36 records for 36 clients, and each client needs at least "
     "2 (one to train, one to hold out): use --clients 18 or fewer, or give a file of at least 72 records"),
])
def test_a_bad_value_stops_the_preflight_with_one_line(tmp_path, extra, clients, words):
    config = config_for(label_csv(tmp_path / "d.csv"), **extra)
    with pytest.raises(UserError) as err:
        preflight(config, clients)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_banner_describes_the_data_actually_used(tmp_path):
    from fedslm.common.vocabulary import RunConfig
    from simulation.scenarios import describe, get_scenario

    hospital = get_scenario("hospital")
    assert describe(hospital, RunConfig.parse(resolve(base=hospital.overrides)), 4, {}) == hospital.about
    overrides = {"data.path": str(label_csv(tmp_path / "med.csv")), "data.task": "label", "data.partition": "dirichlet",
                 "data.partition-by": "label", "model.name": "tiny", "model.max-length": 128,
                 "train.batch-size": 2}
    config = resolve(overrides, base=hospital.overrides)
    preflight(config, 4)
    assert describe(hospital, RunConfig.parse(config), 4, overrides) == (
        "tiny, med.csv, label task (text field 'text', label field 'label', 6 labels), "
        "dirichlet split by 'label' (alpha 0.5) over 4 clients")


def test_a_held_out_file_needs_a_record_per_client_and_the_train_file_one_more(tmp_path):
    """With data.eval-path each client trains on its share of the file and holds out its share of the other."""
    train, dev = label_csv(tmp_path / "d.csv"), label_csv(tmp_path / "dev.csv", per_label=1)
    config = config_for(train, **{"data.eval-path": str(dev), "data.partition": "iid"})
    with pytest.raises(UserError) as err:
        preflight(config, 7)
    assert str(err.value) == (f"data file {dev}: 6 records for 7 clients, and each client needs at least 1 (one to "
                              "hold out): use --clients 6 or fewer, or give a file of at least 7 records")
    with pytest.raises(UserError, match="^data file .*d.csv: 36 records for 37 clients, and each client needs at least "
                                        r"1 \(one to train\): use --clients 36 or fewer"):
        preflight(config_for(train, **{"data.eval-path": str(label_csv(tmp_path / "big.csv")),
                                       "data.partition": "iid", "train.batch-size": 1}), 37)
    single = tmp_path / "one.csv"
    single.write_text("question,answer\nWhat is flu?,A virus.\n")
    with pytest.raises(UserError, match=r"1 record for 1 client, and each client needs at least 2 \(one to train, one "
                                        r"to hold out\): give a file of at least 2 records$"):
        preflight(config_for(single, **{"data.task": "sft", "data.partition": "iid"}), 1)


def patient_csv(path):
    """Six labels x 6 records, each patient holding 3 records of one label."""
    path.write_text("patient,label,text\n" + "".join(f"p{label}{i // 3},{label},patient {i} has signs of "
                                                     f"{label.lower()}\n" for i in range(6) for label in LABELS))
    return path


@pytest.mark.parametrize("extra, words", [
    ({"dp.privacy-unit-field": "mrn"}, "the privacy unit field 'mrn' is missing; columns are patient, label, text"),
    ({"dp.privacy-unit-field": "patient", "train.grad-sample-mode": "ghost"},
     "ghost cannot train with dp.privacy-unit-field"),
    ({"dp.privacy-unit-field": "patient", "train.batch-size": 12},
     "12 is larger than client 'client-0''s 11 training units (patient)"),
    ({"dp.privacy-unit-field": "patient", "data.prompt-template": "{patient}: {text}"},
     "unknown placeholder {patient}"),
])
def test_a_bad_privacy_unit_stops_the_preflight_with_one_line(tmp_path, extra, words):
    config = config_for(patient_csv(tmp_path / "p.csv"), **{"data.partition": "iid", **extra})
    with pytest.raises(UserError) as err:
        preflight(config, 1)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_patient_level_simulation_splits_whole_patients_and_passes(tmp_path):
    from client.data import DataSpec, load_local_data

    config = config_for(patient_csv(tmp_path / "p.csv"), **{"data.partition": "iid", "data.test-fraction": 0.25,
                                                            "dp.privacy-unit-field": "patient"})
    preflight(config, 1)
    local = load_local_data(DataSpec.from_config(config), 0, 1)
    assert not {r["patient"] for r in local.train} & {r["patient"] for r in local.test}


def test_the_preflight_says_how_many_records_the_window_cuts(tmp_path):
    rows = "".join(f'{{"question": "{"why " * (200 if i % 4 == 0 else 2)}?", "answer": "because"}}\n' for i in range(40))
    (tmp_path / "qa.jsonl").write_text(rows)
    config = resolve({"model.name": "tiny", "model.max-length": 64, "data.path": str(tmp_path / "qa.jsonl"),
                      "data.task": "sft", "data.partition": "iid", "train.batch-size": 2, "server.min-clients": 1})
    window = preflight(config, 2)[-1]
    train = 40 - 2 * max(1, round(20 * 0.1))  # each client holds out its share
    assert window.startswith("window: 64 tokens (model.max-length); ")
    assert f"of {train} sampled training records exceed it and are cut" in window
    assert "the prompt in the middle of its text, chat template and instruction kept" in window
    cut = int(window.split("; ")[1].split()[0])
    assert 0 < cut < train  # the long questions only


def test_a_newcomers_many_label_file_trains_on_whole_texts(tmp_path):
    """Issue 28: 24 labels listed before each text left it ~10 tokens, and the tiny scenario's 64-token
    window refused the file. Fitted, the list is dropped, the window holds the texts, nothing is cut."""
    from simulation.scenarios import get_scenario

    labels = [f"{kind}{suffix}" for kind in ("cardio", "neuro", "derma", "gastro", "pulmo", "nephro")
              for suffix in ("logy", "pathy", "itis", "plasty")]
    path = tmp_path / "triage.csv"
    path.write_text("label,text\n" + "".join(f"{label},patient {i} reports pain and asks about {label}\n"
                                             for i in range(4) for label in labels))
    config = resolve({"data.path": str(path), "data.task": "label", "data.partition": "iid", "train.batch-size": 2,
                      "model.max-length-cap": 192},  # the tiny model's tokens are bytes
                     base=get_scenario("tiny").overrides)
    window = preflight(config, 2)[-1]
    quantile = int(window.split("take at most ")[1].split(")")[0])
    assert config["data.label-list"] == "no" and config["model.max-length"] == -(-quantile // 16) * 16 < 192
    assert window.startswith(f"window: {config['model.max-length']} tokens, fitted to the data (95% of 86 sampled "
                             f"training records take at most {quantile}); the labels are not listed")
    assert window.endswith("; all 86 sampled training records fit")
