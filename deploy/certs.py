"""Credentials for a Flower deployment: a CA, the SuperLink's TLS certificate, SuperNode keys.

Two commands, because they run on different machines:

    python -m deploy.certs superlink DIR [--san HOST ...] [--days N] [--force]
        On the coordinator. Creates a CA once (later calls reuse it, so re-issuing the
        server certificate never invalidates the ca.crt every site already holds) and a
        SuperLink TLS certificate signed by it for 127.0.0.1, localhost and each --san.
        ca.crt goes to every site; ca.key and server.key never leave DIR.
    python -m deploy.certs supernode DIR NAME [NAME ...] [--force]
        On each site. One ECDSA P-256 key pair per SuperNode: NAME.key stays on the site,
        NAME.pub goes to the coordinator, who runs ``flwr supernode register NAME.pub``.

Formats are the ones Flower 1.41 reads: PEM for TLS (the SuperLink's uvicorn server and
the clients' ssl context) and OpenSSH for SuperNode keys (``flower-supernode
--auth-supernode-private-key`` uses ``load_ssh_private_key`` and requires an EC key;
``flwr supernode register`` uses ``load_ssh_public_key`` and requires a NIST curve).
Private keys are written 0600 into a 0700 directory and never overwritten without --force.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedslm.common.errors import UserError

DEFAULT_SANS = ("127.0.0.1", "localhost")
CA_DAYS = 5 * 365
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
HOSTNAME = re.compile(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*")
RESERVED = {"ca", "server"}  # would collide with the SuperLink's files in a shared DIR


def private_dir(path: Path) -> Path:
    """Create DIR (and parents) and make it 0700: it holds private keys."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def refuse_existing(paths: list[Path], force: bool) -> None:
    """Check every target before writing any, so a refusal leaves nothing half-written."""
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} already exists; pass --force to replace it")


def write(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary file created with ``mode``: a key is never readable by others, even briefly."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def subject_alternative_names(extra: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for value in dict.fromkeys([*DEFAULT_SANS, *extra]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(value)))
        except ValueError:
            if not HOSTNAME.fullmatch(value):
                raise UserError(f"--san {value!r}: not an IP address or a DNS name") from None
            names.append(x509.DNSName(value))
    return names


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedslm"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def new_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("fedslm CA")).issuer_name(_name("fedslm CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = directory / "ca.key", directory / "ca.crt"
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise UserError(f"{key_path} does not belong to {cert_path}")
    return key, cert


def server_certificate(ca_key, ca_cert: x509.Certificate, sans: list[x509.GeneralName], days: int):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("fedslm superlink")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def cmd_superlink(args) -> list[Path]:
    sans = subject_alternative_names(args.san)
    if args.days < 1:
        raise UserError(f"--days {args.days}: must be at least 1")
    directory = private_dir(Path(args.dir).expanduser())
    have_key, have_cert = (directory / "ca.key").exists(), (directory / "ca.crt").exists()
    if have_key != have_cert:
        raise UserError(f"{directory} holds only one of ca.key and ca.crt; restore the other or remove both")
    refuse_existing([directory / "server.key", directory / "server.crt"], args.force)
    written = []
    if have_key:
        ca_key, ca_cert = load_ca(directory)
        print(f"reusing the CA in {directory} (remove ca.key and ca.crt to start a new one)")
    else:
        ca_key, ca_cert = new_ca()
        write(directory / "ca.key", _pem_key(ca_key), 0o600)
        write(directory / "ca.crt", _pem_cert(ca_cert), 0o644)
        written += [directory / "ca.key", directory / "ca.crt"]
    key, cert = server_certificate(ca_key, ca_cert, sans, args.days)
    write(directory / "server.key", _pem_key(key), 0o600)
    write(directory / "server.crt", _pem_cert(cert), 0o644)
    return written + [directory / "server.key", directory / "server.crt"]


def cmd_supernode(args) -> list[Path]:
    for name in args.names:
        if not NAME.fullmatch(name) or name in RESERVED:
            raise UserError(f"SuperNode name {name!r}: use letters, digits, '.', '_' or '-' (not 'ca' or 'server')")
    directory = private_dir(Path(args.dir).expanduser())
    refuse_existing([directory / f"{n}.{ext}" for n in args.names for ext in ("key", "pub")], args.force)
    written = []
    for name in args.names:
        key = ec.generate_private_key(ec.SECP256R1())
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        write(directory / f"{name}.key", private, 0o600)
        write(directory / f"{name}.pub", public + f" {name}\n".encode(), 0o644)
        written += [directory / f"{name}.key", directory / f"{name}.pub"]
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.certs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    link = sub.add_parser("superlink", help="a CA (once) and the SuperLink's TLS certificate")
    link.add_argument("dir", help="credentials directory (made 0700)")
    link.add_argument("--san", action="append", default=[], metavar="HOST",
                      help="another DNS name or IP address the SuperLink is reached at (repeatable); "
                           "127.0.0.1 and localhost are always included")
    link.add_argument("--days", type=int, default=365, help="validity of the server certificate (default 365)")
    link.add_argument("--force", action="store_true", help="replace an existing server certificate and key")
    link.set_defaults(func=cmd_superlink)
    node = sub.add_parser("supernode", help="an ECDSA P-256 key pair per SuperNode (OpenSSH format)")
    node.add_argument("dir", help="credentials directory (made 0700)")
    node.add_argument("names", nargs="+", metavar="NAME", help="SuperNode name: writes NAME.key and NAME.pub")
    node.add_argument("--force", action="store_true", help="replace existing key pairs")
    node.set_defaults(func=cmd_supernode)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = args.func(args)
    except (UserError, OSError, ValueError, TypeError) as err:  # OSError: DIR not writable; Value/TypeError: a bad ca.key
        print(f"deploy.certs: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
