"""The site's outgoing-message guard and audit log: what leaves the hospital, checked and written down.

A Flower mod around every handler of the ClientApp. Before a reply leaves,
it checks that every metric key is one `fedcommon.protocol` allows and every
config key is ``site`` or ``version``, and refuses to send anything else (the
round then fails for this site, visibly, instead of leaking). Each reply is
also appended to the site's audit log (JSON lines: time, message type, round,
array names with shapes and dtypes, metric keys with their lengths), so a
security team can see exactly what was sent, without the values.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from fedcommon.protocol import ALLOWED_CONFIG_KEYS, is_allowed_metric_key


class DisallowedContent(RuntimeError):
    """A reply carried something the protocol does not allow to leave a site."""


def describe_reply(message: Message) -> dict[str, Any]:
    """The reply's structure, never its values: names, shapes, dtypes, lengths."""
    entry: dict[str, Any] = {"arrays": {}, "metrics": {}, "config": []}
    for record in message.content.values():
        if isinstance(record, ArrayRecord):
            entry["arrays"].update({name: {"shape": list(a.shape), "dtype": a.dtype} for name, a in record.items()})
        elif isinstance(record, MetricRecord):
            entry["metrics"].update({k: len(v) if isinstance(v, list) else 1 for k, v in record.items()})
        elif isinstance(record, ConfigRecord):
            entry["config"].extend(sorted(record.keys()))
    return entry


def disallowed(entry: dict[str, Any]) -> list[str]:
    keys = [f"metric {k}" for k in entry["metrics"] if not is_allowed_metric_key(k)]
    return keys + [f"config {k}" for k in entry["config"] if k not in ALLOWED_CONFIG_KEYS]


def audit_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(message, context)
    if reply.has_error() or not reply.has_content():
        return reply
    entry = describe_reply(reply)
    problems = disallowed(entry)
    log_path = context.node_config.get("audit-log")
    if log_path:
        record = {"time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                  "type": message.metadata.message_type, "refused": problems, **entry}
        config = message.content.get("config")
        if config is not None and "server-round" in config:
            record["round"] = int(config["server-round"])
        with open(Path(str(log_path)), "a") as log:
            log.write(json.dumps(record) + "\n")
    if problems:
        raise DisallowedContent(f"reply not sent: {', '.join(problems)} may not leave the site")
    return reply
