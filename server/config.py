"""Federation settings, and how ``--set key=value`` reaches them or the model's config.

`FederationConfig` holds what only the coordinator decides (rounds, sites,
schedules, timeouts); `cancermoe.config.CancerMoEConfig` holds the model and
local training. ``cmoe-server --set`` accepts keys of either; an unknown key
is an error naming it and the closest key of either (``--list-config`` lists
them all). Both travel to the ServerApp as JSON in the run config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Any

from cancermoe.config import (
    CancerMoEConfig,
    config_keys,
    config_listing,
    config_with,
    describe_keys,
    load_config,
    unknown_keys_problem,
)
from cancermoe.errors import InputError
from cancermoe.survival import MIN_EVENTS_FOR_CINDEX

AGGREGATIONS = ("load-aware", "fedavg", "load-aware-cls")
SERVER_OPTIMIZERS = ("sgd", "adam")
SITE_NODES = "site-nodes.json"  # in the job workdir: node id -> registered site name (cmoe-server writes it)


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 5  # federated rounds (cmoe-server --rounds)
    min_sites: int = 2  # sites that must take part in every round (cmoe-server --min-sites)
    local_epochs: int = 1  # local epochs per round at every site
    # load-aware | fedavg | load-aware-cls (load-aware, experts weighted by the CLS tokens routed to them only)
    aggregation: str = "load-aware"
    # FedProx: each site adds (mu / 2) ||w - w_global||^2 to its local loss (0 = off; sent as proximal-mu)
    proximal_mu: float = 0.0
    # server learning rate: global = previous + server_lr x (aggregate - previous); 1 = the aggregate itself
    server_lr: float = 1.0
    # server momentum (FedAvgM): velocity = server_momentum x velocity + (previous - aggregate),
    # global = previous - server_lr x velocity; 0 = off (stateless)
    server_momentum: float = 0.0
    # how the global model takes the aggregate: sgd (server_lr and server_momentum above) | adam (FedAdam: Adam on
    # the server with step length server_lr in weight units, e.g. 0.01, and adaptivity server_adam_tau)
    server_optimizer: str = "sgd"
    server_adam_tau: float = 1e-3  # FedAdam's adaptivity: damps the steps of parameters the sites hardly move
    consolidate_round: int = 2  # ACS plan computed from the head statistics of rounds 1..this, applied after it
    eval_fraction: float = 0.2  # each site keeps this share of its patients (stratified, seeded) for evaluation
    round_timeout: float = 900.0  # seconds a round waits for replies; a site slower than this is left out
    wait_for_sites: float = 300.0  # seconds to wait for min_sites to connect before failing
    risk_bins: int = 64  # risk axis of the evaluation histograms (cross-site c-index, exact up to binning)
    eval_time_step_months: float = 2.0  # time axis of the evaluation histograms and KM curves
    eval_time_horizon_months: float = 240.0
    min_eval_events: int = MIN_EVENTS_FOR_CINDEX  # a held-out c-index on fewer deaths is flagged (few_events)
    time_grid_months: float = 0.5  # width of the uncensored-time histogram that sets the federated time bins
    time_grid_max_months: float = 600.0
    max_update_norm_ratio: float = 10.0  # a reply whose update norm exceeds this x the round's median is dropped
    # Central differential privacy (Flower's server-side fixed clipping), off while dp_clipping_norm is 0:
    dp_clipping_norm: float = 0.0  # each site's update is clipped to this L2 norm
    dp_noise_multiplier: float = 0.0  # Gaussian noise of std this x dp_clipping_norm / min_sites on the aggregate

    def __post_init__(self) -> None:
        problems = []
        if self.aggregation not in AGGREGATIONS:
            problems.append(f"aggregation {self.aggregation!r} not one of {AGGREGATIONS}")
        for name in ("rounds", "min_sites", "local_epochs", "risk_bins"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if not 0.0 < self.eval_fraction < 1.0:
            problems.append(f"eval_fraction {self.eval_fraction} must be in (0, 1)")
        if not self.proximal_mu >= 0:
            problems.append(f"proximal_mu {self.proximal_mu} must be >= 0")
        if not self.server_lr > 0:
            problems.append(f"server_lr {self.server_lr} must be > 0")
        if not 0.0 <= self.server_momentum < 1.0:
            problems.append(f"server_momentum {self.server_momentum} must be in [0, 1)")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            problems.append(f"server_optimizer {self.server_optimizer!r} not one of {SERVER_OPTIMIZERS}")
        if self.server_optimizer == "adam" and self.server_momentum != 0:
            problems.append("server_momentum is sgd's: FedAdam keeps its own (beta1 0.9)")
        if not self.server_adam_tau > 0:
            problems.append(f"server_adam_tau {self.server_adam_tau} must be > 0")
        if self.dp_clipping_norm < 0 or self.dp_noise_multiplier < 0:
            problems.append("dp_clipping_norm and dp_noise_multiplier must not be negative")
        if self.dp_noise_multiplier > 0 and self.dp_clipping_norm == 0:
            problems.append("dp_noise_multiplier needs a dp_clipping_norm (the noise is scaled by it)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def differential_privacy(self) -> bool:
        return self.dp_clipping_norm > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FEDERATION_FIELDS = {f.name for f in fields(FederationConfig)}
_FEDERATION_TYPES = {f.name: {"int": int, "float": float, "str": str}[f.type] for f in fields(FederationConfig)}


def _key(name: str) -> str:
    return name.strip().replace("-", "_")


def split_overrides(pairs: list[str]) -> tuple[dict[str, str], list[str]]:
    """``key=value`` items -> (federation values, model items); malformed items and keys of neither config
    raise `InputError` (checked here, where both key sets are known, so the suggestion can come from either)."""
    federation, model, unknown = {}, [], []
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError("--set", f"{item!r} is not key=value")
        if _key(key) in _FEDERATION_FIELDS:
            federation[_key(key)] = value.strip()
        elif _key(key) in config_keys():
            model.append(item)
        else:
            unknown.append(_key(key))
    if unknown:
        raise InputError("--set", unknown_keys_problem(sorted(unknown), [*_FEDERATION_FIELDS, *config_keys()]))
    return federation, model


def federation_listing() -> list[str]:
    """What ``cmoe-server --list-config`` prints: the federation's keys, then the model's and training's."""
    return ["# federation (cmoe-server only)", *config_listing(describe_keys(FederationConfig)),
            "# model and local training (also cmoe-train)", *config_listing(describe_keys(CancerMoEConfig))]


def federation_config(values: dict[str, Any], base: FederationConfig | None = None) -> FederationConfig:
    typed = {}
    for key, raw in values.items():
        kind = _FEDERATION_TYPES[key]
        try:
            typed[key] = kind(raw)
        except ValueError:
            raise InputError("--set", f"{key}={raw!r}: expected {kind.__name__}") from None
    try:
        return dataclasses.replace(base or FederationConfig(), **typed)
    except ValueError as exc:
        raise InputError("--set", str(exc)) from None


def resolve_configs(config_file: str | None, overrides: list[str],
                    federation: dict[str, Any]) -> tuple[CancerMoEConfig, FederationConfig]:
    """Model config (defaults < TOML file < --set) and federation config (flags < --set)."""
    federation_values, model_items = split_overrides(overrides)
    model = federated_model_config(load_config(config_file, model_items))
    return model, federation_config({**federation, **federation_values})


def federated_model_config(model: CancerMoEConfig) -> CancerMoEConfig:
    """``model``, refused where a key means nothing to a federation (it trains one global model)."""
    if model.ensemble_size != 1:
        raise InputError("--set", f"ensemble_size={model.ensemble_size}: ensembles are cmoe-train's; a federation "
                                  "trains one global model (leave ensemble_size at 1)")
    if model.inner_cv_grid:
        raise InputError("--set", f"inner_cv_grid={model.inner_cv_grid!r}: inner cross-validation is cmoe-train's; "
                                  "a federation trains one global model (set the values themselves)")
    return model


def configs_to_json(model: CancerMoEConfig, federation: FederationConfig) -> str:
    return json.dumps({"model": model.to_dict(), "federation": federation.to_dict()})


def configs_from_json(text: str) -> tuple[CancerMoEConfig, FederationConfig]:
    data = json.loads(text)
    model = config_with(CancerMoEConfig(), data["model"], "run config")
    return model, FederationConfig(**data["federation"])
