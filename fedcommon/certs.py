"""The federation's keys and certificates: a private CA, the SuperLink's TLS certificate, one key pair per site.

Layout of a PKI directory (made by ``cmoe-certs init DIR``)::

    DIR/ca.pem           CA certificate. Public: every site gets a copy to check the SuperLink.
    DIR/private/ca.key   CA private key (0600, DIR/private 0700). Signs server certificates; keep it
                         off the serving machine if you can (only `renew-server` needs it).
    DIR/server.pem       SuperLink TLS certificate, signed by the CA (flower-superlink --ssl-certfile).
    DIR/server.key       its private key, PKCS#8 PEM, 0600 (flower-superlink --ssl-keyfile).
    DIR/sites/A.key      site A's authentication key, OpenSSH private-key format, 0600. Goes to site A only.
    DIR/sites/A.pub      site A's public key, OpenSSH format (``ecdsa-sha2-nistp384 AAAA... cmoe-site:A``).
                         Stays with the coordinator, which registers every sites/*.pub with the SuperLink.

Keys are ECDSA on NIST P-384, signatures SHA-384. The formats follow what Flower 1.42 reads:
the SuperLink hands the three TLS files to gRPC as PEM bytes (flwr/common/args.py,
``try_obtain_server_certificates``); a SuperNode loads ``--auth-supernode-private-key`` with
``cryptography``'s ``load_ssh_private_key`` and requires an EC key (flwr/supernode/cli/flower_supernode.py,
``_try_setup_client_authentication``), so the site key must be an OpenSSH private key (PKCS#8 PEM is
refused); ``flwr supernode register`` loads the public key with ``load_ssh_public_key`` and requires a NIST
curve (flwr/cli/supernode/register.py, ``try_load_public_key``).

The server certificate names every host the sites may dial (DNS names or IP addresses) plus ``localhost``
and ``127.0.0.1``, because the coordinator's own helpers reach the SuperLink over loopback.

Validity and renewal: the CA lasts ``ca_days`` (default 3650, ten years), the server certificate ``days``
(default 825, the longest browsers ever accepted; nothing here depends on it). Site keys do not expire.
Before the server certificate runs out, ``cmoe-certs renew-server DIR`` issues a new one from the same CA
(same hosts unless given): sites keep their ca.pem and keys, the SuperLink is restarted. When the CA itself
nears its end, run ``cmoe-certs init`` into a new directory, re-issue every site key there and send each
site the new ca.pem and key. `show` prints days left for both certificates.

Every file is written atomically (temporary file with its final mode, then ``os.replace``): an
interrupted command leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cancermoe.errors import InputError
from cancermoe.files import write_files_atomically

CA_CERT = "ca.pem"
CA_KEY = "private/ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
SITES = "sites"

CURVE = ec.SECP384R1
SIGNATURE_HASH = hashes.SHA384
LOOPBACK_NAMES = ("localhost", "127.0.0.1")
DEFAULT_SERVER_DAYS = 825
DEFAULT_CA_DAYS = 3650
# Certificates start a few minutes in the past so a site whose clock runs slightly behind still accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)

SITE_NAME = re.compile(r"[A-Za-z0-9_-]+")
DNS_NAME = re.compile(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?")
SECRET_MODE = 0o600
SECRET_DIR_MODE = 0o700
PUBLIC_MODE = 0o644


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# ----------------------------------------------------------------------------------------------------------------
# Issuing certificates


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def subject_alternative_names(hosts: list[str]) -> list[x509.GeneralName]:
    """The SANs for `hosts` plus localhost and 127.0.0.1, in order, without repeats.

    A host that parses as an IP address becomes an IPAddress entry (TLS clients match IPs only against those),
    anything else a DNS name.
    """
    names: list[x509.GeneralName] = []
    for host in [*hosts, *LOOPBACK_NAMES]:
        host = host.strip()
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            if not DNS_NAME.fullmatch(host):
                raise InputError("--host", f"{host!r} is neither an IP address nor a DNS name") from None
            name = x509.DNSName(host.lower())
        if name not in names:
            names.append(name)
    return names


def new_certificate_authority(days: int, *, name: str = "CancerMoE-FL federation CA",
                              now: dt.datetime | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate valid `days` days, allowed only to sign certificates and CRLs."""
    now = now or _now()
    key = ec.generate_private_key(CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        # path_length=0: this CA signs end-entity certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, SIGNATURE_HASH())
    )
    return cert, key


def issue_server_certificate(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str],
                             days: int, *, now: dt.datetime | None = None,
                             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS server certificate for `hosts` (+ loopback), signed by the CA, valid `days` days from `now`."""
    now = now or _now()
    sans = subject_alternative_names(hosts)
    key = ec.generate_private_key(CURVE())
    common_name = str(sans[0].value)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # ECDSA TLS server keys sign the handshake: digitalSignature is the only usage needed.
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, SIGNATURE_HASH())
    )
    return cert, key


def _check_days(days: int, ca_days: int) -> None:
    if days < 1:
        raise InputError("--days", f"must be at least 1, got {days}")
    if ca_days < days:
        raise InputError("--ca-days", f"the CA ({ca_days} days) must outlive the server certificate ({days} days)")


def init_pki(directory: str | os.PathLike[str], hosts: list[str], days: int = DEFAULT_SERVER_DAYS,
             ca_days: int = DEFAULT_CA_DAYS) -> Path:
    """Create a PKI directory: a new CA and a server certificate for `hosts`. Returns the directory.

    Refuses a directory that exists and is not empty: nothing is ever overwritten.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise InputError(directory, "already exists and is not empty; give a new directory (nothing was changed)")
    if not hosts:
        raise InputError("--host", "give at least one host name or IP address the sites will connect to")
    _check_days(days, ca_days)
    subject_alternative_names(hosts)  # reject a bad host before anything is created

    ca_cert, ca_key = new_certificate_authority(ca_days)
    server_cert, server_key = issue_server_certificate(ca_cert, ca_key, hosts, days)
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / Path(CA_KEY).parent
    private.mkdir(mode=SECRET_DIR_MODE, exist_ok=True)
    private.chmod(SECRET_DIR_MODE)
    write_files_atomically([
        (directory / CA_KEY, _key_pem(ca_key), SECRET_MODE),
        (directory / CA_CERT, _cert_pem(ca_cert), PUBLIC_MODE),
        (directory / SERVER_KEY, _key_pem(server_key), SECRET_MODE),
        (directory / SERVER_CERT, _cert_pem(server_cert), PUBLIC_MODE),
    ])
    return directory


def renew_server_certificate(directory: str | os.PathLike[str], hosts: list[str] | None = None,
                             days: int = DEFAULT_SERVER_DAYS) -> Path:
    """Replace server.pem/server.key with a new certificate from the same CA. Returns server.pem's path.

    `hosts` defaults to the current certificate's names. The CA must outlive the new certificate.
    """
    directory = Path(directory)
    ca_cert = load_certificate(directory / CA_CERT)
    ca_key = _load_pem_key(directory / CA_KEY)
    if hosts is None:
        hosts = [str(name) for name in _sans(load_certificate(directory / SERVER_CERT))]
    if days < 1:
        raise InputError("--days", f"must be at least 1, got {days}")
    if _now() + dt.timedelta(days=days) > ca_cert.not_valid_after_utc:
        raise InputError(directory / CA_CERT, f"the CA expires before a {days}-day certificate would; "
                                              "run `cmoe-certs init` into a new directory instead")
    cert, key = issue_server_certificate(ca_cert, ca_key, hosts, days)
    write_files_atomically([
        (directory / SERVER_KEY, _key_pem(key), SECRET_MODE),
        (directory / SERVER_CERT, _cert_pem(cert), PUBLIC_MODE),
    ])
    return directory / SERVER_CERT


# ----------------------------------------------------------------------------------------------------------------
# Site keys (Flower SuperNode authentication)


def _require_pki(directory: Path) -> None:
    if not (directory / CA_CERT).is_file():
        raise InputError(directory, f"not a PKI directory (no {CA_CERT}); run `cmoe-certs init` first")


def new_site_key(directory: str | os.PathLike[str], site: str, force: bool = False) -> tuple[Path, Path]:
    """Create site `site`'s authentication key pair: (sites/SITE.key, sites/SITE.pub).

    The private key is in OpenSSH format (what the SuperNode's loader accepts), the public key an OpenSSH line.
    Refuses an existing key unless `force`.
    """
    directory = Path(directory)
    if not SITE_NAME.fullmatch(site):
        raise InputError(f"site {site!r}", "site names use only letters, digits, '_' and '-'")
    _require_pki(directory)
    sites = directory / SITES
    key_path, pub_path = sites / f"{site}.key", sites / f"{site}.pub"
    if not force and (key_path.exists() or pub_path.exists()):
        raise InputError(key_path if key_path.exists() else pub_path,
                         "site already has a key; pass --force to replace it (its old key stops working)")
    sites.mkdir(exist_ok=True)
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_files_atomically([
        (key_path, private, SECRET_MODE),
        (pub_path, public + f" cmoe-site:{site}\n".encode(), PUBLIC_MODE),
    ])
    return key_path, pub_path


def load_site_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Read an OpenSSH public key file as Flower does: it must be EC on a NIST curve."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror}") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InputError(path, f"not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1",
                                                                                   "secp521r1"):
        raise InputError(path, "Flower needs an ECDSA key on a NIST curve (P-256, P-384 or P-521)")
    return key


def site_keys(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Site name -> its public key file, for every valid DIR/sites/*.pub, sorted by name."""
    sites = Path(directory) / SITES
    keys: dict[str, Path] = {}
    for path in sorted(sites.glob("*.pub")):
        if not SITE_NAME.fullmatch(path.stem):
            raise InputError(path, "site names use only letters, digits, '_' and '-'")
        load_site_public_key(path)
        keys[path.stem] = path
    return keys


def ssh_fingerprint(pub_path: Path) -> str:
    """The key's fingerprint as ``ssh-keygen -lf`` prints it: ``SHA256:`` + unpadded base64 of the key blob."""
    blob = base64.b64decode(pub_path.read_bytes().split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking


def load_certificate(path: Path) -> x509.Certificate:
    """A PEM certificate, or an InputError naming the file."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise InputError(path, "missing (run `cmoe-certs init`)") from None
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror}") from None
    except ValueError as exc:
        raise InputError(path, f"not a PEM certificate: {exc}") from None


def _load_pem_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise InputError(path, "missing") from None
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InputError(path, f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(path, "not an ECDSA key")
    return key


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in names]


def _validity(cert: x509.Certificate, now: dt.datetime) -> dict:
    not_after = cert.not_valid_after_utc
    return {
        "subject": cert.subject.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": not_after.isoformat(),
        # Whole days, rounded down: 0 means it ends within a day; negative means ended.
        "days_left": (not_after - now) // dt.timedelta(days=1),
        "expired": now >= not_after,
    }


def _signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def describe_pki(directory: str | os.PathLike[str]) -> dict:
    """What the PKI directory holds: the CA, the server certificate and each site key, with expiry facts.

    Keys: ``dir``; ``ca`` and ``server`` (path, subject, not_before/not_after as ISO UTC, days_left, expired;
    the server adds ``sans`` and ``signed_by_ca``); ``sites``: list of {site, path, fingerprint, curve}.
    """
    directory = Path(directory)
    _require_pki(directory)
    now = _now()
    ca_cert = load_certificate(directory / CA_CERT)
    server_cert = load_certificate(directory / SERVER_CERT)
    sites = []
    for site, pub in site_keys(directory).items():
        sites.append({"site": site, "path": str(pub), "fingerprint": ssh_fingerprint(pub),
                      "curve": load_site_public_key(pub).curve.name,
                      "private_key_here": (pub.with_suffix(".key")).exists()})
    return {
        "dir": str(directory),
        "ca": {"path": str(directory / CA_CERT), **_validity(ca_cert, now)},
        "server": {"path": str(directory / SERVER_CERT), **_validity(server_cert, now), "sans": _sans(server_cert),
                   "signed_by_ca": _signed_by(server_cert, ca_cert)},
        "sites": sites,
    }


def check_site_credentials(ca: Path, key: Path) -> None:
    """Raise an InputError naming the file unless a site's --ca is a CA certificate valid now and its --key an
    OpenSSH ECDSA private key (what `cmoe-certs site` writes)."""
    ca_cert = load_certificate(ca)
    now = _now()
    if now >= ca_cert.not_valid_after_utc:
        raise InputError(ca, f"expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; ask the coordinator for the "
                             "federation's new ca.pem")
    if now < ca_cert.not_valid_before_utc:
        raise InputError(ca, f"not valid before {ca_cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check the clock")
    try:
        private_key = serialization.load_ssh_private_key(key.read_bytes(), password=None)
    except OSError as exc:
        raise InputError(key, f"cannot read: {exc.strerror}") from None
    except (ValueError, UnsupportedAlgorithm):
        raise InputError(key, "not a site key made by `cmoe-certs site` (OpenSSH ECDSA private key)") from None
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise InputError(key, "not an ECDSA key: site keys are made by `cmoe-certs site`")


def check_server_certificate(directory: str | os.PathLike[str]) -> None:
    """Raise an InputError naming the file unless the SuperLink's TLS files are usable right now:
    ca.pem and server.pem present and in their validity period, server.pem signed by the CA, server.key its key."""
    directory = Path(directory)
    now = _now()
    ca_cert = load_certificate(directory / CA_CERT)
    server_cert = load_certificate(directory / SERVER_CERT)
    for path, cert in ((directory / CA_CERT, ca_cert), (directory / SERVER_CERT, server_cert)):
        if now >= cert.not_valid_after_utc:
            raise InputError(path, f"expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                                   "renew with `cmoe-certs renew-server` (or `init` a new PKI if the CA expired)")
        if now < cert.not_valid_before_utc:
            raise InputError(path, f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check the clock")
    if not _signed_by(server_cert, ca_cert):
        raise InputError(directory / SERVER_CERT, f"not signed by the CA in {directory / CA_CERT}")
    server_key = _load_pem_key(directory / SERVER_KEY)
    if server_key.public_key() != server_cert.public_key():
        raise InputError(directory / SERVER_KEY, f"is not the private key of {directory / SERVER_CERT}")
