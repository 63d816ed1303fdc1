"""A real deployment on loopback: SuperLink with TLS and SuperNode authentication, two SuperNodes, `flwr run`.

Each SuperNode has its own records, ledger directory, budget (node config) and app allow-list,
as a hospital would; every message runs in a fresh flwr-clientapp process, behind the site's
app guard, that loads the tiny base from the session's model cache. Both sites approve the
repository's app with `python -m deploy.approve` before it is submitted. Checked: the run
directory of a 2-round run, and that the hash the sites approved is the one Flower reports for
the submission and the one the guard computed from the bytes it received; after a restart and
a new run a node's ledger continues (epsilon grows, entries are only appended); a node whose
local budget is spent refuses; a modified copy of the app is refused before any of it is
unpacked or imported; an unregistered key is turned away; nothing listens beyond 127.0.0.1.
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
from harness import (
    CONNECTION,
    allow_list,
    app_snapshot,
    approve,
    certs,
    cli_home,
    flwr,
    flwr_home,
    non_loopback_listeners,
    run_until_exit,
    superlink,
    supernode,
    supernode_env,
    write_node_config,
)
from servers import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SITES = ("site-a", "site-b")
SMALL = ("model.name='tiny' model.max-length=48 data.max-eval-examples=8 train.batch-size=4 train.local-steps=2 "
         "server.min-clients=2")
# Appended to the modified copy's client/app.py: importing it leaves a file naming the FLWR_HOME it ran under.
MARK = """
import os as _os, pathlib as _pathlib
_pathlib.Path({markers!r}, str(_os.getpid())).write_text(_os.environ.get("FLWR_HOME", ""))
"""
# What flwr-clientapp does with a bundle when nothing guards it: unpack it, import its ClientApp.
UNGUARDED = """
import sys
from pathlib import Path
from flwr.cli.build import build_fab_from_disk
from flwr.cli.install import install_from_fab
from flwr.supercore.object_ref import load_app
load_app("client.app:app", RuntimeError, install_from_fab(build_fab_from_disk(Path(sys.argv[1])), skip_prompt=True))
"""


@pytest.fixture(scope="module")
def federation(tmp_path_factory, model_cache):
    """Credentials, a running SuperLink, the two sites' keys registered with it, the app both sites approved."""
    from slm.base import resolve_model_dir

    work = tmp_path_factory.mktemp("deployment")
    app = app_snapshot(work / "app")
    app_hash = {approve(app, allow_list(work, site)) for site in SITES}
    assert len(app_hash) == 1
    creds = work / "creds"
    certs("superlink", str(creds))
    certs("supernode", str(creds), *SITES, "intruder")
    tiny = resolve_model_dir("tiny") / "config.json"  # built once here; ClientApps must only read it
    port = free_port()
    home = cli_home(work / "cli-home", port, creds / "ca.crt")
    with superlink(work, port, creds) as proc:
        for site in SITES:
            registered = flwr(home, "supernode", "register", str(creds / f"{site}.pub"), CONNECTION, timeout=120)
            assert registered.returncode == 0, registered.stdout + registered.stderr
        yield {"work": work, "creds": creds, "port": port, "home": home, "superlink": proc, "tiny": tiny,
               "tiny_stat": os.stat(tiny), "app": app, "app_hash": app_hash.pop()}


def site_files(work: Path, site: str, records: list[dict], max_epsilon: float, tag: str) -> Path:
    """The site's own records (different per site, so different ledgers) and its node config."""
    folder = work / site
    folder.mkdir(exist_ok=True)
    data = folder / "records.jsonl"
    data.write_text("".join(json.dumps({**r, "question": f"{site}: {r['question']}"}) + "\n" for r in records))
    return write_node_config(folder / f"node-{tag}.toml", data_path=str(data), ledger_dir=str(folder / "ledger"),
                             max_epsilon=max_epsilon, model_dir="tiny", name=site, fields="question,answer")


def start_sites(fed: dict, stack: ExitStack, configs: dict[str, Path], tag: str) -> list:
    """Start the sites' SuperNodes side by side: each start spends seconds checking its node config.

    Every started node is on ``stack`` before anything can fail, so it is stopped with the rest.
    """
    def start(site: str):
        return stack.enter_context(supernode(fed["work"], site, fed["port"], fed["creds"] / "ca.crt",
                                             fed["creds"] / f"{site}.key", configs[site],
                                             fed["work"] / site / f"{tag}.log"))

    with ThreadPoolExecutor(len(configs)) as pool:
        return list(pool.map(start, configs))


def run_app(fed: dict, run_id: str, extra: str, app: Path | None = None) -> list[dict]:
    """Submit ``app`` (default: the approved snapshot of the repository's app); the run's metrics rows."""
    proc = flwr(fed["home"], "run", str(app or fed["app"]), CONNECTION, "--stream", "--run-config",
                f"{SMALL} {extra} run.id='{run_id}' run.root='{fed['work'] / 'runs'}'", timeout=400)
    run_dir = fed["work"] / "runs" / run_id
    assert proc.returncode == 0 and (run_dir / "metrics.jsonl").is_file(), proc.stdout[-4000:] + proc.stderr[-2000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def reported_runs(fed: dict) -> list[dict]:
    """Every run as Flower's SuperLink records and reports it (`flwr ls`): fab hash, status, ..."""
    proc = flwr(fed["home"], "ls", CONNECTION, "--format", "json", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)["runs"]


def ledger(work: Path, site: str) -> list[dict]:
    from privacy.mechanism.ledger import LEDGER_FILE

    return json.loads((work / site / "ledger" / LEDGER_FILE).read_text())["entries"]


def test_an_unregistered_supernode_is_rejected(federation):
    fed = federation
    config = site_files(fed["work"], "intruder", [{"question": "q", "answer": "a"}], max_epsilon=8.0, tag="only")
    allow_list(fed["work"], "intruder").write_text("")  # approves nothing; the key is what is refused here
    env = supernode_env(fed["work"], "intruder", fed["port"], fed["creds"] / "ca.crt",
                        fed["creds"] / "intruder.key", config, free_port())
    log = fed["work"] / "intruder.log"
    code = run_until_exit([str(ROOT / "deploy" / "supernode.sh")], env, log, timeout=120)
    assert code != 0 and "Exit Code: 305" in log.read_text(), log.read_text()[-2000:]  # SUPERNODE_CONNECTION_ERROR


def test_two_rounds_then_a_restart_continues_the_ledger_and_a_spent_budget_refuses(federation, qa_records):
    fed, work = federation, federation["work"]
    first = {site: site_files(work, site, qa_records, max_epsilon=8.0, tag="first") for site in SITES}
    with ExitStack() as stack:
        nodes = start_sites(fed, stack, first, "first")
        groups = {fed["superlink"].pid, *(node.pid for node in nodes)}
        assert non_loopback_listeners(groups) == []
        # Spend about 3 of each site's 8: the next run still has budget. The coordinator's attempt to switch
        # DP off and fix the noise seed is overruled by the sites. The sites' updates are summed with SecAgg+.
        rows = run_app(fed, "first", "server.rounds=2 dp.target-epsilon=3.0 dp.enabled=false dp.noise-seed=7 "
                                     "server.aggregation='ffa' server.secure-aggregation=true")
        assert non_loopback_listeners(groups) == []
    assert [r["round"] for r in rows] == [0, 1, 2]
    # deploy.approve's hash is the one Flower reports for the submission and the one each site's guard
    # computed from the bundle bytes its SuperNode handed to flwr-clientapp.
    assert [(run["fab-hash"], run["status"]) for run in reported_runs(fed)] == [(fed["app_hash"],
                                                                                 "finished:completed")]
    for site in SITES:
        assert f"fedslm app guard: app sha256 {fed['app_hash']} approved" in (work / site / "first.log").read_text()
    assert all({p["client"] for p in r["participants"]} == set(SITES) and not r["refused"] for r in rows[1:])
    assert all(r["secure_aggregation"]["in_sum"] == 2 and not r.get("skipped") for r in rows[1:])
    run_dir = work / "runs" / "first"
    view = json.loads((run_dir / "privacy" / "ledger.json").read_text())["clients"]
    assert set(view) == set(SITES)
    assert all(r["dp"] and r["noise_seed"] == "os-entropy" and r["noise_multiplier"] > 0
               for records in view.values() for r in records)
    for k in (0, 1, 2):
        assert {p.name for p in (run_dir / "adapters" / f"round-{k}").iterdir()} >= {
            "adapter_config.json", "adapter_model.safetensors"}
    assert json.loads((run_dir / "config.json").read_text())["model.name"] == "tiny"
    before = {site: ledger(work, site) for site in SITES}
    assert all([e["status"] for e in entries] == ["committed", "committed"] for entries in before.values())

    # Restart both nodes; site-b now with a local budget below what it has already spent.
    second = {"site-a": first["site-a"], "site-b": site_files(work, "site-b", qa_records, max_epsilon=1.0, tag="second")}
    with ExitStack() as stack:
        start_sites(fed, stack, second, "second")
        rows = run_app(fed, "second", "server.rounds=2 dp.target-epsilon=8.0")
    after = {site: ledger(work, site) for site in SITES}
    a_before, a_after = before["site-a"], after["site-a"]
    assert a_after[:2] == a_before and a_after[2]["run_id"] == "second" and a_after[2]["status"] == "committed"
    assert a_after[2]["epsilon_after"] > a_before[-1]["epsilon_after"]  # grows, never resets
    assert after["site-b"][:2] == before["site-b"] and after["site-b"][2]["status"] == "refused"
    assert "budget exhausted" in after["site-b"][2]["reason"]
    assert [r["round"] for r in rows] == [0, 1]  # round 1 skipped (1 reply < min-clients 2), then a clean stop
    assert rows[1]["skipped"] and len(rows[1]["refused"]) == 1 and len(rows[1]["participants"]) == 1

    # Every ClientApp process read the cached base; none rebuilt it.
    assert os.stat(fed["tiny"]).st_ino == fed["tiny_stat"].st_ino
    assert os.stat(fed["tiny"]).st_mtime_ns == fed["tiny_stat"].st_mtime_ns


def test_a_modified_app_is_refused_before_any_of_it_runs(federation, qa_records):
    """The repository's app with client/app.py changed: the sites run none of it, and say so."""
    from deploy.approve import bundle, fab_hash

    fed, work = federation, federation["work"]
    markers = work / "markers"
    markers.mkdir()
    modified = app_snapshot(work / "modified-app")
    client_app = modified / "client" / "app.py"
    client_app.write_text(client_app.read_text() + MARK.format(markers=str(markers)))
    modified_hash = fab_hash(bundle(modified))
    configs = {site: site_files(work, site, qa_records, max_epsilon=8.0, tag="modified") for site in SITES}
    with ExitStack() as stack:
        start_sites(fed, stack, configs, "modified")
        rows = run_app(fed, "modified", "server.rounds=1", app=modified)

    refusal = {site: f"app {modified_hash[:16]} is not approved by site '{site}'" for site in SITES}
    assert [r["round"] for r in rows] == [0, 1]
    # Each site is named by its node config in every line, though it sent nothing but the refusal.
    errors = sorted(rows[0]["eval_errors"])
    assert len(errors) == 2 and all(e.startswith(f"{site}: ") and refusal[site] in e for site, e in zip(SITES, errors))
    assert rows[1]["skipped"] and not rows[1]["participants"] and not rows[1]["refused"]
    failed = sorted((f["client"], f["reason"]) for f in rows[1]["failed"])
    assert [site for site, _ in failed] == list(SITES) and all(refusal[site] in why for site, why in failed)
    # `flwr run` exits 0 whatever happened: the run's status is where Flower says that nothing trained.
    (run,) = [run for run in reported_runs(fed) if run["fab-hash"] == modified_hash]
    assert run["status"] == "finished:failed" and run["status-details"].endswith("0 of 1 rounds trained"), run
    site_homes = {str(flwr_home(work, site)) for site in SITES}
    assert not site_homes & {marker.read_text() for marker in markers.iterdir()}  # never imported on a site
    for site in SITES:
        log = (work / site / "modified.log").read_text()
        assert f"fedslm app guard: REFUSED app sha256 {modified_hash}: not in this site's allow-list" in log
        assert not (flwr_home(work, site) / "approved" / modified_hash).exists()  # nor unpacked
        assert not (flwr_home(work, site) / "apps").exists()  # Flower's default place: nothing ever went there

    # Control: unpacked and loaded by Flower without the guard, the same bundle does leave its mark.
    control = work / "control-home"
    subprocess.run([sys.executable, "-c", UNGUARDED, str(modified)], env={**os.environ, "FLWR_HOME": str(control)},
                   cwd=work, check=True, capture_output=True, timeout=300)
    assert str(control) in {marker.read_text() for marker in markers.iterdir()}


# The run-config half of the hostile coordinator: every site-owned setting it could try to move.
HOSTILE_RUN_CONFIG = ("dp.delta=0.2 dp.max-epsilon=1000.0 dp.enabled=false dp.noise-seed=7 dp.noise-multiplier=0.01 "
                      "data.seed=5 data.test-fraction=0.5 data.max-train-examples=3 "
                      f"dp.ledger-dir='{Path('/tmp') / 'hostile-fresh-ledger'}'")


def test_a_hostile_coordinator_gets_refusals_and_never_more_than_the_sites_budget(federation, qa_records):
    """docs/THREAT-MODEL.md, attacks 1-3, 6, 10, 11 against real SuperNodes (TLS, node auth, app guard).

    The coordinator runs its own ServerApp (tests/attacks/hostile_server.py) bundled with the
    unmodified ClientApp; the sites approved that bundle (a hostile coordinator controls its
    SuperLink, so approving the ClientApp is all a site can do). Every attack must be refused
    with its reason in the site's own log, or accounted; the honest round trains; and what each
    site released, recomputed from the replies with dp_accounting's PLD, stays within its budget.
    """
    sys.path.insert(0, str(ROOT / "tests" / "attacks"))
    from coordinator import independent_epsilon

    fed, work = federation, federation["work"]
    hostile = app_snapshot(work / "hostile-app")
    shutil.copy(ROOT / "tests" / "attacks" / "hostile_server.py", hostile / "hostile_server.py")
    pyproject = hostile / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('serverapp = "server.app:app"',
                                                       'serverapp = "hostile_server:app"'))
    for site in SITES:
        approve(hostile, allow_list(work, site))
    budget = 3.0
    configs = {}
    for site in SITES:
        folder = work / site / "hostile"
        folder.mkdir(parents=True)
        data = folder / "records.jsonl"
        data.write_text("".join(json.dumps({**r, "question": f"{site}: {r['question']}"}) + "\n" for r in qa_records))
        configs[site] = write_node_config(folder / "node.toml", data_path=str(data), ledger_dir=str(folder / "ledger"),
                                          max_epsilon=budget, model_dir="tiny", name=site, fields="question,answer")
    with ExitStack() as stack:
        start_sites(fed, stack, configs, "hostile")
        proc = flwr(fed["home"], "run", str(hostile), CONNECTION, "--stream", "--run-config",
                    f"{SMALL} {HOSTILE_RUN_CONFIG} run.id='hostile' run.root='{work / 'runs'}'", timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    replies = json.loads((work / "runs" / "hostile.hostile.json").read_text())
    assert not [r for r in replies if "error" in r], replies
    by_attack = {}
    for r in replies:
        by_attack.setdefault(r["attack"], []).append(r)
    for site in SITES:
        mine = {attack: next(r for r in rs if r["privacy"]["client"] == site) for attack, rs in by_attack.items()}
        assert mine["honest-1"]["privacy"]["status"] == "committed"
        rejected = mine["round-past-the-end"]
        assert rejected["privacy"]["status"] == "rejected" and not rejected["released"]
        assert rejected["privacy"]["code"] == "request-out-of-bounds"
        for attack in ("round-past-the-end", "wrong-a-factors"):  # the reply holds the code's sentence, no detail
            assert mine[attack]["privacy"]["reason"] == "the request is outside the site's policy", mine[attack]
        crafted = mine["crafted-adapter"]  # a start the coordinator made up: trained and accounted like any other
        assert crafted["privacy"]["status"] == "committed" and crafted["released"]
        # Told each round is the last, the site plans its whole remainder into it: it reaches its budget
        # (the crumbs end in a refusal or at a sigma under its cap), never passes it.
        spent = [p["epsilon"] for p in (mine[f"always-the-last-round-{k}"]["privacy"] for k in "ab")]
        assert 0.99 * budget <= max(spent) <= budget
        released = [r["privacy"] for r in mine.values() if r["released"]]
        assert all(r["metrics"] == ["num-examples", "steps"] for r in mine.values() if r["released"])
        assert all(p["dp"] and p["noise_seed"] == "os-entropy" and p["noise_multiplier"] >= 0.3 for p in released)
        ledger_file = json.loads((work / site / "hostile" / "ledger" / "ledger.json").read_text())
        assert ledger_file["delta"] < 0.1 / 20 and all(p["delta"] == ledger_file["delta"] for p in released)
        assert len([e for e in ledger_file["entries"] if e["status"] != "refused"]) == len(released)
        assert independent_epsilon(released, ledger_file["delta"]) <= budget + 0.02
        log = (work / site / "hostile.log").read_text()
        assert "refused a train request: round 5 of 3 is not a round of the run" in log
        assert "A factors differ" in log
        for key in ("dp.delta=0.2", "dp.max-epsilon=1000.0", "data.seed=5", "dp.enabled=False"):
            assert f"ignored the coordinator's {key}" in log
    assert not Path("/tmp/hostile-fresh-ledger").exists()
