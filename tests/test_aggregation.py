"""Tests for server.aggregation: FedAvg, load-aware aggregation (experts by tokens, heads by importance), checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cancermoe.acs import HeadStats, compute_consolidation_plan
from cancermoe.config import CancerMoEConfig
from cancermoe.model import N_MODALITIES, CancerMoE
from server.aggregation import (
    BY_PATIENTS,
    EXPERT,
    GENOMIC_ROWS,
    HEAD_COLUMNS,
    HEAD_ROWS,
    ParameterRole,
    ServerAdam,
    ServerMomentum,
    SiteUpdate,
    aggregate_fedavg,
    aggregate_head_stats,
    aggregate_load_aware,
    norm_outliers,
    parameter_groups,
    server_step,
    update_norm,
    validate_update,
)

# A tiny model's parameter names and shapes: 2 layers, H = 2 heads of d_h = 2 (d = 4), E = 3 experts in block 1.
N_LAYERS, N_HEADS, HEAD_DIM, N_EXPERTS, D = 2, 2, 2, 3, 4
SHAPES: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, D), "head.weight": (4, D), "head.bias": (4,)}
for _layer in range(N_LAYERS):
    for _proj in ("query", "key", "value"):
        SHAPES[f"blocks.{_layer}.attn.{_proj}.weight"] = (N_HEADS * HEAD_DIM, D)
        SHAPES[f"blocks.{_layer}.attn.{_proj}.bias"] = (N_HEADS * HEAD_DIM,)
    SHAPES[f"blocks.{_layer}.attn.proj.weight"] = (D, N_HEADS * HEAD_DIM)
    SHAPES[f"blocks.{_layer}.attn.proj.bias"] = (D,)
SHAPES["blocks.0.mlp.fc_in.weight"] = (8, D)
for _expert in range(N_EXPERTS):
    SHAPES[f"blocks.1.mlp.experts.{_expert}.fc_in.weight"] = (2, D)
    SHAPES[f"blocks.1.mlp.experts.{_expert}.fc_in.bias"] = (2,)
    SHAPES[f"blocks.1.mlp.experts.{_expert}.fc_out.weight"] = (D, 2)
SHAPES["blocks.1.mlp.output_bias"] = (D,)
SHAPES["blocks.1.mlp.router.weight"] = (N_EXPERTS, D + N_MODALITIES)
N_POSITIONS = 4  # genomic piece positions (pieces of 2 values)
SHAPES["genomic_embed.weight"] = (N_POSITIONS, 2, D)
SHAPES["genomic_embed.position.weight"] = (N_POSITIONS, D)


def random_state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def update(site: str, seed: int, n_patients: int, expert_tokens: list[float] | None = None,
           importance: list[list[float]] | None = None,
           modality_split: tuple[float, float, float] = (0.0, 0.25, 0.75),
           genomic_tokens: list[float] | None = None) -> SiteUpdate:
    """A site update; expert_tokens per expert (spread over the modalities by modality_split),
    importance [layer][head], genomic_tokens per piece position (None: not reported)."""
    per_expert = np.array(expert_tokens if expert_tokens is not None else [1.0] * N_EXPERTS)
    tokens = np.outer(modality_split, per_expert)  # summed over modalities it is per_expert
    heads = [np.array(h, dtype=np.float64) for h in importance] if importance is not None else []
    genomic = np.array(genomic_tokens if genomic_tokens is not None else [], dtype=np.float64)
    return SiteUpdate(site, random_state(seed), n_patients, tokens, heads, genomic)


def load_aware(updates: list[SiteUpdate], previous: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return aggregate_load_aware(updates, previous, n_layers=N_LAYERS, n_heads=N_HEADS, head_dim=HEAD_DIM,
                                n_experts=N_EXPERTS)


def head_slice(name: str, head: int) -> tuple[slice, ...]:
    """Where head ``head`` lives in an attention parameter: rows of q/k/v, columns of proj.weight."""
    block = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    return (slice(None), block) if name.endswith("proj.weight") else (block,)


# ---------------------------------------------------------------------------------------------------------------------
# FedAvg


def test_fedavg_weights_every_parameter_by_patients():
    a, b = update("A", 1, n_patients=1), update("B", 2, n_patients=3)
    merged = aggregate_fedavg([a, b])
    assert set(merged) == set(SHAPES)
    for name in SHAPES:
        expected = 0.25 * a.weights[name].astype(np.float64) + 0.75 * b.weights[name].astype(np.float64)
        np.testing.assert_allclose(merged[name], expected, rtol=1e-6)
        assert merged[name].dtype == np.float32


def test_fedavg_of_one_site_is_that_site():
    a = update("A", 1, n_patients=7)
    merged = aggregate_fedavg([a])
    for name in SHAPES:
        np.testing.assert_array_equal(merged[name], a.weights[name])


# ---------------------------------------------------------------------------------------------------------------------
# Load-aware: experts


def expert_round() -> tuple[SiteUpdate, SiteUpdate, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Expert 0: A 10 tokens, B 30; expert 1: A only; expert 2: nobody. Patients 3 vs 1 (the opposite of tokens).
    A's tokens are all WSI, B's mostly genomic: only the sum over modalities gives 10 vs 30."""
    a = update("A", 1, n_patients=3, expert_tokens=[10.0, 4.0, 0.0], modality_split=(0.0, 1.0, 0.0))
    b = update("B", 2, n_patients=1, expert_tokens=[30.0, 0.0, 0.0], modality_split=(0.1, 0.2, 0.7))
    previous = random_state(0)
    return a, b, previous, load_aware([a, b], previous)


def expert_names(expert: int) -> list[str]:
    return [name for name in SHAPES if name.startswith(f"blocks.1.mlp.experts.{expert}.")]


def test_expert_weights_are_proportional_to_routed_tokens():
    a, b, _, merged = expert_round()
    for name in expert_names(0):  # tokens 10 vs 30 -> 0.25 / 0.75 (patients would give 0.75 / 0.25)
        expected = 0.25 * a.weights[name].astype(np.float64) + 0.75 * b.weights[name].astype(np.float64)
        np.testing.assert_allclose(merged[name], expected, rtol=1e-6)


def test_expert_routed_by_one_site_only_takes_that_sites_weights():
    a, _, _, merged = expert_round()
    for name in expert_names(1):
        np.testing.assert_array_equal(merged[name], a.weights[name])


def test_expert_nobody_used_keeps_the_previous_global_weights():
    _, _, previous, merged = expert_round()
    for name in expert_names(2):
        np.testing.assert_array_equal(merged[name], previous[name])
        assert merged[name] is not previous[name]  # a copy: later in-place edits must not touch the old model


def test_load_aware_cls_weights_experts_by_the_cls_tokens_alone():
    """Expert 0: all tokens A 10 / B 30, CLS tokens A 3 / B 1 (B's are mostly genomic): CLS gives 0.75 / 0.25."""
    a = update("A", 1, n_patients=3, expert_tokens=[10.0, 4.0, 0.0], modality_split=(0.3, 0.7, 0.0))
    b = update("B", 2, n_patients=1, expert_tokens=[30.0, 0.0, 0.0], modality_split=(1 / 30, 0.0, 29 / 30))
    previous = random_state(0)
    merged = aggregate_load_aware([a, b], previous, n_layers=N_LAYERS, n_heads=N_HEADS, head_dim=HEAD_DIM,
                                  n_experts=N_EXPERTS, expert_modalities=(0,))
    for name in expert_names(0):
        expected = 0.75 * a.weights[name].astype(np.float64) + 0.25 * b.weights[name].astype(np.float64)
        np.testing.assert_allclose(merged[name], expected, rtol=1e-6)
    for name in expert_names(2):  # no CLS token anywhere: the previous weights, as for an unused expert
        np.testing.assert_array_equal(merged[name], previous[name])


def test_only_the_cls_tokens_train_the_experts_of_the_last_block():
    """Why load-aware-cls counts CLS tokens: the survival head reads the CLS token alone, so an expert the CLS
    tokens were not routed to gets no gradient from the survival loss, however many other tokens it took."""
    config = CancerMoEConfig(feature_dim=D, tokens=16, dropout=0.0, max_genomic_tokens=16, n_experts=4, top_k=1)
    torch.manual_seed(0)
    model = CancerMoE(config)
    with torch.no_grad():  # a router that sends CLS tokens (modality 0) to expert 0 and every other token elsewhere
        router = model.blocks[-1].mlp.router.weight
        router.zero_()
        d = config.d_model  # the router reads the token, then its modality one-hot
        router[0, d + 0] = 10.0
        router[1:, d + 1:] = 10.0
    model.train()
    model.reset_routing_counts()
    out = model(torch.randn(3, 16, D), torch.ones(3, 16, dtype=torch.bool), torch.randn(3, 2, 8),
                torch.ones(3, 2, dtype=torch.bool))
    out.hazard_logits.sum().backward()
    counts = model.routing_counts().detach().numpy()
    assert counts[0, 0] == 3 and counts[0, 1:].sum() == 0 and counts[1:, 1:].sum() > 0
    for expert, module in enumerate(model.blocks[-1].mlp.experts):
        grads = [p.grad for p in module.parameters()]
        trained = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
        assert trained == (expert == 0), expert


# ---------------------------------------------------------------------------------------------------------------------
# Load-aware: attention heads and the rest


ATTENTION_HEAD_PARAMS = ["query.weight", "query.bias", "key.weight", "key.bias", "value.weight", "value.bias",
                         "proj.weight"]


def head_round() -> tuple[SiteUpdate, SiteUpdate, dict[str, np.ndarray]]:
    """Layer 0: head 0 important only at B, head 1 at nobody. Layer 1: head 0 A 1 / B 3, head 1 A 3 / B 1.
    Patients: A 3, B 1."""
    a = update("A", 1, n_patients=3, importance=[[0.0, 0.0], [1.0, 3.0]])
    b = update("B", 2, n_patients=1, importance=[[2.0, 0.0], [3.0, 1.0]])
    return a, b, load_aware([a, b], random_state(0))


@pytest.mark.parametrize("param", ATTENTION_HEAD_PARAMS)
def test_each_head_is_averaged_by_its_own_importance(param):
    a, b, merged = head_round()
    name = f"blocks.1.attn.{param}"
    for head, (share_a, share_b) in enumerate([(0.25, 0.75), (0.75, 0.25)]):
        where = head_slice(name, head)
        expected = share_a * a.weights[name][where].astype(np.float64) + share_b * b.weights[name][where]
        np.testing.assert_allclose(merged[name][where], expected, rtol=1e-6)


@pytest.mark.parametrize("param", ATTENTION_HEAD_PARAMS)
def test_head_important_at_one_site_only_takes_that_sites_slice(param):
    _, b, merged = head_round()
    name = f"blocks.0.attn.{param}"
    np.testing.assert_array_equal(merged[name][head_slice(name, 0)], b.weights[name][head_slice(name, 0)])


@pytest.mark.parametrize("param", ATTENTION_HEAD_PARAMS)
def test_head_without_importance_anywhere_falls_back_to_patients(param):
    a, b, merged = head_round()
    name = f"blocks.0.attn.{param}"
    where = head_slice(name, 1)
    expected = 0.75 * a.weights[name][where].astype(np.float64) + 0.25 * b.weights[name][where]
    np.testing.assert_allclose(merged[name][where], expected, rtol=1e-6)


def test_a_site_without_importance_counts_as_zero_importance():
    a = update("A", 1, n_patients=3)  # no head importance sent (e.g. after consolidation)
    b = update("B", 2, n_patients=1, importance=[[2.0, 0.0], [0.0, 5.0]])
    merged = load_aware([a, b], random_state(0))
    name = "blocks.1.attn.value.weight"
    np.testing.assert_array_equal(merged[name][head_slice(name, 1)], b.weights[name][head_slice(name, 1)])
    expected = 0.75 * a.weights[name][head_slice(name, 0)].astype(np.float64) + 0.25 * b.weights[name][:2]
    np.testing.assert_allclose(merged[name][head_slice(name, 0)], expected, rtol=1e-6)


def test_everything_else_is_weighted_by_patients_and_stays_float32():
    a, b, merged = head_round()
    by_patients = [n for n in SHAPES if "attn.proj.bias" in n or not any(k in n for k in ("attn.", "experts."))]
    assert {"cls_token", "blocks.1.mlp.router.weight", "blocks.1.mlp.output_bias", "blocks.0.attn.proj.bias",
            "head.weight", "blocks.0.mlp.fc_in.weight"} <= set(by_patients)
    for name in by_patients:
        expected = 0.75 * a.weights[name].astype(np.float64) + 0.25 * b.weights[name]
        np.testing.assert_allclose(merged[name], expected, rtol=1e-6)
    assert set(merged) == set(SHAPES)
    assert all(value.dtype == np.float32 and value.shape == SHAPES[name] for name, value in merged.items())


# ---------------------------------------------------------------------------------------------------------------------
# Genomic rows by genomic tokens


def test_each_genomic_row_is_averaged_by_the_tokens_sites_embedded_there():
    """Site A (1 patient) fed positions 0-1, site B (3 patients) positions 1-2, nobody position 3."""
    a = update("A", 1, 1, genomic_tokens=[10.0, 10.0, 0.0, 0.0])
    b = update("B", 2, 3, genomic_tokens=[0.0, 30.0, 30.0, 0.0])
    previous = random_state(0)
    merged = load_aware([a, b], previous)
    for name in ("genomic_embed.weight", "genomic_embed.position.weight"):
        np.testing.assert_allclose(merged[name][0], a.weights[name][0], rtol=1e-6)  # only A trained row 0
        np.testing.assert_allclose(merged[name][2], b.weights[name][2], rtol=1e-6)
        np.testing.assert_allclose(merged[name][1], 0.25 * a.weights[name][1].astype(np.float64)
                                   + 0.75 * b.weights[name][1], rtol=1e-6)
        np.testing.assert_array_equal(merged[name][3], previous[name][3])  # nobody fed it: unchanged
        assert merged[name].dtype == np.float32
    fedavg = aggregate_fedavg([a, b])  # FedAvg would have diluted A's row 0 with B's copy, 1 : 3
    assert not np.allclose(fedavg["genomic_embed.weight"][0], a.weights["genomic_embed.weight"][0])


def test_genomic_rows_go_by_patients_when_a_site_reports_no_genomic_tokens():
    a = update("A", 1, 1, genomic_tokens=[10.0, 0.0, 0.0, 0.0])
    b = update("B", 2, 3)  # an older site: no counts
    merged = load_aware([a, b], random_state(0))
    name = "genomic_embed.weight"
    np.testing.assert_allclose(merged[name], 0.25 * a.weights[name].astype(np.float64) + 0.75 * b.weights[name],
                               rtol=1e-6)


@pytest.mark.bad_input
def test_load_aware_refuses_updates_that_do_not_fit():
    a, b = update("A", 1, 1), update("B", 2, 1)
    del b.weights["head.bias"]
    with pytest.raises(ValueError, match="site B"):
        load_aware([a, b], random_state(0))
    with pytest.raises(ValueError, match="no site updates"):
        load_aware([], random_state(0))
    c = update("C", 3, 1, importance=[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])  # 3 heads reported, model has 2
    with pytest.raises(ValueError, match="head_importance"):
        load_aware([a, c], random_state(0))


# ---------------------------------------------------------------------------------------------------------------------
# The real model's parameter names


def small_config(**changes) -> CancerMoEConfig:
    return CancerMoEConfig(feature_dim=16, max_genomic_tokens=8, **changes)


def test_parameter_groups_classify_every_parameter_of_the_real_model():
    config = small_config()
    names = list(CancerMoE(config).state_dict())
    roles = parameter_groups(names, config.n_layers, config.n_experts)
    assert list(roles) == names
    last = config.n_layers - 1
    for expert in range(config.n_experts):
        assert sorted(n for n, r in roles.items() if r == ParameterRole(EXPERT, expert)) == [
            f"blocks.{last}.mlp.experts.{expert}.{p}" for p in ("fc_in.bias", "fc_in.weight", "fc_out.weight")]
    for layer in range(config.n_layers):
        assert sorted(n for n, r in roles.items() if r == ParameterRole(HEAD_ROWS, layer)) == sorted(
            f"blocks.{layer}.attn.{p}.{k}" for p in ("query", "key", "value") for k in ("weight", "bias"))
        assert [n for n, r in roles.items() if r == ParameterRole(HEAD_COLUMNS, layer)] == [
            f"blocks.{layer}.attn.proj.weight"]
        assert roles[f"blocks.{layer}.attn.proj.bias"] == ParameterRole(BY_PATIENTS)
    for name in ("cls_token", f"blocks.{last}.mlp.router.weight", f"blocks.{last}.mlp.noise_router.bias",
                 f"blocks.{last}.mlp.output_bias", "head.weight", "blocks.0.mlp.fc_in.weight", "wsi_embed.weight"):
        assert roles[name] == ParameterRole(BY_PATIENTS)
    assert [n for n, r in roles.items() if r.kind == GENOMIC_ROWS] == ["genomic_embed.weight",
                                                                       "genomic_embed.position.weight"]
    shared = parameter_groups(CancerMoE(small_config(genomic_embedding="shared")).state_dict(), config.n_layers,
                              config.n_experts)
    assert [n for n, r in shared.items() if r.kind == GENOMIC_ROWS] == ["genomic_embed.position.weight"]
    assert shared["genomic_embed.linear.weight"] == ParameterRole(BY_PATIENTS)


def test_dense_ablation_has_no_experts_but_still_has_heads():
    config = small_config(smoe=False)
    roles = parameter_groups(CancerMoE(config).state_dict(), config.n_layers, config.n_experts)
    assert not any(r.kind == EXPERT for r in roles.values())
    assert roles[f"blocks.{config.n_layers - 1}.mlp.fc_in.weight"] == ParameterRole(BY_PATIENTS)
    assert sum(r.kind == HEAD_ROWS for r in roles.values()) == 6 * config.n_layers


def test_dense_ablation_aggregates_load_aware_with_one_pseudo_expert():
    """A dense last MLP reports routing counts [n_modalities, 1]: pass n_experts = 1; heads still go by importance."""
    config = small_config(smoe=False)
    a, b = model_state(config, 0), model_state(config, 1)
    importance = [np.array([1.0] + [0.0] * (config.n_heads - 1)) for _ in range(config.n_layers)]
    sites = [SiteUpdate("A", a, 1, np.ones((N_MODALITIES, 1)), importance),
             SiteUpdate("B", b, 1, np.ones((N_MODALITIES, 1)), [np.zeros(config.n_heads)] * config.n_layers)]
    assert validate_update(sites[1], a, n_modalities=N_MODALITIES, n_experts=1, n_layers=config.n_layers,
                           n_heads=config.n_heads) == []
    head_dim = config.d_model // config.n_heads
    merged = aggregate_load_aware(sites, a, n_layers=config.n_layers, n_heads=config.n_heads, head_dim=head_dim,
                                  n_experts=1)
    query = "blocks.0.attn.query.weight"
    np.testing.assert_array_equal(merged[query][:head_dim], a[query][:head_dim])  # head 0: only A reports it
    np.testing.assert_allclose(merged["head.weight"], (a["head.weight"].astype(np.float64) + b["head.weight"]) / 2,
                               rtol=1e-6)


def test_parameter_groups_refuse_names_that_do_not_fit_the_model():
    with pytest.raises(ValueError, match="experts 0..3"):
        parameter_groups(["blocks.1.mlp.experts.4.fc_in.weight"], n_layers=2, n_experts=4)
    with pytest.raises(ValueError, match="block 1 only"):
        parameter_groups(["blocks.0.mlp.experts.0.fc_in.weight"], n_layers=2, n_experts=4)
    with pytest.raises(ValueError, match="2 blocks"):
        parameter_groups(["blocks.2.attn.query.weight"], n_layers=2, n_experts=4)


def model_state(config: CancerMoEConfig, seed: int, plan=None) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return {k: v.numpy().copy() for k, v in CancerMoE(config, plan).state_dict().items()}


def test_real_model_round_trip_and_consolidated_shapes():
    """Identical sites give back their model; after consolidation (H = clusters) the shapes still line up."""
    config = small_config()
    rng = np.random.default_rng(0)
    stats = HeadStats([rng.random(config.n_heads) for _ in range(config.n_layers)],
                      [rng.random((config.n_heads, config.n_heads)) for _ in range(config.n_layers)], 10)
    plan = compute_consolidation_plan(stats, ratio=0.5)
    n_clusters = plan.layers[0].n_clusters
    head_dim = config.d_model // config.n_heads
    for model_plan, n_heads in ((None, config.n_heads), (plan, n_clusters)):
        state = model_state(config, 0, model_plan)
        importance = [rng.random(n_heads) for _ in range(config.n_layers)]
        sites = [SiteUpdate(s, {k: v.copy() for k, v in state.items()}, n, rng.random((N_MODALITIES, 4)), importance)
                 for s, n in (("A", 2), ("B", 5))]
        assert validate_update(sites[0], state, n_modalities=N_MODALITIES, n_experts=config.n_experts,
                               n_layers=config.n_layers, n_heads=n_heads) == []
        merged = aggregate_load_aware(sites, model_state(config, 1, model_plan), n_layers=config.n_layers,
                                      n_heads=n_heads, head_dim=head_dim, n_experts=config.n_experts)
        for name, value in state.items():
            np.testing.assert_allclose(merged[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
            assert merged[name].dtype == np.float32
    assert n_clusters < config.n_heads


# ---------------------------------------------------------------------------------------------------------------------
# Checking replies


def check(u: SiteUpdate, reference: dict[str, np.ndarray]) -> list[str]:
    return validate_update(u, reference, n_modalities=N_MODALITIES, n_experts=N_EXPERTS, n_layers=N_LAYERS,
                           n_heads=N_HEADS)


def _set_weight(u: SiteUpdate, name: str, value: np.ndarray) -> None:
    u.weights[name] = value


BREAKAGES = {
    "missing parameters": lambda u: u.weights.pop("head.bias"),
    "unexpected parameters": lambda u: _set_weight(u, "extra.weight", np.zeros(3, np.float32)),
    "head.weight: shape": lambda u: _set_weight(u, "head.weight", np.zeros((5, D), np.float32)),
    "head.weight: dtype": lambda u: _set_weight(u, "head.weight", u.weights["head.weight"].astype(np.float64)),
    "cls_token: non-finite": lambda u: u.weights["cls_token"].__setitem__((0, 0, 1), np.nan),
    "n_patients 0": lambda u: setattr(u, "n_patients", 0),
    "n_patients 2.5": lambda u: setattr(u, "n_patients", 2.5),
    "expert_tokens: shape": lambda u: setattr(u, "expert_tokens", np.ones((N_MODALITIES, N_EXPERTS + 1))),
    "expert_tokens: negative": lambda u: u.expert_tokens.__setitem__((1, 1), -1.0),
    "expert_tokens: non-finite": lambda u: u.expert_tokens.__setitem__((1, 1), np.inf),
    "head_importance: 1 layers": lambda u: u.head_importance.pop(),
    "head_importance[1]: shape": lambda u: u.head_importance.__setitem__(1, np.ones(N_HEADS + 1)),
    "head_importance[0]: negative": lambda u: u.head_importance[0].__setitem__(0, -0.5),
    "head_importance[0]: non-finite": lambda u: u.head_importance[0].__setitem__(0, np.nan),
    "genomic_tokens: shape": lambda u: setattr(u, "genomic_tokens", np.ones(N_POSITIONS + 1)),
    "genomic_tokens: negative": lambda u: setattr(u, "genomic_tokens", np.array([1.0, -1.0, 0.0, 0.0])),
    "genomic_tokens: non-finite": lambda u: setattr(u, "genomic_tokens", np.array([1.0, np.nan, 0.0, 0.0])),
}


@pytest.mark.parametrize("problem", list(BREAKAGES))
@pytest.mark.bad_input
def test_validate_update_names_each_kind_of_problem(problem):
    reference = random_state(0)
    good = update("A", 1, 4, importance=[[1.0, 2.0], [0.0, 3.0]])
    assert check(good, reference) == []
    BREAKAGES[problem](good)
    problems = check(good, reference)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_validate_update_accepts_a_reply_without_head_importance():
    assert check(update("A", 1, 4), random_state(0)) == []


def test_update_norm_is_the_l2_norm_of_the_difference():
    reference = random_state(0)
    u = update("A", 1, 1)
    u.weights = {name: value + np.float32(0.5) for name, value in reference.items()}
    n_values = sum(int(np.prod(shape)) for shape in SHAPES.values())
    assert update_norm(u, reference) == pytest.approx(0.5 * np.sqrt(n_values), rel=1e-6)


def moved(site: str, reference: dict[str, np.ndarray], scale: float, seed: int) -> SiteUpdate:
    rng = np.random.default_rng(seed)
    u = update(site, seed, 1)
    u.weights = {n: (v + scale * rng.uniform(0.5, 1.0, v.shape)).astype(np.float32) for n, v in reference.items()}
    return u


@pytest.mark.bad_input
def test_norm_outliers_flags_a_hundredfold_update_among_four_sites():
    reference = random_state(0)
    sites = [moved("A", reference, 0.01, 1), moved("B", reference, 0.01, 2), moved("C", reference, 1.0, 3),
             moved("D", reference, 0.01, 4)]
    assert norm_outliers(sites, reference) == ["C"]
    assert norm_outliers(sites[:1] + sites[3:] + sites[1:2], reference) == []


def test_norm_outliers_needs_three_sites_to_judge():
    reference = random_state(0)
    two = [moved("A", reference, 0.01, 1), moved("B", reference, 1.0, 2)]
    assert norm_outliers(two, reference) == []
    # With two sites the median is their mean, so only a factor below 2 could flag anyone: still nobody.
    assert norm_outliers(two, reference, factor=1.5) == []
    assert norm_outliers([*two, moved("C", reference, 0.01, 3)], reference, factor=1.5) == ["B"]


@pytest.mark.bad_input
def test_norm_outliers_flags_non_finite_updates():
    reference = random_state(0)
    sites = [moved(s, reference, 0.01, i) for i, s in enumerate("ABC")]
    sites[1].weights["head.bias"][0] = np.inf
    assert norm_outliers(sites, reference) == ["B"]


def test_aggregate_head_stats_sums_and_tolerates_no_stats():
    rng = np.random.default_rng(0)
    a, b = (HeadStats([rng.random(2)], [rng.random((2, 2))], n) for n in (3, 4))
    total = aggregate_head_stats([a, b])
    np.testing.assert_allclose(total.importance_sum[0], a.importance_sum[0] + b.importance_sum[0])
    np.testing.assert_allclose(total.similarity_sum[0], a.similarity_sum[0] + b.similarity_sum[0])
    assert total.n_samples == 7
    assert aggregate_head_stats([]) is None


def test_the_server_learning_rate_scales_the_round_step_of_float_parameters_only():
    previous = {"w": np.array([1.0, 2.0], dtype=np.float32), "count": np.array([3], dtype=np.int64)}
    aggregate = {"w": np.array([2.0, 1.0], dtype=np.float32), "count": np.array([5], dtype=np.int64)}
    stepped = server_step(previous, aggregate, 3.0)
    np.testing.assert_allclose(stepped["w"], [4.0, -1.0])  # previous + 3 x (aggregate - previous)
    assert stepped["w"].dtype == np.float32 and stepped["count"].tolist() == [5]  # integer buffers: the aggregate
    assert server_step(previous, aggregate, 1.0) is aggregate and server_step(None, aggregate, 3.0) is aggregate


def test_server_momentum_accumulates_the_rounds_pseudo_gradients():
    optimizer = ServerMomentum(lr=1.0, momentum=0.9)
    counts = np.array([3], dtype=np.int64)
    first = optimizer.step({"w": np.array([0.0], dtype=np.float32), "count": counts},
                           {"w": np.array([1.0], dtype=np.float32), "count": np.array([5], dtype=np.int64)})
    np.testing.assert_allclose(first["w"], [1.0])  # no velocity yet: the aggregate itself
    assert first["w"].dtype == np.float32 and first["count"].tolist() == [5]
    second = optimizer.step(first, {"w": np.array([1.5], dtype=np.float32), "count": counts})
    # velocity = 0.9 x (0 - 1) + (1 - 1.5) = -1.4; global = 1 - (-1.4)
    np.testing.assert_allclose(second["w"], [2.4], rtol=1e-6)
    np.testing.assert_allclose(optimizer.to_dict()["w"], [-1.4])
    assert "count" not in optimizer.to_dict()  # integer buffers have no velocity


def test_server_momentum_restarts_after_a_reset_or_a_new_shape_and_reloads_its_velocity():
    previous = {"w": np.zeros(2, dtype=np.float32)}
    aggregate = {"w": np.ones(2, dtype=np.float32)}
    optimizer = ServerMomentum(momentum=0.5)
    optimizer.step(previous, aggregate)
    saved = optimizer.to_dict()
    resumed = ServerMomentum(momentum=0.5)
    resumed.load(saved)
    np.testing.assert_allclose(resumed.step(aggregate, {"w": np.ones(2, dtype=np.float32)})["w"], [1.5, 1.5])
    optimizer.reset()
    np.testing.assert_allclose(optimizer.step(aggregate, {"w": np.ones(2, dtype=np.float32)})["w"], [1.0, 1.0])
    merged = optimizer.step({"w": np.zeros(3, dtype=np.float32)}, {"w": np.ones(3, dtype=np.float32)})
    np.testing.assert_allclose(merged["w"], np.ones(3))  # a parameter of a new shape starts without velocity
    plain = ServerMomentum(lr=3.0)
    np.testing.assert_allclose(plain.step(previous, aggregate)["w"], [3.0, 3.0])  # momentum 0: server_step
    assert plain.to_dict() == {}


def test_server_momentum_must_lie_in_zero_to_one():
    from server.config import FederationConfig

    with pytest.raises(ValueError, match=r"server_momentum 1.0 must be in \[0, 1\)"):
        FederationConfig(server_momentum=1.0)


def test_a_server_learning_rate_must_be_positive():
    from server.config import FederationConfig

    with pytest.raises(ValueError, match="server_lr 0.0 must be > 0"):
        FederationConfig(server_lr=0.0)


def test_server_adam_takes_bias_corrected_adam_steps_on_the_rounds_pseudo_gradients():
    optimizer = ServerAdam(lr=0.1, tau=1e-3)
    counts = np.array([3], dtype=np.int64)
    start = {"w": np.array([0.0, 0.0], dtype=np.float32), "count": counts}
    first = optimizer.step(start, {"w": np.array([0.5, -0.0001], dtype=np.float32), "count": np.array([5])})
    # round 1, bias-corrected: first_hat = delta, sqrt(second_hat) = |delta|: a step of lr x delta / (|delta| + tau)
    np.testing.assert_allclose(first["w"], [0.1 * 0.5 / 0.501, -0.1 * 0.0001 / 0.0011], rtol=1e-5)
    assert first["w"].dtype == np.float32 and first["count"].tolist() == [5]  # integer buffers: the aggregate
    delta2 = np.array([0.2, 0.0001]) - first["w"].astype(np.float64)
    second = optimizer.step(first, {"w": np.array([0.2, 0.0001], dtype=np.float32), "count": counts})
    m = (0.1 * delta2 + 0.09 * np.array([0.5, -0.0001])) / (1 - 0.9 ** 2)
    v = (0.01 * delta2 ** 2 + 0.0099 * np.array([0.5, -0.0001]) ** 2) / (1 - 0.99 ** 2)
    np.testing.assert_allclose(second["w"], first["w"] + 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)
    assert ServerAdam().step(None, start) is start  # the first aggregate of a job has nothing to step from


def test_server_adam_state_survives_a_checkpoint_and_resets_at_consolidation():
    previous, aggregate = {"w": np.zeros(2, dtype=np.float32)}, {"w": np.ones(2, dtype=np.float32)}
    straight = ServerAdam(lr=0.1)
    straight.step(previous, aggregate)
    resumed = ServerAdam(lr=0.1)
    resumed.load(straight.to_dict())
    assert resumed.rounds == 1
    after = {"w": np.full(2, 0.5, dtype=np.float32)}
    np.testing.assert_array_equal(resumed.step(aggregate, after)["w"], straight.step(aggregate, after)["w"])
    straight.reset()
    assert straight.to_dict() == {} and straight.rounds == 0
    with pytest.raises(ValueError, match="unknown entry 'w'"):
        ServerAdam().load({"w": np.zeros(2)})  # a FedAvgM velocity is not FedAdam's state


@pytest.mark.bad_input
def test_federation_config_refuses_an_unknown_server_optimizer_or_adam_with_momentum():
    from server.config import FederationConfig

    with pytest.raises(ValueError, match="server_optimizer 'yogi' not one of"):
        FederationConfig(server_optimizer="yogi")
    with pytest.raises(ValueError, match="server_momentum is sgd's"):
        FederationConfig(server_optimizer="adam", server_momentum=0.9)
    with pytest.raises(ValueError, match="server_adam_tau 0.0 must be > 0"):
        FederationConfig(server_optimizer="adam", server_adam_tau=0.0)
