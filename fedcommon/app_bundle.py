"""What coordinator and sites agree the app bundle is: our code-free shim, naming our installed apps.

The coordinator stamps the shim (server/flwr_app/pyproject.toml) with `installed_version` and submits it; each
site's gate (client.fab_guard) refuses any bundle whose components are not `COMPONENTS` or whose version is not
its own `installed_version`. Both ends read these names from here, so neither imports the other.
"""

from __future__ import annotations

from importlib.metadata import version as package_version

PACKAGE = "cancermoe-fl"
COMPONENTS = {"serverapp": "server.app:app", "clientapp": "client.app:app"}


def installed_version() -> str:
    """This environment's cancermoe-fl version: the bundle's version, which coordinator and sites must share."""
    return package_version(PACKAGE)
