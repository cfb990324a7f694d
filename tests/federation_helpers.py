"""Test support for the federation: small synthetic sites and an in-process Grid.

`InProcessGrid` stands in for Flower's Grid: it hands every message to the
real ClientApp of the destination "node" in this process, so the real
strategy, the real Job (MLflow, checkpoints) and the real handlers run
without a SuperLink. The end-to-end tests use real SuperLink and SuperNode
processes instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from cancermoe.synthetic import SynthSpec, synthesize_bank
from client.app import app as client_app

SMALL_MODEL = ["feature_dim=16", "tokens=32", "batch_size=8", "sparsify_keep=0.25"]


def synth_site(path: Path, seed: int, patients: int = 60, cancers: tuple[str, ...] = ("BRCA", "LUAD")) -> Path:
    spec = SynthSpec(site=path.stem, patients=patients, cancers=cancers, patches=100, seed=seed, feature_dim=16,
                     genomic_features=8, signal_fraction=0.2)
    return synthesize_bank(path, spec)


def set_task_identity() -> None:
    """Flower stamps messages with the running task's identity; in-process tests set one."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0


def site_context(node_id: int, site: str, bank: Path, workdir: Path) -> Context:
    workdir.mkdir(parents=True, exist_ok=True)
    return Context(run_id=1, node_id=node_id,
                   node_config={"site": site, "bank": str(bank), "workdir": str(workdir), "device": "cpu",
                                "audit-log": str(workdir / "audit.jsonl")},
                   state=RecordDict(), run_config={})


class InProcessGrid:
    """Nodes 1..n, each the real ClientApp with its own site context. ``down`` nodes never reply."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts
        self.down: set[int] = set()
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            if node in self.down:
                continue  # as if the site dropped: no reply before the timeout
            try:
                reply = client_app(message=message, context=self.contexts[node])
            except Exception as error:  # as Flower's runtime does: the coordinator gets an error reply
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(error)}:<'{error}'>"),
                                reply_to=message)
            self.received.append(reply)
            replies.append(reply)
        return replies


def grid_of_sites(sites: dict[str, Path], workdir: Path) -> InProcessGrid:
    """An `InProcessGrid` with one node per site (node ids 1, 2, ... in ``sites`` order), workdirs under ``workdir``."""
    set_task_identity()
    return InProcessGrid({i + 1: site_context(i + 1, name, bank, workdir / f"site-{name}")
                          for i, (name, bank) in enumerate(sites.items())})


def make_message(config: dict, kind: str, arrays=None, node: int = 1) -> Message:
    from flwr.app import ConfigRecord

    content = RecordDict({"config": ConfigRecord(config)})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, message_type=kind, dst_node_id=node)
