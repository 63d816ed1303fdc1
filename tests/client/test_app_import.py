"""A deployed site runs every message in a fresh process: the ClientApp itself must import no torch stack.

Three of a SecAgg+ round's four messages train nothing, and a request refused at admission
never reaches the model; each used to pay 3.5 s of CPU importing torch, transformers, PEFT and
Opacus (client/app.py's docstring). Only the rooms a message reaches import them.
"""

import subprocess
import sys

HEAVY = ("torch", "peft", "opacus")


def imported_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout.split()


def test_the_client_app_and_its_admission_import_no_torch_stack():
    assert imported_after("import client.app") == []


def test_a_round_that_trains_brings_them():
    """The check above is only worth something if the same probe sees them where they are needed."""
    assert imported_after("import client.train_round") == list(HEAVY)
