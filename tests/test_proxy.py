"""The reverse proxy of deploy/nginx: the sites' only way in. Through it the federation works and Flower's
unauthenticated control API is refused. A real nginx, a real SuperLink (cmoe-server --pki) and a real SuperNode
(cmoe-client) on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import string
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedcommon import processes
from fedcommon.processes import free_port, wait_for_port
from tests.federation_helpers import SMALL_MODEL, synth_site
from tests.process_helpers import BIN, start, stop

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "cmoe-fleet.conf.template"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

# CI installs nginx (.ci/run); a developer machine without it skips these tests rather than failing them.
pytestmark = [pytest.mark.process,  # nginx, a SuperLink and sites, all real processes
              pytest.mark.skipif(not Path(NGINX).exists() and not os.environ.get("CI"),
                                 reason="nginx is not installed (apt-get install nginx-light)")]


def render_proxy(folder: Path, public_port: int, superlink_port: int, pki: Path) -> Path:
    """The template filled in as envsubst would, inside a minimal nginx.conf whose files all live in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    fleet = string.Template(TEMPLATE.read_text()).safe_substitute(
        CMOE_PUBLIC_PORT=f"127.0.0.1:{public_port}", CMOE_SUPERLINK=f"127.0.0.1:{superlink_port}", CMOE_PKI=str(pki))
    (folder / "cmoe-fleet.conf").write_text(fleet)
    temp_paths = " ".join(f"{kind}_temp_path {folder / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                          "uwsgi", "scgi"))
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers must read the test's private tmp folder
    main = folder / "nginx.conf"
    main.write_text(f"{user}pid {folder / 'nginx.pid'};\nerror_log {folder / 'error.log'};\nevents {{}}\n"
                    f"http {{\n  access_log {folder / 'access.log'};\n  {temp_paths}\n"
                    f"  include {folder / 'cmoe-fleet.conf'};\n}}\n")
    return main


def make_pki(folder: Path, *sites: str) -> Path:
    certs = [sys.executable, "-m", "server.certs_cli"]
    subprocess.run([*certs, "init", str(folder), "--host", "localhost"], capture_output=True, check=True)
    for site in sites:
        subprocess.run([*certs, "site", str(folder), site], capture_output=True, check=True)
    return folder


def https_status(url: str, ca: Path, body: bytes | None = b"", content_type: str = "application/json") -> int:
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_shipped_proxy_config_passes_nginx_t(tmp_path) -> None:
    pki = make_pki(tmp_path / "pki")
    config = render_proxy(tmp_path / "nginx", free_port(), free_port(), pki)
    result = subprocess.run([NGINX, "-t", "-c", str(config), "-p", str(tmp_path / "nginx")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@pytest.mark.bad_input
def test_sites_train_through_the_proxy_and_the_control_api_is_refused(tmp_path) -> None:
    pki = make_pki(tmp_path / "pki", "A")
    bank = synth_site(tmp_path / "A.h5", 1, patients=24)
    superlink_port, public_port = free_port(), free_port()
    config = render_proxy(tmp_path / "nginx", public_port, superlink_port, pki)
    proxy = start([NGINX, "-c", str(config), "-p", str(tmp_path / "nginx"), "-g", "daemon off;"],
                  tmp_path / "nginx.out")
    sets = [arg for item in SMALL_MODEL for arg in ("--set", item)]
    server = start([str(BIN / "cmoe-server"), "--rounds", "1", "--min-sites", "1", "--pki", str(pki),
                    "--listen", f"127.0.0.1:{superlink_port}", "--workdir", str(tmp_path / "server"), *sets],
                   tmp_path / "server.out")
    client = None
    try:
        assert wait_for_port("127.0.0.1", public_port, timeout=30, process=proxy), (tmp_path / "nginx.out").read_text()
        assert wait_for_port("127.0.0.1", superlink_port, timeout=60, process=server), \
            (tmp_path / "server.out").read_text()
        public = f"https://127.0.0.1:{public_port}"
        # Flower's control API (submit runs = run code at every site), its runtime API and anything else: refused.
        for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/pull-messages", "/health"):
            assert https_status(public + path, pki / "ca.pem") == 403, path
        assert https_status(public + "/v1/fleet/pull-messages", pki / "ca.pem", body=None) == 403  # POST only
        # The fleet API reaches the SuperLink, which demands a site's signature (401), not the proxy (403).
        assert https_status(public + "/v1/fleet/pull-messages", pki / "ca.pem", content_type="application/protobuf",
                            body=b"") == 401
        # What an intruder would type: the flwr CLI pointed at the public port gets nowhere.
        intruder = tmp_path / "intruder-flwr"
        intruder.mkdir()
        (intruder / "config.toml").write_text(
            f'[superlink]\ndefault = "c"\n\n[superlink.c]\naddress = "127.0.0.1:{public_port}"\n'
            f'root-certificates = "{pki / "ca.pem"}"\n')
        reply = processes.run_flwr(["ls", "c"], intruder)
        assert not reply.get("success") and "runs" not in reply, reply

        client = start([str(BIN / "cmoe-client"), "--site", "A", "--bank", str(bank),
                        "--superlink", f"127.0.0.1:{public_port}", "--ca", str(pki / "ca.pem"),
                        "--key", str(pki / "sites" / "A.key"), "--workdir", str(tmp_path / "site-A")],
                       tmp_path / "client.out")
        code = server.wait(timeout=300)
    finally:
        for process in (server, client, proxy):
            if process is not None:
                stop(process)
    assert code == 0, (tmp_path / "server.out").read_text()
    results = json.loads((tmp_path / "server" / "results.json").read_text())
    assert results["rounds"][0]["sites_trained"] == ["A"]
    # The site really went through the proxy: nginx logged its fleet calls.
    access = (tmp_path / "nginx" / "access.log").read_text()
    assert access.count("POST /v1/fleet/pull-messages") >= 1 and "/v1/fleet/push-messages" in access


@pytest.mark.bad_input
def test_a_site_facing_an_expired_server_certificate_gets_one_clear_line(tmp_path) -> None:
    """The coordinator's certificate ran out (here: the one the proxy serves): the site says so and gives up."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fedcommon import certs

    pki = make_pki(tmp_path / "pki", "A")
    ca = x509.load_pem_x509_certificate((pki / certs.CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((pki / certs.CA_KEY).read_bytes(), password=None)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    cert, key = certs.issue_server_certificate(ca, ca_key, ["localhost"], days=30, now=long_ago)
    (pki / certs.SERVER_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (pki / certs.SERVER_KEY).write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    public_port = free_port()
    config = render_proxy(tmp_path / "nginx", public_port, free_port(), pki)
    proxy = start([NGINX, "-c", str(config), "-p", str(tmp_path / "nginx"), "-g", "daemon off;"],
                  tmp_path / "nginx.out")
    try:
        assert wait_for_port("127.0.0.1", public_port, timeout=30, process=proxy), (tmp_path / "nginx.out").read_text()
        bank = synth_site(tmp_path / "A.h5", 1, patients=12)
        client = subprocess.run(
            [str(BIN / "cmoe-client"), "--site", "A", "--bank", str(bank), "--superlink", f"127.0.0.1:{public_port}",
             "--ca", str(pki / "ca.pem"), "--key", str(pki / "sites" / "A.key"), "--workdir", str(tmp_path / "site"),
             "--max-restarts", "1"], capture_output=True, text=True, timeout=180)
    finally:
        stop(proxy)
    errors = [line for line in client.stderr.splitlines() if line.startswith("error:")]
    assert client.returncode == 1 and len(errors) == 1, client.stderr
    assert "the coordinator's certificate has expired" in errors[0]
