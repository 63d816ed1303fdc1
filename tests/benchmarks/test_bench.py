"""Each benchmark's code path runs on the tiny model and reports ratios (no timing assertions)."""

import json
import math

import pytest

from benchmarks import dp_overhead, throughput, traffic
from benchmarks.__main__ import main
from benchmarks.measure import TreeMemory, table


def test_dp_overhead_reports_a_ratio_per_configuration(capsys):
    rows = dp_overhead.run("tiny", batch_size=2, length=16, modes=["hooks", "ghost"], autocasts=["none"], repeats=1)
    assert [r["configuration"] for r in rows] == ["non-private / fp32", "hooks / fp32", "ghost / fp32"]
    assert rows[0]["x non-private"] == 1.0
    assert all(isinstance(r["x non-private"], float) and r["x non-private"] > 0 for r in rows)
    assert "x non-private" in capsys.readouterr().out


def test_a_mode_that_fails_is_reported_not_fatal(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported layer")

    monkeypatch.setattr(dp_overhead, "make_private", broken)
    rows = dp_overhead.run("tiny", batch_size=2, length=16, modes=["hooks"], autocasts=["none"], repeats=1)
    assert rows[1]["s/step"].startswith("fails: RuntimeError: unsupported layer")
    assert isinstance(rows[0]["s/step"], float)


def test_throughput_relates_tokens_to_the_roofline_and_profiles(capsys):
    result = throughput.run("tiny", batch_size=2, length=16, repeats=1, seconds=0.05)
    assert result["flops_per_token"] > 0 and all(v > 0 for v in result["roofline_before"].values())
    for row in result["rows"]:
        assert row["x roofline"] == pytest.approx(row["tokens/s"] / row["roofline tok/s"])
    for profile in result["profiles"]:
        assert 0 < profile["matmul share"] <= 1 and 0 <= profile["cast share"] < 1
        assert profile["top ops"]
    assert "profile hooks / fp32" in capsys.readouterr().out


def test_traffic_fp16_halves_and_ffa_sends_less():
    rows = {(r["aggregation"], r["wire dtype"]): r["bytes up/client/round"] for r in traffic.run("tiny", ranks=(8,))}
    assert rows[("fedavg", "float16")] < rows[("fedavg", "float32")]
    assert rows[("ffa", "float32")] < rows[("fedavg", "float32")]
    assert rows[("ffa", "float16")] == min(rows.values())


def test_tree_memory_sees_this_process():
    import os

    with TreeMemory(os.getpid(), every=0.01) as memory:
        memory.sample()
    assert memory.peak_total >= memory.peak_single > 10 * 2**20


def test_table_is_markdown():
    text = table(["a", "b"], [[1, 2.5], ["x", math.pi]])
    lines = text.splitlines()
    assert lines[0].startswith("| a") and set(lines[1]) <= {"|", "-"} and "3.14" in lines[3]


def test_bench_cli_writes_json(tmp_path, capsys):
    """`python -m benchmarks NAME --json FILE`; benchmarks are no longer a `fedslm` command."""
    out = tmp_path / "traffic.json"
    assert main(["traffic", "--model", "tiny", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())) == 5  # 4 settings at r=8, ffa + float16 at r=4


def test_noise_bench_times_both_generators_against_the_recorded_steps(capsys):
    from benchmarks import noise

    result = noise.run(repeats=1, records=[225], dg_samples=40, dg_sigmas=[10.0], seed=0)
    gaussian = {r["trained"]: r for r in result["gaussian"]}
    assert gaussian["B only (FFA)"]["values"] == 184_320 and gaussian["A and B"]["values"] == 460_800
    assert all(r["torch MT ms"] > 0 and r["ChaCha20 ms"] > 0 and r["x MT"] > 0 for r in result["gaussian"])
    assert [r["records"] for r in result["poisson"]] == [225]
    assert len(result["steps"]) == len(noise.RECORDED_STEPS)
    for row in result["steps"]:
        assert row["% of step"] == pytest.approx(row["ChaCha20 noise + mask ms"] / row["s/step"] / 10)
    (discrete,) = result["discrete_gaussian"]
    assert discrete["samples"] == 40 and discrete["us/sample"] > 0 and discrete["s per step (184,320 values)"] > 0
    assert discrete["mean ok"] == discrete["var ok"] == "yes"  # seed 0: the same draws every run
    out = capsys.readouterr().out
    assert "x MT" in out and "% of step" in out and "discrete Gaussian" in out


def test_accountant_bench_restores_the_cache_and_finds_the_stock_answers_equal(capsys):
    """A small plan: the same sigmas and epsilons from cached curves and from Opacus' stock accountants."""
    from benchmarks import accountant as bench
    from privacy.mechanism import accountant

    cached = accountant._curve
    (result,) = bench.run(plans=[("small", 0.1, 2, 1, 8.0)])["plans"]
    assert result["same_answers"] and len(result["sigmas"]) == 1
    assert all(result["seconds"][name] > 0 for name in ("stock", "fresh process", "one process"))
    assert accountant._curve is cached and "same sigmas and epsilons" in capsys.readouterr().out


def test_discrete_gaussian_of_the_noise_bench_has_its_pmf():
    """sigma^2 = 1: P(y) = exp(-y^2/2) / sum_z exp(-z^2/2); 3,000 draws from a seeded keystream, loose bounds."""
    from fractions import Fraction

    from benchmarks.noise import KeystreamInts, discrete_gaussian
    from privacy.mechanism.randomness import DpRandom, seed_key

    ints = KeystreamInts(DpRandom(seed_key(1, "test")), chunk=64)  # small chunks: refills are exercised
    draws = [discrete_gaussian(Fraction(1), ints) for _ in range(3000)]
    norm = sum(math.exp(-z * z / 2) for z in range(-20, 21))
    for y in (-2, -1, 0, 1, 2):
        assert draws.count(y) / len(draws) == pytest.approx(math.exp(-y * y / 2) / norm, abs=0.03)
    counts = [0, 0, 0]
    for _ in range(3000):
        counts[ints.randbelow(3)] += 1
    assert all(900 < c < 1100 for c in counts) and ints.randbelow(1) == 0


@pytest.mark.integration
def test_overhead_compares_a_federation_with_its_pure_compute(tmp_path, model_cache):
    from benchmarks import overhead

    result = overhead.run("tiny", clients=2, rounds=1, steps=2, batch=2, length=32, out=tmp_path)
    assert result["pure compute s"] > result["pure rounds 1.. s"] > 0 and result["x wall"] >= result["x rounds"] > 0
    assert result["federated rounds s"] > result["federated rounds 1.. s"] > 0 and result["x rounds 1.."] > 0


@pytest.mark.integration
def test_privacy_utility_runs_a_dp_and_a_non_private_point_on_the_whole_dev_set(tmp_path, monkeypatch, model_cache):
    """sst2-dev: the train split over 4 iid clients, every dev sentence evaluated once, a standard error per point."""
    from benchmarks import privacy_utility

    shared = tmp_path / "shared"
    (shared / "sst2").mkdir(parents=True)
    rows = "".join(f"{'a charming journey' if i % 2 else 'bleak and dull'} {i} .\t{i % 2}\n" for i in range(48))
    (shared / "sst2" / "train.tsv").write_text("sentence\tlabel\n" + rows)
    (shared / "sst2" / "dev.tsv").write_text("sentence\tlabel\n" + "".join(rows.splitlines(True)[:10]))
    monkeypatch.setenv("FEDSLM_SHARED_DATA", str(shared))
    rows = privacy_utility.run(["sst2-dev"], ["8", "inf"], rounds=1, steps=2, batch=4, length=320, eval_examples=4,
                               model="tiny", out=tmp_path / "runs", overrides={"lora.layers": "1"})
    assert [r["epsilon"] for r in rows] == ["8", "inf"] and all(r["metric"] == "accuracy" for r in rows)
    assert [r["eval records"] for r in rows] == [10, 10]  # all of dev, not data.max-eval-examples per client
    p = rows[0]["final"]
    assert rows[0]["stderr"] == f"{100 * math.sqrt(p * (1 - p) / 10):.1f} pts"
    assert rows[0]["sigma"] != "-" and rows[1]["sigma"] == "-"
    assert rows[1]["vs non-private"] == "+0.0 pts"
    config = json.loads((tmp_path / "runs" / "sst2-dev-eps8" / "config.json").read_text())
    assert config["lora.layers"] == 1 and config["data.eval-path"].endswith("dev.tsv")


def test_privacy_utility_names_missing_shared_data_and_leaves_other_tasks_alone(tmp_path, monkeypatch):
    from benchmarks.privacy_utility import task_config
    from fedslm.common.errors import UserError

    monkeypatch.setenv("FEDSLM_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"nowhere/sst2/train.tsv not found"):
        task_config("sst2", tmp_path)
    assert task_config("medquad", tmp_path)["data.task"] == "sft"  # the packaged excerpt needs no shared data


def test_gpu_check_runs_its_dp_steps_on_cpu_too(model_cache, capsys):
    """The GPU script's path (device placement, virtual steps, first-update check) smoke-tested on the CPU."""
    from benchmarks import gpu_check

    assert gpu_check.main(["--model-dir", "tiny", "--peak-tflops", "1", "--device", "cpu", "--batches", "3",
                           "--physical", "2", "--length", "16", "--steps", "1", "--autocast", "none"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["results"][0]["loss_finite"] and result["results"][0]["tokens_per_s"] > 0


def test_label_scoring_compares_the_one_pass_scorer_with_the_k_pass_one(tmp_path, monkeypatch, model_cache):
    from benchmarks import label_scoring

    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\na charming journey .\t1\nbleak and dull\t0\n")
    monkeypatch.setenv("FEDSLM_SHARED_DATA", str(tmp_path))
    rows = label_scoring.run("tiny", records=2, length=512, batch_size=2, classes=[2])
    assert [(r["K"], r["records"], r["same answers"]) for r in rows] == [(2, 2, "yes")]
    assert rows[0]["max |dLL|"] < 1e-3 and rows[0]["one-pass / plain"] > 0


def test_recipe_sweep_calibrates_every_point_to_the_same_epsilon_and_budget(tmp_path, monkeypatch, model_cache):
    from benchmarks import recipe
    from fedslm.common.errors import UserError

    (tmp_path / "sst2").mkdir()
    rows = "".join(f"{'a charming journey' if i % 2 else 'bleak and dull'} {i} .\t{i % 2}\n" for i in range(40))
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\n" + rows)
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\n" + "".join(rows.splitlines(True)[:5]))
    monkeypatch.setenv("FEDSLM_SHARED_DATA", str(tmp_path))
    with pytest.raises(UserError, match="'batchsize=4' is not key=value with a key of batch"):
        recipe.run(["batchsize=4"], model="tiny")
    results = recipe.run(["batch=4;layers=1", "batch=8;clip=1;lr=1e-2;optimizer=sgd;rank=2;ffa=1"], records=40,
                         budget=16, length=300, model="tiny")
    assert [r["point"] for r in results][0] == "untrained" and results[0]["steps"] == 0
    assert [r["steps"] for r in results[1:]] == [4, 2]  # the same examples per point: fewer steps at a larger batch
    assert all(r["sigma"] and r["sigma"] > 0.3 for r in results[1:])
    for r in results:
        assert 0 <= r["accuracy"] <= 1 and math.isclose(r["stderr"], math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / 5))


def test_recipe_sweep_on_the_hospital_task_reports_eval_loss_not_accuracy(model_cache, capsys):
    from benchmarks import recipe

    results = recipe.run(["batch=8;clip=1;lr=1e-2;ffa=1"], task="medquad", records=40, dev_records=8, budget=16,
                         length=64, model="tiny", epsilon=8.0)
    assert [r["steps"] for r in results] == [0, 2] and results[1]["sigma"] > 0.3
    assert all(math.isnan(r["accuracy"]) and math.isfinite(r["eval_loss"]) for r in results)
    assert "nan" not in capsys.readouterr().out  # an SFT row prints its loss, not an accuracy


def test_recipe_clip_only_point_clips_without_noise_and_claims_no_privacy(model_cache):
    """noise=clip keeps DP-SGD's clipping at sigma 0: with a clip norm of 1e-9 the adapter cannot move, where the
    same point without clipping (noise=none) does; neither claims an epsilon."""
    from benchmarks import recipe
    from fedslm.common.errors import UserError

    with pytest.raises(UserError, match="noise='loud' is not one of dp, clip, none"):
        recipe.run(["noise=loud"], task="medquad", model="tiny")
    point = "batch=8;clip=1e-9;lr=1e-1;optimizer=sgd;ffa=1;noise="
    untrained, clipped, plain = recipe.run([point + "clip", point + "none"], task="medquad", records=40,
                                           dev_records=8, budget=32, length=64, model="tiny", epsilon=8.0)
    assert clipped["sigma"] == 0.0 and plain["sigma"] is None
    assert math.isinf(clipped["epsilon"]) and math.isinf(plain["epsilon"])
    assert abs(clipped["eval_loss"] - untrained["eval_loss"]) < 1e-6 < abs(plain["eval_loss"] - untrained["eval_loss"])


def test_the_many_class_task_and_the_public_file_come_from_the_shared_data_only(tmp_path, monkeypatch):
    """MedQuAD's question type by institute (14 classes over 4 sites); the warm start's public file holds no
    institute of the demo's sites."""
    import csv
    import json

    from benchmarks.privacy_utility import QTYPE_SITES, medquad_qtype
    from benchmarks.warm_start import PUBLIC_SOURCES, public_excerpt

    rows = [{"source": source, "qtype": qtype, "question": f"Q {i} {qtype} of {source}?", "answer": f"A {i}."}
            for source in (*QTYPE_SITES, "GARD", "GHR") for qtype in ("symptoms", "treatment", "rare")
            for i in range(50 if qtype != "rare" else 3)]
    shared = tmp_path / "shared" / "medquad"
    shared.mkdir(parents=True)
    (shared / "medquad_answered.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("FEDSLM_SHARED_DATA", str(tmp_path / "shared"))
    table = list(csv.DictReader(medquad_qtype(tmp_path / "q.csv").open()))
    assert {r["source"] for r in table} == set(QTYPE_SITES) and {r["qtype"] for r in table} == {"symptoms", "treatment"}
    assert len(table) == len(QTYPE_SITES) * 2 * 40  # at most 40 per (site, type); a type under 5 left out
    public = [json.loads(line) for line in public_excerpt(tmp_path / "p.jsonl", 60).open()]
    assert len(public) == 60 and {r["source"] for r in public} <= set(PUBLIC_SOURCES)
    assert not set(PUBLIC_SOURCES) & {"GARD", "GHR", "MPlusHealthTopics", "NINDS"}  # the demo's four sites
    assert set(public[0]) == {"question", "answer", "source"}


def test_the_shared_data_is_looked_for_next_to_the_checkout():
    """The benchmarks' move out of simulation/ left this one level too high: every shared-data task failed."""
    from pathlib import Path

    from benchmarks.privacy_utility import SHARED

    assert SHARED == Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_the_federation_sweep_calibrates_each_site_and_aggregates_as_the_server_does(tmp_path, model_cache):
    """benchmarks/federation.py (the GPU sweeps of BENCHMARKS.md 17): each site's sigma spends its epsilon over all
    the recipe's steps by its own accountant; FFA keeps the shared A factors, fedavg averages them too; a recipe
    at lr 0 without DP leaves the model where it was; a recipe not begun by the deadline is skipped, and said so."""
    from benchmarks import federation
    from fedslm.common.errors import UserError
    from privacy.mechanism.accountant import SgmEvent, epsilon
    from privacy.mechanism.policy import default_delta

    prepared = federation.prepare("medquad", tmp_path / "medquad.json", max_train=16, model="tiny")
    assert [len(s["train"]) for s in prepared["sites"]] == [16] * 4 and prepared["config"]["model.max-length"] > 0
    with pytest.raises(UserError, match="'step=2' is not key=value with a key of rounds"):
        federation.Recipe.parse("step=2")
    with pytest.raises(UserError, match="aggregation must be ffa or fedavg"):
        federation.Recipe.parse("aggregation=svd")
    with pytest.raises(UserError, match="schedule must be one of constant, cosine, linear"):
        federation.Recipe.parse("schedule=step")
    cosine = federation.Recipe.parse("rounds=3;lr=0.04;schedule=cosine")
    assert [cosine.lr_at(r) for r in (1, 2, 3)] == pytest.approx([0.04, 0.03, 0.01])
    points = ["rounds=2;steps=2;batch=4;clip=1", "rounds=1;steps=2;batch=4;aggregation=fedavg",
              "rounds=1;steps=1;batch=4;lr=0;epsilon=inf"]
    untrained, ffa, fedavg, still = federation.sweep(tmp_path / "medquad.json", points, device="cpu",
                                                     out=tmp_path / "rows.jsonl")
    for sigma in ffa["sigmas"]:
        spent = epsilon([SgmEvent(sample_rate=4 / 16, noise_multiplier=sigma, steps=4)], delta=default_delta(16))
        assert 7.9 < spent <= 8.0
    assert [r["round"] for r in ffa["rounds"]] == [1, 2] and ffa["examples"] == 2 * 2 * 4 * 4
    assert [r["lr"] for r in ffa["rounds"]] == [1e-2, 1e-2]  # constant
    assert ffa["a_digest"] == ffa["start_a_digest"] != fedavg["a_digest"]
    assert still["rounds"][-1]["eval_loss"] == pytest.approx(untrained["eval_loss"], abs=1e-6)
    assert still["sigmas"] == [None] * 4
    late = federation.sweep(tmp_path / "medquad.json", ["rounds=1;steps=1;batch=4"], device="cpu",
                            out=tmp_path / "rows.jsonl", deadline_s=1e-9, untrained=False)
    assert late == [{"task": "medquad", "text": "rounds=1;steps=1;batch=4", "skipped": "deadline"}]
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 5


def test_the_readme_lists_every_benchmark():
    """The README's `python -m benchmarks NAME` line names exactly the benchmarks there are."""
    import argparse
    import re
    from pathlib import Path

    from benchmarks.cli import add_bench_parser

    parser = argparse.ArgumentParser()
    add_bench_parser(parser)
    (names,) = [action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    listed = re.search(r"-m benchmarks NAME +# ([a-z, -]+) \(BENCHMARKS\.md\)", readme).group(1).split(", ")
    assert sorted(listed) == sorted(names)
