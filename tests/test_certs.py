"""`cmoe-certs` and fedcommon.certs: the CA, the SuperLink certificate, site keys in the formats Flower loads."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from cancermoe.errors import InputError
from fedcommon import certs

REPO = Path(__file__).resolve().parents[1]


def cmoe_certs(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.certs_cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A PKI made through the command line, shared by the read-only tests."""
    directory = tmp_path_factory.mktemp("pki") / "pki"
    done = cmoe_certs("init", directory, "--host", "coord.example.org", "--host", "10.1.2.3", "--days", "30")
    assert done.returncode == 0, done.stderr
    return directory


@pytest.mark.process
def test_init_writes_ca_and_server_files_with_private_modes(pki):
    for name in (certs.CA_CERT, certs.CA_KEY, certs.SERVER_CERT, certs.SERVER_KEY):
        assert (pki / name).is_file(), name
    assert mode(pki / certs.CA_KEY) == 0o600
    assert mode(pki / certs.SERVER_KEY) == 0o600
    assert mode(pki / "private") == 0o700
    assert not list(pki.rglob(".*.tmp-*")), "temporary files left behind"


@pytest.mark.process
def test_ca_is_a_signing_only_ca(pki):
    ca = x509.load_pem_x509_certificate((pki / certs.CA_CERT).read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    ca.verify_directly_issued_by(ca)  # self-signed
    key = serialization.load_pem_private_key((pki / certs.CA_KEY).read_bytes(), password=None)
    assert key.public_key() == ca.public_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"


@pytest.mark.process
def test_server_certificate_is_signed_by_the_ca_and_names_every_host(pki):
    ca = x509.load_pem_x509_certificate((pki / certs.CA_CERT).read_bytes())
    server = x509.load_pem_x509_certificate((pki / certs.SERVER_CERT).read_bytes())
    server.verify_directly_issued_by(ca)  # raises InvalidSignature otherwise

    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"coord.example.org", "localhost"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.1.2.3"),
                                                             ipaddress.ip_address("127.0.0.1")}
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30) + certs.CLOCK_SKEW
    key = serialization.load_pem_private_key((pki / certs.SERVER_KEY).read_bytes(), password=None)
    assert key.public_key() == server.public_key()
    certs.check_server_certificate(pki)  # raises if anything is off


@pytest.mark.process
@pytest.mark.bad_input
def test_init_refuses_a_non_empty_directory_and_touches_nothing(pki):
    before = snapshot(pki)
    done = cmoe_certs("init", pki, "--host", "other.example.org")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {pki}:")
    assert snapshot(pki) == before


@pytest.mark.bad_input
def test_init_rejects_a_bad_host_before_creating_anything(tmp_path):
    with pytest.raises(InputError, match="neither an IP address nor a DNS name"):
        certs.init_pki(tmp_path / "pki", ["bad host!"])
    assert not (tmp_path / "pki").exists()


@pytest.mark.process
def test_site_key_pair_loads_with_flowers_own_loaders(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    pki = certs.init_pki(tmp_path / "pki", ["coord"], days=10, ca_days=20)
    done = cmoe_certs("site", pki, "hospital-A")
    assert done.returncode == 0, done.stderr
    key_path, pub_path = pki / "sites" / "hospital-A.key", pki / "sites" / "hospital-A.pub"
    assert mode(key_path) == 0o600
    assert pub_path.read_text().startswith("ecdsa-sha2-nistp384 AAAA")
    assert "--site=hospital-A" in done.stdout and "cmoe-server --pki" in done.stdout

    # The SuperNode's `--auth-supernode-private-key` loader and `flwr supernode register`'s public key loader.
    private_key, derived_public = _try_setup_client_authentication(
        argparse.Namespace(auth_supernode_private_key=str(key_path), auth_supernode_public_key=None))
    assert try_load_public_key(pub_path) == public_key_to_bytes(derived_public)
    assert private_key.curve.name == "secp384r1"
    assert certs.site_keys(pki) == {"hospital-A": pub_path}


@pytest.mark.process
@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_site_fingerprint_matches_ssh_keygen(tmp_path):
    pki = certs.init_pki(tmp_path / "pki", ["coord"])
    _, pub = certs.new_site_key(pki, "B")
    listed = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout
    assert listed.split()[1] == certs.ssh_fingerprint(pub)


@pytest.mark.process
@pytest.mark.bad_input
def test_duplicate_site_is_refused_unless_forced(tmp_path):
    pki = certs.init_pki(tmp_path / "pki", ["coord"])
    key_path, _ = certs.new_site_key(pki, "A")
    first = key_path.read_bytes()
    done = cmoe_certs("site", pki, "A")
    assert done.returncode == 2 and "already has a key" in done.stderr and done.stderr.count("\n") == 1
    assert key_path.read_bytes() == first
    certs.new_site_key(pki, "A", force=True)
    assert key_path.read_bytes() != first


@pytest.mark.parametrize("name", ["a b", "../A", "A.B", ""])
@pytest.mark.bad_input
def test_bad_site_name_is_refused(tmp_path, name):
    pki = certs.init_pki(tmp_path / "pki", ["coord"])
    with pytest.raises(InputError, match="site names use only"):
        certs.new_site_key(pki, name)
    assert not (pki / "sites").exists()


@pytest.mark.process
@pytest.mark.bad_input
def test_site_needs_an_initialised_pki(tmp_path):
    done = cmoe_certs("site", tmp_path, "A")
    assert done.returncode == 2 and "run `cmoe-certs init` first" in done.stderr


def backdate_server_certificate(pki: Path) -> None:
    """Replace server.pem with one from the same CA that ran out a year ago."""
    ca = x509.load_pem_x509_certificate((pki / certs.CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((pki / certs.CA_KEY).read_bytes(), password=None)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    cert, key = certs.issue_server_certificate(ca, ca_key, ["coord"], days=30, now=long_ago)
    (pki / certs.SERVER_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.mark.process
@pytest.mark.bad_input
def test_show_lists_everything_and_flags_an_expired_server_certificate(tmp_path):
    pki = certs.init_pki(tmp_path / "pki", ["coord"], days=5)
    certs.new_site_key(pki, "A")
    certs.new_site_key(pki, "B")

    info = json.loads(cmoe_certs("show", pki, "--json").stdout)
    assert not info["server"]["expired"] and info["server"]["signed_by_ca"]
    assert 4 <= info["server"]["days_left"] <= 5
    assert [s["site"] for s in info["sites"]] == ["A", "B"]
    assert all(s["fingerprint"].startswith("SHA256:") for s in info["sites"])

    backdate_server_certificate(pki)
    table = cmoe_certs("show", pki)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:]}
    assert "EXPIRED" in rows["server"] and "EXPIRED" not in rows["CA"]
    assert sum(line.startswith("site") for line in table.stdout.splitlines()) == 2
    with pytest.raises(InputError, match="expired") as raised:
        certs.check_server_certificate(pki)
    assert raised.value.where == str(pki / certs.SERVER_CERT)


@pytest.mark.bad_input
def test_check_refuses_a_server_certificate_from_another_ca(tmp_path):
    ours = certs.init_pki(tmp_path / "ours", ["coord"])
    theirs = certs.init_pki(tmp_path / "theirs", ["coord"])
    shutil.copy(theirs / certs.SERVER_CERT, ours / certs.SERVER_CERT)
    with pytest.raises(InputError, match="not signed by the CA"):
        certs.check_server_certificate(ours)
    assert certs.describe_pki(ours)["server"]["signed_by_ca"] is False


@pytest.mark.process
def test_renew_server_replaces_an_expired_certificate_keeping_the_ca_and_hosts(tmp_path):
    pki = certs.init_pki(tmp_path / "pki", ["coord"], days=5)
    ca_before = (pki / certs.CA_CERT).read_bytes()
    sans_before = certs.describe_pki(pki)["server"]["sans"]
    backdate_server_certificate(pki)
    done = cmoe_certs("renew-server", pki, "--days", "60")
    assert done.returncode == 0, done.stderr
    certs.check_server_certificate(pki)
    info = certs.describe_pki(pki)
    assert (pki / certs.CA_CERT).read_bytes() == ca_before
    assert info["server"]["sans"] == sans_before == ["coord", "localhost", "127.0.0.1"]
    assert 59 <= info["server"]["days_left"] <= 60 and mode(pki / certs.SERVER_KEY) == 0o600


@pytest.mark.bad_input
def test_days_are_checked(tmp_path):
    with pytest.raises(InputError, match="at least 1"):
        certs.init_pki(tmp_path / "a", ["coord"], days=0)
    with pytest.raises(InputError, match="must outlive"):
        certs.init_pki(tmp_path / "b", ["coord"], days=100, ca_days=50)


@pytest.mark.bad_input
def test_site_credentials_are_checked_before_the_site_connects(tmp_path):
    pki = certs.init_pki(tmp_path / "pki", ["coord"])
    key, _ = certs.new_site_key(pki, "A")
    certs.check_site_credentials(pki / certs.CA_CERT, key)

    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    old_ca, _ = certs.new_certificate_authority(30, now=long_ago)
    expired = tmp_path / "old-ca.pem"
    expired.write_bytes(old_ca.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(InputError, match="expired on .*ask the coordinator for the federation's new ca.pem"):
        certs.check_site_credentials(expired, key)

    with pytest.raises(InputError, match="not a PEM certificate"):
        certs.check_site_credentials(key, key)
    with pytest.raises(InputError, match="not a site key made by `cmoe-certs site`") as raised:
        certs.check_site_credentials(pki / certs.CA_CERT, pki / certs.CA_CERT)
    assert raised.value.where == str(pki / certs.CA_CERT)
    from cryptography.hazmat.primitives.asymmetric import ed25519

    other = tmp_path / "ed25519.key"
    other.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    with pytest.raises(InputError, match="not an ECDSA key"):
        certs.check_site_credentials(pki / certs.CA_CERT, other)
