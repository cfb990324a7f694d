"""A site runs only its installed code: the app-bundle gate (client/fab_guard.py).

Unit tests build real bundles with Flower's own FAB builder; the end-to-end test submits a bundle carrying code
to a real SuperLink and checks that the same bundle runs its code at a plain Flower SuperNode (the attack is real)
and does not at a cmoe-client site.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from client.fab_guard import UntrustedAppBundle, check_app_bundle, guarded
from fedcommon import processes
from fedcommon.app_bundle import installed_version
from server.cli import write_app_bundle
from tests.federation_helpers import synth_site
from tests.process_helpers import BIN, start, stop

VERSION = installed_version()


def shim(folder: Path) -> Path:
    return write_app_bundle(folder)


def edit_pyproject(folder: Path, old: str, new: str) -> Path:
    pyproject = folder / "pyproject.toml"
    text = pyproject.read_text()
    assert old in text
    pyproject.write_text(text.replace(old, new))
    return folder


def test_our_shim_at_our_version_is_accepted(tmp_path) -> None:
    check_app_bundle(build_fab_from_disk(shim(tmp_path / "app")), VERSION)


@pytest.mark.parametrize("tamper, reason", [
    (lambda app: (app / "client").mkdir() or (app / "client" / "app.py").write_text("import os\n"),
     "carries files besides pyproject.toml: client/app.py"),
    (lambda app: (app / "notes.json").write_text("{}"), "carries files besides pyproject.toml: notes.json"),
    (lambda app: edit_pyproject(app, 'clientapp = "client.app:app"', 'clientapp = "os:system"'), "components"),
    (lambda app: edit_pyproject(app, "dependencies = []", 'dependencies = ["requests"]'),
     "asks to install dependencies ['requests']"),
    (lambda app: edit_pyproject(app, f'cmoe-version = "{VERSION}"', 'cmoe-version = "9.9.9"'),
     "cmoe-version '9.9.9' does not match"),
    (lambda app: edit_pyproject(app, f'version = "{VERSION}"\ndescription', 'version = "9.9.9"\ndescription'),
     "version '9.9.9' does not match"),
])
@pytest.mark.bad_input
def test_anything_but_the_shim_is_refused_with_the_reason(tmp_path, tamper, reason) -> None:
    app = shim(tmp_path / "app")
    tamper(app)
    with pytest.raises(UntrustedAppBundle, match=reason.replace("[", r"\[").replace("]", r"\]")):
        check_app_bundle(build_fab_from_disk(app), VERSION)


@pytest.mark.bad_input
def test_a_site_of_another_version_refuses_our_shim(tmp_path) -> None:
    with pytest.raises(UntrustedAppBundle, match="must run the same version"):
        check_app_bundle(build_fab_from_disk(shim(tmp_path / "app")), "0.0.1")


@pytest.mark.bad_input
def test_bytes_that_are_not_a_bundle_are_refused() -> None:
    with pytest.raises(UntrustedAppBundle, match="not a zip archive"):
        check_app_bundle(b"#!/bin/sh\nrm -rf /\n", VERSION)


@pytest.mark.bad_input
def test_the_installer_is_never_called_for_a_refused_bundle(tmp_path, monkeypatch) -> None:
    calls = []
    monkeypatch.setenv("CMOE_REFUSAL_LOG", str(tmp_path / "refusals.log"))
    install = guarded(lambda fab, **kwargs: calls.append(fab), VERSION)
    app = shim(tmp_path / "app")
    (app / "evil.py").write_text("print('pwned')\n")
    with pytest.raises(UntrustedAppBundle):
        install(build_fab_from_disk(app), skip_prompt=True)
    assert calls == []
    assert "refused the coordinator's app bundle: it carries files" in (tmp_path / "refusals.log").read_text()
    good = build_fab_from_disk(shim(tmp_path / "good"))
    install(good, skip_prompt=True)
    assert calls == [good]


EVIL_APP = '''
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context) -> None:
    nodes = []
    while not nodes:
        nodes = list(grid.get_node_ids())
    grid.send_and_receive([Message(RecordDict(), dst_node_id=node, message_type="query") for node in nodes],
                          timeout=60)


@client.query()
def query(msg: Message, context) -> Message:
    Path({marker!r}).write_text("code from the coordinator ran at the site")  # what an attacker would do
    return Message(RecordDict(), reply_to=msg)
'''


def evil_app(folder: Path, marker: Path) -> Path:
    """Our shim with code added: what a compromised coordinator, or anyone on the control API, could submit."""
    app = shim(folder)
    edit_pyproject(app, 'serverapp = "server.app:app"\nclientapp = "client.app:app"',
                   'serverapp = "evil:server"\nclientapp = "evil:client"')
    (app / "evil.py").write_text(EVIL_APP.format(marker=str(marker)))
    return app


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


@contextmanager
def fresh_superlink_running(tmp_path: Path, name: str, site_command: list[str], app: Path):
    """A SuperLink, one site started with ``site_command`` + its address, and ``flwr run app`` submitted."""
    port = processes.free_port()
    home = tmp_path / f"{name}-flwr"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "l"\n\n[superlink.l]\naddress = "127.0.0.1:{port}"\n'
                                      "insecure = true\n")
    superlink = start([str(BIN / "flower-superlink"), "--insecure", "--port", str(port),
                       "--disable-runtime-dependency-installation", "--database", str(tmp_path / f"{name}.db")],
                      tmp_path / f"{name}-superlink.log")
    site = None
    try:
        assert processes.wait_for_port("127.0.0.1", port, timeout=60, process=superlink)
        site = start([*site_command, f"127.0.0.1:{port}"], tmp_path / f"{name}-site.log")
        reply = processes.run_flwr(["run", str(app), "l"], home)
        assert reply.get("success"), reply
        yield
    finally:
        for process in (site, superlink):
            if process is not None:
                stop(process)


@pytest.mark.process
@pytest.mark.bad_input
def test_a_bundle_with_code_runs_at_a_plain_supernode_but_not_at_a_cmoe_site(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")  # Flower starts its helpers by name
    marker = tmp_path / "pwned.txt"
    app = evil_app(tmp_path / "evil-app", marker)

    # Without the gate the attack works: Flower's own SuperNode imports the bundle's code.
    plain = [str(BIN / "flower-supernode"), "--insecure", "--port", str(processes.free_port()), "--superlink"]
    with fresh_superlink_running(tmp_path, "plain", plain, app):
        assert wait_for(marker.exists, timeout=120), "the control case did not run the bundle's code"
    marker.unlink()

    bank = synth_site(tmp_path / "A.h5", 1, patients=12)
    workdir = tmp_path / "site-A"
    site = [str(BIN / "cmoe-client"), "--site", "A", "--bank", str(bank), "--insecure", "--workdir", str(workdir),
            "--superlink"]
    refusals = workdir / "refusals.log"
    with fresh_superlink_running(tmp_path, "guarded", site, app):
        assert wait_for(refusals.exists, timeout=120), (workdir / "supernode.log").read_text()[-3000:]
    assert not marker.exists()
    assert refusals.read_text().startswith("refused the coordinator's app bundle: it carries files besides "
                                           "pyproject.toml: evil.py")
    assert not list((workdir / "flwr-home").glob("apps/*/evil.py"))  # never even written to disk
