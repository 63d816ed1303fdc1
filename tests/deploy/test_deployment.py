"""A real deployment on loopback: SuperLink with TLS and SuperNode authentication, two SuperNodes, `flwr run`.

Each SuperNode has its own records, ledger directory and budget (node config), as a hospital
would; every message runs in a fresh flwr-clientapp process that loads the tiny base from the
session's model cache. Checked: the run directory of a 2-round run; after a restart and a new
run a node's ledger continues (epsilon grows, entries are only appended); a node whose local
budget is spent refuses; an unregistered key is turned away; nothing listens beyond 127.0.0.1.
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
from harness import (
    CONNECTION,
    certs,
    cli_home,
    flwr,
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
         "server.rounds=2 server.min-clients=2")


@pytest.fixture(scope="module")
def federation(tmp_path_factory, model_cache):
    """Credentials, a running SuperLink and the two sites' keys registered with it."""
    from slm.base import resolve_model_dir

    work = tmp_path_factory.mktemp("deployment")
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
               "tiny_stat": os.stat(tiny)}


def site_files(work: Path, site: str, records: list[dict], max_epsilon: float, tag: str) -> Path:
    """The site's own records (different per site, so different ledgers) and its node config."""
    folder = work / site
    folder.mkdir(exist_ok=True)
    data = folder / "records.jsonl"
    data.write_text("".join(json.dumps({**r, "question": f"{site}: {r['question']}"}) + "\n" for r in records))
    return write_node_config(folder / f"node-{tag}.toml", data_path=str(data), ledger_dir=str(folder / "ledger"),
                             max_epsilon=max_epsilon, model_dir="tiny", name=site)


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


def run_app(fed: dict, run_id: str, extra: str) -> list[dict]:
    proc = flwr(fed["home"], "run", str(ROOT), CONNECTION, "--stream", "--run-config",
                f"{SMALL} {extra} run.id='{run_id}' run.root='{fed['work'] / 'runs'}'", timeout=400)
    run_dir = fed["work"] / "runs" / run_id
    assert proc.returncode == 0 and (run_dir / "metrics.jsonl").is_file(), proc.stdout[-4000:] + proc.stderr[-2000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ledger(work: Path, site: str) -> list[dict]:
    (path,) = (work / site / "ledger").glob("ledger-*.json")
    return json.loads(path.read_text())["entries"]


def test_an_unregistered_supernode_is_rejected(federation):
    fed = federation
    config = site_files(fed["work"], "intruder", [{"question": "q", "answer": "a"}], max_epsilon=8.0, tag="only")
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
        # DP off and fix the noise seed is overruled by the sites.
        rows = run_app(fed, "first", "dp.target-epsilon=3.0 dp.enabled=false dp.noise-seed=7")
        assert non_loopback_listeners(groups) == []
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all({p["client"] for p in r["participants"]} == set(SITES) and not r["refused"] for r in rows[1:])
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
        rows = run_app(fed, "second", "dp.target-epsilon=8.0")
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
