"""The Flower ClientApp: decode the coordinator's message, call `client.site`, encode the reply.

Runs inside the hospital's SuperNode (`cmoe-client`). The app bundle the
coordinator ships is a thin shim that names this module, so the code that
runs here is the site's own installed, version-pinned package.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

import cancermoe
from cancermoe.acs import ConsolidationPlan
from cancermoe.config import CancerMoEConfig, config_with
from cancermoe.errors import InputError
from cancermoe.genomics import GenomicLayout, GenomicScaler
from client.audit import audit_mod
from client.identity import identity_mod
from client.refusals import record_refusal
from client.site import SiteSettings, evaluate_round, restore_or_snapshot, time_histogram, train_round, unreadable_bank
from fedcommon.federated_eval import RiskTimeGrid
from fedcommon.packing import is_packed, pack, unpack
from fedcommon.protocol import EVALUATE_FLAG, EVALUATION_RECORD, EvalReport


def _bank_failure(message: Message, settings: SiteSettings, problem: InputError) -> Message:
    """The bank broke while the site runs: one line for the site's operator (cmoe-client prints it and stops,
    as it would refuse that bank at start), and an error reply that tells the coordinator no more than that:
    the bank's path and what HDF5 says about it stay at the site."""
    server_round = int(message.content["config"].get("server-round", 0))
    record_refusal(f"{problem} (round {server_round} {message.metadata.message_type}; this site stops, "
                   "the federation goes on without it)", settings.workdir)
    reason = f"site {settings.site}: its patch bank cannot be read"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def broken_bank_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Any handler that fails because the bank broke answers with `_bank_failure`; other failures propagate."""
    try:
        return call_next(message, context)
    except Exception as error:
        settings = SiteSettings.from_node_config(context.node_config)
        if (problem := unreadable_bank(settings.bank, error)) is None:
            raise
        return _bank_failure(message, settings, problem)


def packing_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Weights that arrive as one packed array (`fedcommon.packing`, the real transport) are named arrays again
    for everything inside; the reply's go back packed the same way."""
    packed = message.has_content() and is_packed(message.content)
    if packed:
        message.content = unpack(message.content)
    reply = call_next(message, context)
    if packed and reply.has_content():
        reply.content = pack(reply.content)
    return reply


# Outermost first: weights unpacked for everything inside (and the reply's packed on the way out); every reply is
# checked and logged before it leaves; no handler runs for a site whose --site name is not the one its key is
# registered under; a broken bank is one line for the operator.
app = ClientApp(mods=[packing_mod, audit_mod, identity_mod, broken_bank_mod])


def _model_config(config: ConfigRecord) -> CancerMoEConfig:
    return config_with(CancerMoEConfig(), json.loads(str(config["cmoe-config"])), "coordinator config")


def _plan(config: ConfigRecord) -> ConsolidationPlan | None:
    text = str(config.get("plan", ""))
    return ConsolidationPlan.from_dict(json.loads(text)) if text else None


def _scaler(config: ConfigRecord) -> GenomicScaler | None:
    """The coordinator's pooled genomic standardization (`server.strategy` sends it with standardize_genomics)."""
    text = str(config.get("genomic-scaler", ""))
    return GenomicScaler.from_dict(json.loads(text)) if text else None


def _layout(config: ConfigRecord) -> GenomicLayout | None:
    """The coordinator's genomic token layout (`server.strategy` sets it in round 0 from the pooled moments)."""
    text = str(config.get("genomic-layout", ""))
    return GenomicLayout.from_dict(json.loads(text)) if text else None


def _weights(message: Message) -> dict[str, torch.Tensor]:
    return message.content["arrays"].to_torch_state_dict()


def _reply(message: Message, settings: SiteSettings, metrics: dict,
           arrays: dict[str, torch.Tensor] | None = None, evaluation: EvalReport | None = None) -> Message:
    content = RecordDict({
        "metrics": MetricRecord(metrics),
        "site": ConfigRecord({"site": settings.site, "version": cancermoe.__version__}),
    })
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    if evaluation is not None:
        content[EVALUATION_RECORD] = MetricRecord(evaluation.to_metrics())
    return Message(content, reply_to=message)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Round 0: deaths per time bin of the coordinator's grid (sets the global survival time bins) and, with
    standardize_genomics, the moments of the training patients' genomic values (sets the pooled scaler)."""
    settings = SiteSettings.from_node_config(context.node_config)
    config = message.content["config"]
    report = time_histogram(settings, np.asarray(config["time-edges"], dtype=np.float64),
                            float(config["eval-fraction"]), _model_config(config))
    return _reply(message, settings, report.to_metrics())


@app.train()
def train(message: Message, context: Context) -> Message:
    """A round: with ``evaluate`` = 1, first the evaluation of the weights the message carries (the previous
    round's global model), then local training from them; one reply carries both."""
    start = time.perf_counter()
    settings = SiteSettings.from_node_config(context.node_config)
    config = message.content["config"]
    server_round = int(config["server-round"])
    # The round starts from its DPS snapshot whatever runs first: a repeated round evaluates and trains as the
    # first time did.
    restore_or_snapshot(settings.workdir, server_round)
    evaluation = _evaluate(message, settings) if int(config.get(EVALUATE_FLAG, 0)) else None
    weights, report = train_round(
        settings, _model_config(config), edges=np.asarray(config["edges"], dtype=np.float64),
        plan=_plan(config), weights=_weights(message), local_epochs=int(config["local-epochs"]),
        eval_fraction=float(config["eval-fraction"]), server_round=server_round,
        scaler=_scaler(config), layout=_layout(config), restore=False,
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # absent from a coordinator older than FedProx
        total_rounds=int(config.get("total-rounds", 0)),  # absent from one older than the federated schedule
    )
    report.work_seconds = time.perf_counter() - start
    return _reply(message, settings, report.to_metrics(), arrays=weights, evaluation=evaluation)


def _evaluate(message: Message, settings: SiteSettings) -> EvalReport:
    """The global model the message carries on this site's held-out (and validation) patients."""
    config = message.content["config"]
    return evaluate_round(
        settings, _model_config(config), edges=np.asarray(config["edges"], dtype=np.float64),
        plan=_plan(config), weights=_weights(message), grid=RiskTimeGrid.from_config(config),
        eval_fraction=float(config["eval-fraction"]), scaler=_scaler(config), layout=_layout(config),
    )


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """The last round's model (earlier ones are evaluated inside the next round's training message)."""
    settings = SiteSettings.from_node_config(context.node_config)
    return _reply(message, settings, _evaluate(message, settings).to_metrics())
