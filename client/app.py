"""The Flower ClientApp: decode the coordinator's message, call `client.site`, encode the reply.

Runs inside the hospital's SuperNode (`cmoe-client`). The app bundle the
coordinator ships is a thin shim that names this module, so the code that
runs here is the site's own installed, version-pinned package.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import cancermoe
from cancermoe.acs import ConsolidationPlan
from cancermoe.config import CancerMoEConfig, config_with
from client.audit import audit_mod
from client.site import SiteSettings, evaluate_round, time_histogram, train_round
from server.federated_eval import RiskTimeGrid

app = ClientApp(mods=[audit_mod])  # every reply is checked and logged before it leaves


def _model_config(config: ConfigRecord) -> CancerMoEConfig:
    return config_with(CancerMoEConfig(), json.loads(str(config["cmoe-config"])), "coordinator config")


def _plan(config: ConfigRecord) -> ConsolidationPlan | None:
    text = str(config.get("plan", ""))
    return ConsolidationPlan.from_dict(json.loads(text)) if text else None


def _weights(message: Message) -> dict[str, torch.Tensor]:
    return message.content["arrays"].to_torch_state_dict()


def _reply(message: Message, settings: SiteSettings, metrics: dict,
           arrays: dict[str, torch.Tensor] | None = None) -> Message:
    content = RecordDict({
        "metrics": MetricRecord(metrics),
        "site": ConfigRecord({"site": settings.site, "version": cancermoe.__version__}),
    })
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content, reply_to=message)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Round 0: deaths per time bin of the coordinator's grid (sets the global survival time bins)."""
    settings = SiteSettings.from_node_config(context.node_config)
    config = message.content["config"]
    report = time_histogram(settings, np.asarray(config["time-edges"], dtype=np.float64),
                            float(config["eval-fraction"]), int(config["seed"]))
    return _reply(message, settings, report.to_metrics())


@app.train()
def train(message: Message, context: Context) -> Message:
    settings = SiteSettings.from_node_config(context.node_config)
    config = message.content["config"]
    weights, report = train_round(
        settings, _model_config(config), edges=np.asarray(config["edges"], dtype=np.float64), plan=_plan(config),
        weights=_weights(message), local_epochs=int(config["local-epochs"]),
        eval_fraction=float(config["eval-fraction"]), server_round=int(config["server-round"]),
    )
    return _reply(message, settings, report.to_metrics(), arrays=weights)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    settings = SiteSettings.from_node_config(context.node_config)
    config = message.content["config"]
    grid = RiskTimeGrid.from_config(config)
    report = evaluate_round(
        settings, _model_config(config), edges=np.asarray(config["edges"], dtype=np.float64), plan=_plan(config),
        weights=_weights(message), grid=grid, risk_threshold=float(config["risk-threshold"]),
        eval_fraction=float(config["eval-fraction"]),
    )
    return _reply(message, settings, report.to_metrics())
