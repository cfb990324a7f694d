"""The site's check that it is who its key says it is.

With site authentication the coordinator knows each connected node by the key it registered under a site name
(``cmoe-certs site DIR A`` -> ``A.pub``), and every message it sends names that site (``registered-site``).
A SuperNode started as ``--site A`` with site B's key would otherwise train on A's bank and reply as A under
B's identity. This mod compares the two before any handler runs: on a mismatch nothing is computed, the
reason goes to the site's refusal log (cmoe-client prints it and stops), and the reply is an error. The
coordinator checks the same thing on its side (server.admission.ReplyAdmission.identity_problem).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from client.refusals import record_refusal


class SiteNameMismatch(RuntimeError):
    """This site's --site name is not the name its key is registered under at the coordinator."""


def identity_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    config = message.content.get("config") if message.has_content() else None
    registered = str(config.get("registered-site", "")) if config is not None else ""
    site = str(context.node_config.get("site", ""))
    if registered and registered != site:
        reason = (f"--site {site} does not match --key: the coordinator has this key registered as site "
                  f"{registered} (use that site's key, or --site={registered})")
        workdir = context.node_config.get("workdir")
        record_refusal(reason, Path(str(workdir)) if workdir else None)
        raise SiteNameMismatch(reason)
    return call_next(message, context)
