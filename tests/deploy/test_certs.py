"""deploy.certs: files Flower 1.41 accepts, safe permissions, no silent overwrite, one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from deploy.certs import main

ROOT = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_superlink_certificate_is_signed_by_the_ca_for_every_name(tmp_path, capsys):
    creds = tmp_path / "creds"
    assert main(["superlink", str(creds), "--san", "fl.example.org", "--san", "10.0.0.5"]) == 0
    assert mode(creds) == 0o700 and mode(creds / "ca.key") == 0o600 and mode(creds / "server.key") == 0o600
    ca = x509.load_pem_x509_certificate((creds / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((creds / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in sans} == {"127.0.0.1", "localhost", "fl.example.org", "10.0.0.5"}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_reissuing_the_server_certificate_needs_force_and_keeps_the_ca(tmp_path, capsys):
    creds = tmp_path / "creds"
    main(["superlink", str(creds)])
    ca_before, server_before = (creds / "ca.crt").read_bytes(), (creds / "server.crt").read_bytes()
    assert main(["superlink", str(creds)]) == 2
    assert capsys.readouterr().err.strip() == f"deploy.certs: error: {creds / 'server.key'} already exists; pass --force to replace it"
    assert (creds / "server.crt").read_bytes() == server_before
    assert main(["superlink", str(creds), "--force"]) == 0
    assert (creds / "ca.crt").read_bytes() == ca_before and (creds / "server.crt").read_bytes() != server_before


def test_supernode_keys_load_with_flowers_own_loaders(tmp_path, capsys):
    creds = tmp_path / "site"
    assert main(["supernode", str(creds), "hospital-a", "hospital-b"]) == 0
    for name in ("hospital-a", "hospital-b"):
        assert mode(creds / f"{name}.key") == 0o600
        private = load_ssh_private_key((creds / f"{name}.key").read_bytes(), None)  # as flower-supernode does
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp256r1"
        assert try_load_public_key(creds / f"{name}.pub")  # as `flwr supernode register` does
    before = (creds / "hospital-a.key").read_bytes()
    assert main(["supernode", str(creds), "hospital-a"]) == 2
    assert "hospital-a.key already exists; pass --force" in capsys.readouterr().err
    assert (creds / "hospital-a.key").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["superlink", "{dir}", "--san", "not a host"], "--san 'not a host': not an IP address or a DNS name"),
    (["supernode", "{dir}", "ca"], "SuperNode name 'ca': use letters, digits"),
    (["superlink", "{dir}", "--days", "0"], "--days 0: must be at least 1"),
])
def test_bad_input_is_one_line_from_the_command_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "deploy.certs", *[a.format(dir=tmp_path / "c") for a in args]],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"deploy.certs: error: {message}"), proc.stderr
    assert not (tmp_path / "c").exists()  # refused before anything was written
