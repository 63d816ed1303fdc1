"""deploy.app_guard, deploy/site-bin and supernode.sh's allow-list: what a site runs is what it approved.

The end-to-end refusal (a real SuperNode, a modified app submitted with `flwr run`) is in
test_deployment.py; here each piece on its own, in seconds.
"""

import os
import subprocess
import sys

import pytest
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import LoadClientAppError
from flwr.supercore.constant import TASK_TYPE_TO_COMMAND
from flwr.supernode.runtime import run_clientapp as runtime
from harness import DEPLOY, ROOT, script_env, write_node_config

from deploy.app_guard import REPLACED, Guard, NotApproved, guard_flower, site_name
from deploy.approve import bundle, fab_hash

SITE_BIN = DEPLOY / "site-bin"


def refusing_install(*args, **kwargs):
    raise AssertionError("Flower's install_from_fab must not see a bundle that is not approved")


@pytest.fixture
def fab(tiny_app) -> bytes:
    return bundle(tiny_app)


def test_a_bundle_not_on_the_list_is_refused_before_flower_sees_it(fab, tmp_path, capsys):
    approved = tmp_path / "approved.txt"
    approved.write_text(f"{'a' * 64}  another app\n")
    guard = Guard(refusing_install, None, str(approved), tmp_path / "flwr-home")
    digest = fab_hash(fab)
    with pytest.raises(NotApproved, match=f"^app {digest[:16]} is not approved by this site$"):
        guard.install(fab, skip_prompt=True)
    assert capsys.readouterr().err == (f"fedslm app guard: REFUSED app sha256 {digest}: not in this site's "
                                       f"allow-list {approved}; nothing of it was unpacked or run\n")
    assert not (tmp_path / "flwr-home").exists()
    with pytest.raises(NotApproved, match="no approved app bundle was unpacked"):
        guard.loader("", None, True)


def test_a_refusal_names_the_site_from_its_node_config_and_the_coordinator_reads_it(fab, tmp_path):
    """A site that refuses every app sends nothing else: its refusal is where the coordinator learns its name."""
    from server.intake import REFUSED_BY_SITE

    node_config = tmp_path / "node.toml"
    node_config.write_text('name = "hospital-a"\ndata-path = "/srv/records.jsonl"\n')
    assert site_name(str(node_config)) == "hospital-a"
    guard = Guard(refusing_install, None, str(tmp_path / "none.txt"), tmp_path, site=site_name(str(node_config)))
    with pytest.raises(NotApproved) as refused:
        guard.install(fab)
    reason = f"<class 'deploy.app_guard.NotApproved'>:<'{refused.value}'>"  # as Flower's error reply carries it
    assert str(refused.value) == f"app {fab_hash(fab)[:16]} is not approved by site 'hospital-a'"
    assert REFUSED_BY_SITE.search(reason).group(1) == "hospital-a"
    for unnamed in ("", "name = 3\n", "name = \"it's\"\n", "not toml ["):
        node_config.write_text(unnamed)
        assert site_name(str(node_config)) == ""
    assert site_name(str(tmp_path / "missing.toml")) == site_name(None) == ""


@pytest.mark.parametrize("name, content, why", [(None, None, "FEDSLM_APPROVED_APPS is not set"),
                                                ("approved.txt", None, "No such file"),
                                                ("approved.txt", "oops\n", "line 1 does not start with a sha256")])
def test_without_a_usable_list_nothing_is_approved(fab, tmp_path, capsys, name, content, why):
    if content is not None:
        (tmp_path / name).write_text(content)
    guard = Guard(refusing_install, None, name and str(tmp_path / name), tmp_path)
    with pytest.raises(NotApproved, match="is not approved by this site"):
        guard.install(fab)
    err = capsys.readouterr().err
    assert err.startswith(f"fedslm app guard: REFUSED app sha256 {fab_hash(fab)}: no usable allow-list") and why in err


def test_an_approved_bundle_is_unpacked_under_its_full_hash_and_loaded_from_there(fab, tmp_path, capsys, monkeypatch):
    """Flower's own install and loader; the run's metadata (the coordinator's word) cannot redirect the load."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # Flower's loader puts the app directory on it
    monkeypatch.delitem(sys.modules, "tinyclient", raising=False)
    digest = fab_hash(fab)
    approved = tmp_path / "approved.txt"
    approved.write_text(f"{digest}  fedslm-test/tinyapp 1.0.0\n")
    guard = Guard(runtime.install_from_fab, runtime.get_load_client_app_fn, str(approved), tmp_path / "home")
    installed = guard.install(fab, skip_prompt=True)
    assert installed.parent == tmp_path / "home" / "approved" / digest / "apps"
    assert (installed / "tinyclient.py").is_file()
    assert capsys.readouterr().err == f"fedslm app guard: app sha256 {digest} approved (fedslm-test/tinyapp 1.0.0)\n"
    load = guard.loader(default_app_ref="", app_path=None, multi_app=True)
    assert isinstance(load("fedslm-test/tinyapp", "1.0.0", "0" * 64), ClientApp)  # any hash: the unpacked dir
    assert sys.modules["tinyclient"].__file__ == str(installed / "tinyclient.py")
    with pytest.raises(LoadClientAppError, match="FAB ID or version mismatch"):
        load("fedslm-test/other", "1.0.0", digest)


def approved_guard(fab, tmp_path, install=runtime.install_from_fab) -> Guard:
    """A fresh guard (one flwr-clientapp process, one message) on a site that approved ``fab``."""
    approved = tmp_path / "approved.txt"
    approved.write_text(f"{fab_hash(fab)}  fedslm-test/tinyapp 1.0.0\n")
    return Guard(install, runtime.get_load_client_app_fn, str(approved), tmp_path / "home")


def tamper_modify(app, marker):
    (app / "tinyclient.py").write_text(f"open({str(marker)!r}, 'w').close()\n" + (app / "tinyclient.py").read_text())


def tamper_add(app, marker):  # a module the approved one does not import, but anything on sys.path can shadow
    (app / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n")


def tamper_bytecode(app, marker):  # Python reads __pycache__ before the source when the header matches
    (app / "__pycache__").mkdir()
    (app / "__pycache__" / f"tinyclient.{sys.implementation.cache_tag}.pyc").write_bytes(b"planted")


def tamper_delete(app, marker):
    (app / "tinyserver.py").unlink()


def tamper_symlink(app, marker):
    (app / "tinyclient.py").unlink()
    (app / "tinyclient.py").symlink_to(marker.parent / "elsewhere.py")


@pytest.mark.parametrize("tamper, problem", [
    (tamper_modify, "tinyclient.py differs from the bundle"),
    (tamper_add, "sitecustomize.py is not in the bundle"),
    (tamper_bytecode, "__pycache__ is not in the bundle"),
    (tamper_delete, "tinyserver.py is missing"),
    (tamper_symlink, "tinyclient.py is a symbolic link"),
])
def test_a_tampered_unpacked_app_is_never_run_but_unpacked_again_from_the_approved_bytes(
        fab, tmp_path, capsys, monkeypatch, tamper, problem):
    """Whoever can write $FLWR_HOME/approved/ cannot make the next message run code the site never approved."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "tinyclient", raising=False)
    installed = approved_guard(fab, tmp_path).install(fab)
    before = {p.relative_to(installed): p.read_bytes() for p in installed.rglob("*")}
    marker = tmp_path / "tampered-code-ran"
    (tmp_path / "elsewhere.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    tamper(installed, marker)
    capsys.readouterr()

    guard = approved_guard(fab, tmp_path)  # the next message: a new flwr-clientapp process
    again = guard.install(fab)
    assert again == installed
    assert {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if not p.is_symlink()} == before
    target = tmp_path / "home" / "approved" / fab_hash(fab)
    assert capsys.readouterr().err.splitlines()[1] == (
        f"fedslm app guard: unpacked app {target} does not match the approved bundle ({problem}); "
        "not run, unpacked again from the approved bundle")
    assert isinstance(guard.loader("", None, True)("fedslm-test/tinyapp", "1.0.0", "0" * 64), ClientApp)
    assert not marker.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [fab_hash(fab)]  # nothing left aside


def test_an_intact_unpacked_app_is_reused_as_it_is(fab, tmp_path, capsys):
    installed = approved_guard(fab, tmp_path).install(fab)
    inode = installed.stat().st_ino

    def no_second_unpack(*args, **kwargs):
        raise AssertionError("an intact unpack is reused, not unpacked again")

    assert approved_guard(fab, tmp_path, no_second_unpack).install(fab) == installed
    assert installed.stat().st_ino == inode and "does not match" not in capsys.readouterr().err


def test_an_interrupted_unpack_is_never_reused(fab, tmp_path, capsys):
    """A crash in the middle of unpacking (here: after Flower wrote part of the files) leaves no approved/<sha256>/."""

    def crashing_install(fab_file, install_dir=None, skip_prompt=False):
        installed = runtime.install_from_fab(fab_file, install_dir=install_dir, skip_prompt=skip_prompt)
        (installed / "tinyclient.py").unlink()  # as if the copy had stopped half-way
        raise KeyboardInterrupt  # SIGINT, or the process killed: nothing after this line runs

    target = tmp_path / "home" / "approved" / fab_hash(fab)
    with pytest.raises(KeyboardInterrupt):
        approved_guard(fab, tmp_path, crashing_install).install(fab)
    assert not target.exists()
    installed = approved_guard(fab, tmp_path).install(fab)
    assert (installed / "tinyclient.py").read_text() == "from flwr.clientapp import ClientApp\n\napp = ClientApp()\n"
    assert "does not match" not in capsys.readouterr().err


@pytest.mark.parametrize("leftover", [[], ["apps"], ["apps/fedslm-test.tinyapp.1.0.0.x/pyproject.toml"]])
def test_a_partial_directory_left_by_an_older_guard_is_never_reused(fab, tmp_path, capsys, leftover):
    """Before the atomic rename, Flower unpacked straight into approved/<sha256>/: a crash left it half-written."""
    target = tmp_path / "home" / "approved" / fab_hash(fab)
    target.mkdir(parents=True)
    for name in leftover:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text("") if name.endswith(".toml") else (target / name).mkdir()
    installed = approved_guard(fab, tmp_path).install(fab)
    assert (installed / "tinyclient.py").is_file() and (installed / "tinyserver.py").is_file()
    assert "does not match the approved bundle" in capsys.readouterr().err


def test_guard_replaces_flowers_names_and_stops_if_flower_stops_calling_them(tmp_path, monkeypatch):
    for name in REPLACED:
        monkeypatch.setattr(runtime, name, getattr(runtime, name))  # restored after the test
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    guard = guard_flower(str(tmp_path / "approved.txt"))
    assert runtime.install_from_fab == guard.install and runtime.get_load_client_app_fn == guard.loader
    assert sys.dont_write_bytecode  # an approved directory stays as unpacked: no __pycache__ for the next check
    monkeypatch.delattr(runtime, "install_from_fab")
    with pytest.raises(SystemExit, match="no longer calls install_from_fab .* refusing to run any app unguarded"):
        guard_flower(str(tmp_path / "approved.txt"))


def test_site_bin_shadows_every_task_command_flower_can_start(tmp_path):
    """Only flwr-clientapp runs (guarded); any other task a SuperNode could be sent is refused."""
    env = {**os.environ, "FEDSLM_VENV": str(os.path.dirname(os.path.dirname(sys.executable)))}
    for command in TASK_TYPE_TO_COMMAND.values():
        assert os.access(SITE_BIN / command, os.X_OK), command
        if command == "flwr-clientapp":
            continue
        proc = subprocess.run([str(SITE_BIN / command), "--runtime-api-address", "127.0.0.1:1"], env=env,
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1 and proc.stderr == (
            f"fedslm app guard: REFUSED to start {command}: this site runs only approved ClientApps "
            "(deploy/app_guard.py)\n")
    proc = subprocess.run([str(SITE_BIN / "flwr-clientapp"), "--help"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "Run a Flower ClientApp" in proc.stdout, proc.stderr  # Flower's own parser


def test_the_guard_imports_no_package_of_the_app(tmp_path):
    """Imported before the bundle, the site's own fedslm/slm/client/... would shadow the bundle's modules."""
    code = ("import sys, deploy.app_guard as g; g.guard_flower(None); print(sorted("
            "{m.split('.')[0] for m in sys.modules} & {'fedslm', 'slm', 'client', 'privacy', 'server', 'simulation'}))")
    proc = subprocess.run([sys.executable, "-P", "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


@pytest.mark.parametrize("allow_list, message", [
    (None, "supernode.sh: error: set FEDSLM_APPROVED_APPS to this site's app allow-list"),
    ("{tmp}/missing.txt", "supernode.sh: error: FEDSLM_APPROVED_APPS {tmp}/missing.txt is missing or unreadable"),
])
def test_supernode_script_requires_the_allow_list(tmp_path, allow_list, message):
    records = tmp_path / "records.jsonl"
    records.write_text('{"question": "q", "answer": "a"}\n')
    config = write_node_config(tmp_path / "node.toml", name="site-a", data_path=str(records),
                               ledger_dir=str(tmp_path / "ledger"), max_epsilon=8.0, model_dir="tiny")
    (tmp_path / "ca.crt").write_text("unused")
    (tmp_path / "node.key").write_text("unused")
    env = script_env(tmp_path / "home", FEDSLM_SUPERLINK="127.0.0.1:1", FEDSLM_CA=str(tmp_path / "ca.crt"),
                     FEDSLM_KEY=str(tmp_path / "node.key"), FEDSLM_NODE_CONFIG=str(config))
    env.pop("FEDSLM_APPROVED_APPS", None)
    if allow_list:
        env["FEDSLM_APPROVED_APPS"] = allow_list.format(tmp=tmp_path)
    proc = subprocess.run([str(DEPLOY / "supernode.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(message.format(tmp=tmp_path))
