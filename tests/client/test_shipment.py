import hashlib

import numpy as np
import pytest

from client.shipment import _on_device_base, verify_and_store
from fedslm.common.errors import UserError

DATA = np.frombuffer(b"GGUF" + bytes(range(256)) * 4, dtype=np.uint8)
SHA = hashlib.sha256(DATA.tobytes()).hexdigest()


def test_verified_file_is_stored(tmp_path):
    path = verify_and_store(DATA, expected_sha256=SHA, expected_bytes=DATA.size, directory=tmp_path, name="m.gguf")
    assert path.read_bytes() == DATA.tobytes() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("sha, size, name, reason", [
    ("0" * 64, DATA.size, "m.gguf", "does not match"),
    (SHA, DATA.size + 1, "m.gguf", "announced"),
    (SHA, DATA.size, "../m.gguf", "not a plain .gguf file name"),
])
def test_corrupt_or_mismatched_file_is_rejected_and_nothing_replaced(tmp_path, sha, size, name, reason):
    previous = tmp_path / "m.gguf"
    previous.write_bytes(b"the model already in use")
    with pytest.raises(UserError, match=reason):
        verify_and_store(DATA, expected_sha256=sha, expected_bytes=size, directory=tmp_path, name=name)
    assert previous.read_bytes() == b"the model already in use"


def test_a_flipped_byte_is_caught(tmp_path):
    corrupted = DATA.copy()
    corrupted[100] ^= 0x01
    with pytest.raises(UserError, match="sha256"):
        verify_and_store(corrupted, expected_sha256=SHA, expected_bytes=DATA.size, directory=tmp_path, name="m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("stored, base_file", [(None, "base.gguf"), (b"another base", "base.gguf"),
                                               (DATA.tobytes(), "../base.gguf")])
def test_an_adapter_is_evaluated_only_on_the_announced_base_the_device_holds(tmp_path, stored, base_file):
    if stored is not None:
        (tmp_path / "base.gguf").write_bytes(stored)
    announced = {"base-file": base_file, "base-sha256": SHA}
    with pytest.raises(UserError, match="no base"):
        _on_device_base(tmp_path / "adapter.gguf", announced, tmp_path)
