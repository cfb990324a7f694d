"""The one configuration of CancerMoE: model, patch selection and training.

Defaults follow the paper's appendix B (2 encoder layers, d = 32, 8 heads,
4 experts in the last layer's MLP, genomic pieces of 8 values, N = 3072
selected tokens, b = 4 key tokens, p = 0.5 unseen tokens, 92% of WSI tokens
filtered by the first layer's sparsification, batch 32, learning rate 1e-3,
4 discrete survival bins). Where the paper is silent the choice is ours and
says so in its comment.

A TOML file sets any field (``tokens = 512``); ``--set key=value`` overrides
it on the command line. Keys may be written with dashes or underscores.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import json
import tokenize
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

from cancermoe.errors import InputError

DPS_MODES = ("dps", "random", "fixed-random")
SCORE_UPDATE_POLICIES = ("cindex", "epoch", "every-n")
GENOMIC_EMBEDDINGS = ("shared", "per-piece")
DPS_SCORES = ("last-cls", "first-cls")
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class CancerMoEConfig:
    # ---- model (paper appendix B)
    feature_dim: int = 1024  # WSI patch feature size (CLAM ResNet50 features)
    d_model: int = 32
    n_heads: int = 8
    n_layers: int = 2
    mlp_ratio: int = 4  # dense MLP hidden = mlp_ratio * d_model; each expert gets 1/n_experts of it (ours)
    dropout: float = 0.1  # ours: the paper does not state it
    genomic_piece: int = 8  # genomic vector cut into pieces of this many values, one token each
    max_genomic_tokens: int = 1024  # size of the genomic piece-position table (ours)
    genomic_embedding: str = "per-piece"  # one Linear per piece position (ours) | shared: one for all (ViT style)
    n_bins: int = 4  # discrete hazard bins (quartiles of uncensored training times)
    # ---- sparse mixture of experts (last layer's MLP)
    smoe: bool = True  # False = the dense MLP with the same parameters ("w/o SMoE")
    n_experts: int = 4
    top_k: int = 2  # ours: the paper does not state k
    balance_weight: float = 0.01  # weight of importance + load losses (Shazeer et al. 2017)
    # ---- attention consolidation and sparsification
    acs: bool = True  # False = vanilla attention everywhere ("w/o ACS")
    consolidation_ratio: float = 0.5  # fraction of heads kept as cluster centres (paper table 7)
    consolidate_after_epoch: int = 2  # ours: importance is gathered this many epochs before the plan
    sparsify_keep: float = 0.08  # q: first layer keeps (qN)^2 attention entries; 92% of WSI tokens filtered
    # ---- genomics
    use_genomics: bool = True  # False = "w/o genomic profiles"
    # ours: each cancer's genes get token positions of their own (`cancermoe.genomics.GenomicLayout`), since value
    # j of one study's profile is another gene than value j of another's; False = all cancers share positions
    genomics_by_cancer: bool = True
    # ---- dynamic patch selection
    tokens: int = 3072  # N: WSI tokens per patient per step
    key_tokens: int = 4  # b
    unseen_ratio: float = 0.5  # p: fraction of N drawn uniformly from patches not yet seen
    dps_mode: str = "dps"  # dps | random (every step) | fixed-random (one draw, kept: "w/o DPS")
    score_update: str = "cindex"  # cindex (adopt when training c-index dropped) | epoch | every-n
    score_update_every: int = 2  # for score_update = every-n
    dps_score: str = "last-cls"  # token score: last-cls (the paper: last block's CLS attention) | first-cls
    test_time_dps_passes: int = 0  # at prediction, scoring passes over a never-scored patient's slides (ours)
    # ---- training
    epochs: int = 20
    batch_size: int = 32
    micro_batch_size: int = 4  # ours: gradients accumulate over micro-batches, bounding memory at N = 3072
    lr: float = 1e-3
    # ours: adamw | sgd (plain SGD at lr: a federation's sites under a server optimizer, Reddi et al. 2021)
    optimizer: str = "adamw"
    weight_decay: float = 1e-5  # ours
    survival_beta: float = 0.15  # weight of the uncensored term in the NLL (PORPOISE's default)
    # ours: weight of a Cox partial-likelihood ranking term on the risk, added to the NLL (0 = off)
    cox_loss_weight: float = 0.0
    grad_clip: float = 1.0  # ours
    seed: int = 0
    # ---- the training recipe (ours, see cancermoe.recipe: the paper states batch 32 and lr 1e-3 only)
    steps: int = 0  # optimizer steps of training; > 0 sets the epochs (enough for this many steps), 0 = `epochs`
    warmup_fraction: float = 0.0  # share of the steps with a linear learning-rate warm-up
    final_lr_ratio: float = 1.0  # the learning rate decays along a cosine to lr x this (1 = constant)
    genomic_l1: float = 1e-4  # L1 penalty on the genomic token embedding's weights (per gene), added to the loss
    balanced_sampling: bool = False  # draw patients balanced over (time bin x censorship), as PORPOISE
    standardize_genomics: bool = True  # genomic values standardized per cancer with training-patient statistics
    validation_fraction: float = 0.0  # share of the training patients kept to choose the epoch (0 = last epoch)
    patience: int = 0  # stop after this many epochs without a better validation c-index (0 = never early)
    # cmoe-train only (a federation trains one global model): this many models from seeds seed, seed + 1, ...,
    # their survival curves averaged (`cancermoe.ensemble`); 1 = one model
    ensemble_size: int = 1
    # cmoe-train only, ours (`cancermoe.tuning`): candidate values tried by inner cross-validation of each training
    # set, "key=v1,v2" or "key=v1,v2;key2=w1,w2" (every combination), the one with the best pooled c-index over
    # inner_cv_folds inner folds is then trained on all training patients, as elastic-net Cox picks its
    # penalty; "" = no tuning
    inner_cv_grid: str = ""
    inner_cv_folds: int = 3

    def __post_init__(self) -> None:
        problems = []
        if self.d_model % self.n_heads:
            problems.append(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if not 1 <= self.top_k <= self.n_experts:
            problems.append(f"top_k {self.top_k} must be in 1..n_experts ({self.n_experts})")
        if (self.mlp_ratio * self.d_model) % self.n_experts:
            problems.append(f"MLP hidden {self.mlp_ratio * self.d_model} is not divisible by n_experts")
        if self.dps_mode not in DPS_MODES:
            problems.append(f"dps_mode {self.dps_mode!r} not one of {DPS_MODES}")
        if self.genomic_embedding not in GENOMIC_EMBEDDINGS:
            problems.append(f"genomic_embedding {self.genomic_embedding!r} not one of {GENOMIC_EMBEDDINGS}")
        if self.dps_score not in DPS_SCORES:
            problems.append(f"dps_score {self.dps_score!r} not one of {DPS_SCORES}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} not one of {OPTIMIZERS}")
        if self.score_update not in SCORE_UPDATE_POLICIES:
            problems.append(f"score_update {self.score_update!r} not one of {SCORE_UPDATE_POLICIES}")
        for name in ("consolidation_ratio", "sparsify_keep", "unseen_ratio", "survival_beta", "dropout",
                     "warmup_fraction", "final_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} {getattr(self, name)} must be in [0, 1]")
        for name in ("tokens", "n_bins", "epochs", "batch_size", "micro_batch_size", "genomic_piece", "n_layers",
                     "ensemble_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if not 0.0 <= self.validation_fraction < 1.0:
            problems.append(f"validation_fraction {self.validation_fraction} must be in [0, 1)")
        for name in ("steps", "patience", "genomic_l1", "test_time_dps_passes", "cox_loss_weight"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if self.inner_cv_folds < 2:
            problems.append("inner_cv_folds must be at least 2")
        try:
            for key, values in parse_grid(self.inner_cv_grid).items():
                for value in values:
                    dataclasses.replace(self, inner_cv_grid="", **{key: value})  # each candidate value is valid
        except ValueError as exc:
            problems.append(str(exc) if str(exc).startswith("inner_cv_grid") else f"inner_cv_grid: {exc}")
        if self.patience and not self.validation_fraction:
            problems.append("patience needs a validation_fraction (early stopping watches the validation c-index)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_ratio * self.d_model

    def replace(self, **changes: Any) -> CancerMoEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _key(name: str) -> str:
    return name.strip().replace("-", "_")


def _coerce(name: str, raw: Any, kind: type, where: str) -> Any:
    if isinstance(raw, str) and kind is not str:
        text = raw.strip()
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise InputError(where, f"{name}={raw!r}: expected true or false")
        try:
            return kind(text)
        except ValueError:
            raise InputError(where, f"{name}={raw!r}: expected {kind.__name__}") from None
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if not isinstance(raw, kind) or (kind is int and isinstance(raw, bool)):
        raise InputError(where, f"{name}={raw!r}: expected {kind.__name__}")
    return raw


_TYPES = {f.name: {"int": int, "float": float, "bool": bool, "str": str}[f.type] for f in fields(CancerMoEConfig)}


def config_keys() -> list[str]:
    """Every key of `CancerMoEConfig`, as TOML files and ``--set`` write them (underscores)."""
    return list(_TYPES)


def config_with(base: CancerMoEConfig, values: dict[str, Any], where: str) -> CancerMoEConfig:
    """``base`` with ``values`` applied; unknown keys or bad values raise `InputError` naming ``where``."""
    changes = {_key(k): v for k, v in values.items()}
    unknown = sorted(k for k in changes if k not in _TYPES)
    if unknown:
        raise InputError(where, unknown_keys_problem(unknown, _TYPES))
    typed = {k: _coerce(k, v, _TYPES[k], where) for k, v in changes.items()}
    try:
        return base.replace(**typed)
    except ValueError as exc:
        raise InputError(where, str(exc)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: CancerMoEConfig | None = None) -> CancerMoEConfig:
    """Defaults, then a TOML file, then ``key=value`` overrides (each step validated)."""
    config = base or CancerMoEConfig()
    if path is not None:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(path, "no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise InputError(path, f"not valid TOML ({exc})") from None
        config = config_with(config, values, str(path))
    pairs = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError("--set", f"{item!r} is not key=value")
        pairs[key] = value
    return config_with(config, pairs, "--set") if pairs else config


# Keys a grid may not vary: the grid itself, what makes the data or the ensemble, and what cannot differ between
# the inner fits and the final one.
UNTUNABLE_KEYS = ("inner_cv_grid", "inner_cv_folds", "ensemble_size", "seed", "feature_dim", "genomic_piece",
                  "max_genomic_tokens", "n_bins")


def parse_grid(text: str) -> dict[str, list[Any]]:
    """``"dropout=0.1,0.3;weight_decay=1e-5,1e-3"`` -> {"dropout": [0.1, 0.3], "weight_decay": [1e-05, 0.001]}.

    Values are typed as their key (ValueError naming the problem otherwise); "" -> {}.
    """
    grid: dict[str, list[Any]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, values = part.partition("=")
        key = _key(name)
        if not sep or not values.strip():
            raise ValueError(f"inner_cv_grid: {part!r} is not key=value,value")
        if key not in _TYPES:
            raise ValueError(f"inner_cv_grid: {unknown_keys_problem([key], _TYPES)}")
        if key in UNTUNABLE_KEYS:
            raise ValueError(f"inner_cv_grid: {key} cannot be tuned (not one of {', '.join(UNTUNABLE_KEYS)})")
        if key in grid:
            raise ValueError(f"inner_cv_grid: {key} given twice")
        try:
            grid[key] = [_coerce(key, v, _TYPES[key], "inner_cv_grid") for v in values.split(",")]
        except InputError as exc:
            raise ValueError(f"inner_cv_grid: {exc.problem}") from None
    return grid


LIST_CONFIG_FLAG = "--list-config"


def unknown_keys_problem(unknown: list[str], valid: Iterable[str]) -> str:
    """``unknown config key 'tokns' (did you mean 'tokens'?); list them all with --list-config``: a typo is
    answered with the key it was probably meant to be, anything else with where the keys are listed."""
    valid = sorted(valid)
    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        named.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    plural = "s" if len(unknown) > 1 else ""
    return f"unknown config key{plural} {', '.join(named)}; list them all with {LIST_CONFIG_FLAG}"


class ConfigKey(NamedTuple):
    name: str
    kind: str
    default: Any
    comment: str


def describe_keys(config_class: type) -> list[ConfigKey]:
    """Every field of a config dataclass with its type, default and the comment written beside it (or in the
    comment lines right above it). The comments in the class are the one documentation of the keys: they are
    read from its source rather than repeated in a second place that could drift."""
    comments = _field_comments(config_class)
    return [ConfigKey(f.name, str(f.type), f.default, comments.get(f.name, "")) for f in fields(config_class)]


def _field_comments(config_class: type) -> dict[str, str]:
    try:
        source = inspect.getsource(config_class)
    except (OSError, TypeError):  # no source shipped (a zipped install): the listing goes without comments
        return {}
    by_line = {token.start[0]: token.string.lstrip("#").strip()
               for token in tokenize.generate_tokens(io.StringIO(source).readline)
               if token.type == tokenize.COMMENT}
    lines = source.splitlines()
    comments = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        # Comment-only lines directly above belong to the field, section rulers ("# ---- model") do not.
        while line in by_line and lines[line - 1].lstrip().startswith("#") and not by_line[line].startswith("--"):
            above.insert(0, by_line[line])
            line -= 1
        comments[node.target.id] = " ".join([*above, by_line.get(node.lineno, "")]).strip()
    return comments


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def config_listing(keys: list[ConfigKey]) -> list[str]:
    """One line per key, as it would be written in a TOML file: ``tokens = 3072  # int: N: WSI tokens ...``."""
    width = max(len(f"{k.name} = {toml_value(k.default)}") for k in keys)
    return [f"{k.name} = {toml_value(k.default)}".ljust(width) + f"  # {k.kind}" + (f": {k.comment}" if k.comment
                                                                                   else "") for k in keys]
