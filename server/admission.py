"""Which replies the coordinator reads, and as whose: reply admission and site identity.

A reply is read only if the node that sent it is a registered site replying under its own name (else: a security
event, charged to the key's owner), it is not an error reply, its content parses, and, for a training reply, its
update passes `server.aggregation.validate_update` and is not a norm outlier of the round. Every reply left out
is recorded with the reason (``RoundRecord.excluded``), security events apart; so is every site that was sent a
message and did not answer within the round's timeout.

Which node is which site: the SuperLink authenticates nodes by their registered key (``registered_sites``: node
id -> site name, from cmoe-server's registration); the name a reply echoes is trusted only when it matches. An
error reply has no content, so it is named by its node's registered or last seen name. `server.strategy` keeps
the round logic and asks this module which replies it may use.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from flwr.app import Message

from cancermoe.model import N_MODALITIES
from fedcommon.protocol import TrainReport
from server.aggregation import SiteUpdate, norm_outliers, validate_update
from server.weights import state_to_numpy


class ExclusionLog(Protocol):
    """Where a round records the replies it left out (server.strategy.RoundRecord)."""

    excluded: dict[str, str]  # site -> why its reply was dropped
    security_events: list[str]  # sites among those whose reply failed a check


def exclude(log: ExclusionLog, site: str, why: str, *, security_event: bool) -> None:
    """Record that ``site``'s reply is left out (the first reason a round gives for a site is kept)."""
    log.excluded.setdefault(site, why)
    if security_event and site not in log.security_events:
        log.security_events.append(site)


class ReplyAdmission:
    """The coordinator's view of who is who, and its decisions on each reply."""

    def __init__(self, registered_sites: dict[int, str] | None = None) -> None:
        # node id -> the site name its key is registered under (empty without site authentication)
        self.registered_sites = dict(registered_sites or {})
        self.node_sites: dict[int, str] = {}  # node id -> the site name it last replied with
        self.sent: dict[str, list[Message]] = {}  # message type -> this round's messages of that type

    # ---- which node, which site

    def replying_node(self, reply: Message) -> int:
        """The node a reply answers for. It is the sender, except for the error the SuperLink itself writes
        when a node vanished (missed its heartbeats, or left): that one answers the message sent to the node."""
        for messages in self.sent.values():
            for message in messages:
                if message.metadata.message_id and message.metadata.message_id == reply.metadata.reply_to_message_id:
                    return message.metadata.dst_node_id
        return reply.metadata.src_node_id

    def site_of(self, reply: Message) -> str:
        """The site a reply comes from: the name it echoes; for an error reply (no content), the name its node
        is registered under or last replied with, else its node id."""
        node = self.replying_node(reply)
        if reply.has_content() and "site" in reply.content:
            self.node_sites[node] = site_name(reply)
            return self.node_sites[node]
        return self.node_name(node)

    def node_name(self, node: int) -> str:
        return self.registered_sites.get(node) or self.node_sites.get(node, f"node-{node}")

    def key_owner(self, reply: Message) -> str:
        """The registered site behind a reply (by its authenticated node), whatever name the reply claims."""
        node = self.replying_node(reply)
        return self.registered_sites.get(node, f"node-{node}")

    def identity_problem(self, reply: Message) -> str | None:
        """Why a reply's echoed site name cannot be trusted, or None (always None without site authentication)."""
        if not self.registered_sites:
            return None
        node = self.replying_node(reply)  # not the sender: the SuperLink writes the error for a vanished node
        registered = self.registered_sites.get(node)
        claimed = site_name(reply)
        if registered is None:
            return f"node {node} is not a registered site"
        if claimed != registered and reply.has_content():
            return f"replied as site {claimed!r} with the key registered for site {registered!r}"
        return None

    # ---- which replies are read

    def admit(self, log: ExclusionLog, reply: Message, error_label: str) -> str | None:
        """The site a reply comes from, if its content may be read; None once the reason it may not (a name
        other than its key's: a security event; an error reply) is recorded in ``log``."""
        site = self.site_of(reply)
        if (problem := self.identity_problem(reply)) is not None:
            exclude(log, self.key_owner(reply), problem, security_event=True)
            return None
        if reply.has_error():
            exclude(log, site, f"{error_label}: {reply.error.reason}", security_event=False)
            return None
        return site

    def note_silent_sites(self, log: ExclusionLog, kind: str, replies: list[Message], round_timeout: float) -> None:
        """Sites that were sent ``kind`` and did not answer within ``round_timeout`` are left out of the round.
        (A site whose SuperNode vanished gets an error reply from the SuperLink instead, once it misses its
        heartbeats.)"""
        answered = {self.replying_node(reply) for reply in replies}
        for node in (message.metadata.dst_node_id for message in self.sent.get(kind, [])):
            if node not in answered:
                exclude(log, self.node_name(node), f"no {kind} reply within round_timeout ({round_timeout:.0f} s)",
                        security_event=False)

    def admit_updates(self, log: ExclusionLog, replies: list[Message], reference: dict[str, np.ndarray], *,
                      n_experts: int, n_layers: int, n_heads: int,
                      max_update_norm_ratio: float) -> tuple[list[SiteUpdate], list[TrainReport]]:
        """The training replies the round may aggregate, with their reports: admitted, well formed, valid
        against the global model ``reference``, and not norm outliers. Every other one is recorded in ``log``."""
        candidates = []
        for reply in replies:
            if (site := self.admit(log, reply, "error reply")) is None:
                continue
            try:
                report = TrainReport.from_metrics(dict(reply.content["metrics"]))
                weights = state_to_numpy(reply.content["arrays"])
            except (KeyError, ValueError, TypeError) as exc:
                exclude(log, site, f"malformed reply: {exc}", security_event=True)
                continue
            update = SiteUpdate(site, weights, report.patients, report.expert_tokens, list(report.head_importance),
                                report.genomic_tokens)
            problems = validate_update(update, reference, n_modalities=N_MODALITIES, n_experts=n_experts,
                                       n_layers=n_layers, n_heads=n_heads)
            if problems:
                exclude(log, site, "; ".join(problems), security_event=True)
                continue
            candidates.append((update, report))
        outliers = set(norm_outliers([u for u, _ in candidates], reference, max_update_norm_ratio))
        for site in outliers:
            exclude(log, site, "update norm far above the round's median", security_event=True)
        # In site order, not arrival order: the weighted sums (floats) then do not depend on who answered first.
        kept = sorted(((u, r) for u, r in candidates if u.site not in outliers), key=lambda pair: pair[0].site)
        return [u for u, _ in kept], [r for _, r in kept]


def site_name(reply: Message) -> str:
    """The site name a reply echoes; error replies carry no content, so they are named by node id."""
    if reply.has_content() and "site" in reply.content:
        return str(reply.content["site"].get("site", f"node-{reply.metadata.src_node_id}"))
    return f"node-{reply.metadata.src_node_id}"
