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

from deploy.app_guard import REPLACED, Guard, NotApproved, guard_flower
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


def test_guard_replaces_flowers_names_and_stops_if_flower_stops_calling_them(tmp_path, monkeypatch):
    for name in REPLACED:
        monkeypatch.setattr(runtime, name, getattr(runtime, name))  # restored after the test
    guard = guard_flower(str(tmp_path / "approved.txt"))
    assert runtime.install_from_fab == guard.install and runtime.get_load_client_app_fn == guard.loader
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
    """Imported before the bundle, the site's own slm/client/... would shadow the bundle's modules."""
    code = ("import sys, deploy.app_guard as g; g.guard_flower(None); print(sorted("
            "{m.split('.')[0] for m in sys.modules} & {'slm', 'client', 'privacy', 'server', 'simulation'}))")
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
                               ledger_dir=str(tmp_path / "ledger"), max_epsilon=8.0)
    (tmp_path / "ca.crt").write_text("unused")
    (tmp_path / "node.key").write_text("unused")
    env = script_env(tmp_path / "home", FEDSLM_SUPERLINK="127.0.0.1:1", FEDSLM_CA=str(tmp_path / "ca.crt"),
                     FEDSLM_KEY=str(tmp_path / "node.key"), FEDSLM_NODE_CONFIG=str(config))
    env.pop("FEDSLM_APPROVED_APPS", None)
    if allow_list:
        env["FEDSLM_APPROVED_APPS"] = allow_list.format(tmp=tmp_path)
    proc = subprocess.run([str(DEPLOY / "supernode.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(message.format(tmp=tmp_path))
