"""The site's gate for app bundles: only our code-free shim, of the installed version, may run here.

Flower ships the coordinator's app bundle (FAB) to every site and puts it first on ``sys.path`` before loading
the ClientApp: a bundle with Python files in it would run them inside the hospital. Flower's own remedy,
FAB signatures (``--trusted-entities``), needs a SuperLink that issues licence verifications, which
open-source Flower does not. So the site checks the bundle itself, before Flower installs or loads it:

- it holds nothing but ``pyproject.toml`` (plus Flower's ``.info/`` manifest): no code, no data files;
- its components are exactly ``server.app:app`` / ``client.app:app``, resolved from the site's installed
  ``cancermoe-fl`` package, and it asks for no dependencies (Flower would install them);
- its ``version`` and ``cmoe-version`` equal the installed package's version (coordinator and sites upgrade
  together; a mismatch would mean a protocol mismatch).

How it is wired: the site's executor (`client.executor`), the one process that installs and loads bundles at a
site, calls Flower's installer only through `guarded`, the first time it sees a bundle's hash. A refused bundle
never reaches the disk; that message's reply is an error with the reason, which the coordinator sees as that
site's error, and the reason is written to the site's refusal log (cmoe-client prints it and stops).
"""

from __future__ import annotations

import io
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client.refusals import record_refusal
from fedcommon.app_bundle import COMPONENTS

ALLOWED_MEMBERS = {"pyproject.toml"}


class UntrustedAppBundle(Exception):
    """The coordinator sent an app bundle that is not our shim of the installed version."""


def check_app_bundle(fab: bytes, expected_version: str) -> None:
    """Raise `UntrustedAppBundle` naming the first problem unless ``fab`` (a FAB's zip bytes) is our shim."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile as error:
        raise UntrustedAppBundle(f"not a zip archive ({error})") from None
    with archive:
        members = {name for name in archive.namelist() if not name.startswith(".info/")}
        extra = sorted(members - ALLOWED_MEMBERS)
        if extra:
            raise UntrustedAppBundle(f"carries files besides pyproject.toml: {', '.join(extra[:5])}")
        if "pyproject.toml" not in members:
            raise UntrustedAppBundle("has no pyproject.toml")
        try:
            project = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            raise UntrustedAppBundle(f"pyproject.toml is not valid TOML ({error})") from None
    _check_project(project, expected_version)


def _check_project(project: dict[str, Any], expected_version: str) -> None:
    flwr_app = project.get("tool", {}).get("flwr", {}).get("app", {})
    components = flwr_app.get("components", {})
    if components != COMPONENTS:
        raise UntrustedAppBundle(f"components {components} are not cancermoe-fl's {COMPONENTS}")
    dependencies = project.get("project", {}).get("dependencies", [])
    if dependencies:
        raise UntrustedAppBundle(f"asks to install dependencies {dependencies}")
    versions = {"version": project.get("project", {}).get("version"),
                "cmoe-version": flwr_app.get("config", {}).get("cmoe-version")}
    for key, found in versions.items():
        if found != expected_version:
            raise UntrustedAppBundle(f"{key} {found!r} does not match this site's cancermoe-fl {expected_version} "
                                     "(coordinator and sites must run the same version)")


def guarded(install: Callable[..., Any], expected_version: str) -> Callable[..., Any]:
    """Flower's FAB installer, refusing anything `check_app_bundle` refuses before it touches the disk."""
    def install_checked(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        try:
            check_app_bundle(content, expected_version)
        except UntrustedAppBundle as refusal:
            record_refusal(f"refused the coordinator's app bundle: it {refusal}")
            raise
        return install(fab_file, *args, **kwargs)

    return install_checked
