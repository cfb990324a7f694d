"""Attention consolidation and sparsification: head statistics, the plan, merged heads, sparse maps."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from scipy.special import softmax as scipy_softmax

from cancermoe.acs import (
    ConsolidationPlan,
    HeadStats,
    LayerPlan,
    compute_consolidation_plan,
    head_statistics,
    kept_wsi_tokens,
    n_cluster_centres,
    sparsify_attention,
)
from cancermoe.model import CancerMoE, count_flops, count_parameters
from tests.model_helpers import build, small_config
from tests.model_helpers import make_batch as _make_batch


def make_batch(**changes) -> dict[str, torch.Tensor]:
    return _make_batch(padded_tokens=7, **changes)  # some padding, so masking is exercised


def per_sample_loss(model: CancerMoE, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A loss that is a mean over the batch of per-sample terms (like the survival NLL)."""
    return model(**batch).hazard_logits.square().sum(dim=1).mean()


def batch_head_stats(model: CancerMoE, batch: dict[str, torch.Tensor]) -> HeadStats:
    model.zero_grad()
    model.enable_head_stats()
    per_sample_loss(model, batch).backward()
    return model.collect_head_stats()


def take(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in batch.items()}


def head_outputs(attn, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-head outputs [B, H, L, d_h] of an attention module, from its public pieces."""
    q, k, v = (attn.split_heads(layer(x)) for layer in (attn.query, attn.key, attn.value))
    return attn.attention_map(q, k, mask) @ v


# ---- sparsification


def test_kept_wsi_tokens_rounds_half_up_and_keeps_at_least_one():
    kept = kept_wsi_tokens(torch.tensor([0, 1, 12, 50, 3072]), 0.08)
    # 0.08 * [0, 1, 12, 50, 3072] = [0, 0.08, 0.96, 4.0, 245.76]
    assert kept.tolist() == [0, 1, 1, 4, 246]
    assert kept_wsi_tokens(torch.tensor([25]), 0.1).tolist() == [3]  # 2.5 -> 3


def test_sparsify_attention_keeps_exactly_the_largest_entries_per_sample_and_head():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(3, 4, 10, 10, generator=g).softmax(-1)  # continuous: no ties
    keep = torch.tensor([9, 25, 100])
    sparse = sparsify_attention(attn, keep)
    for b in range(3):
        for h in range(4):
            kept = sparse[b, h] != 0
            assert int(kept.sum()) == int(keep[b])
            assert torch.equal(sparse[b, h][kept], attn[b, h][kept])  # no renormalisation
            if int(keep[b]) < 100:
                assert attn[b, h][kept].min() > attn[b, h][~kept].max()
    assert torch.equal(sparsify_attention(attn, 1000), attn)  # a budget over L*L keeps the whole map
    assert ((sparsify_attention(attn, 4) != 0).sum(dim=(2, 3)) == 4).all()


def test_sparsify_attention_passes_gradient_through_kept_entries_only():
    attn = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
    sparse = sparsify_attention(attn, 5)
    sparse.sum().backward()
    assert torch.equal(attn.grad, (sparse != 0).float())


# ---- head statistics


def test_head_statistics_match_a_per_sample_loop():
    g = torch.Generator().manual_seed(2)
    outputs, grads = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    importance, similarity = head_statistics(outputs, grads, mask, loss_scale=2)
    want_imp, want_sim = np.zeros(3), np.zeros((3, 3))
    for b in range(2):
        real = mask[b].numpy()
        a, gr = outputs[b].numpy()[:, real], grads[b].numpy()[:, real]
        for i in range(3):
            want_imp[i] += 2 * abs(np.sum(a[i] * gr[i]))
            for j in range(3):
                u, v = a[i].ravel(), a[j].ravel()
                want_sim[i, j] += u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    np.testing.assert_allclose(importance, want_imp, rtol=1e-5)
    np.testing.assert_allclose(similarity, want_sim, rtol=1e-5)


def test_model_head_stats_are_nonnegative_symmetric_and_count_samples():
    model = build(small_config()).train()
    stats = batch_head_stats(model, make_batch())
    assert stats.n_samples == 3 and stats.n_layers == 2
    for layer in range(2):
        assert stats.importance_sum[layer].shape == (8,)
        assert np.all(stats.importance_sum[layer] >= 0) and np.any(stats.importance_sum[layer] > 0)
        np.testing.assert_allclose(stats.similarity_sum[layer], stats.similarity_sum[layer].T, rtol=1e-6)
        np.testing.assert_allclose(np.diag(stats.similarity_sum[layer]), 3.0, rtol=1e-5)  # cos(A, A) = 1


def test_per_sample_importance_does_not_depend_on_the_batch_it_came_in():
    # Dense MLP: the SMoE's noisy routing and batch-level balancing loss would couple the samples.
    model = build(small_config(smoe=False)).train()
    batch = make_batch()
    together = batch_head_stats(model, batch)
    apart = batch_head_stats(model, take(batch, slice(0, 1))) + batch_head_stats(model, take(batch, slice(1, 3)))
    assert apart.n_samples == together.n_samples == 3
    for layer in range(2):
        np.testing.assert_allclose(apart.importance_sum[layer], together.importance_sum[layer], rtol=1e-4)
        np.testing.assert_allclose(apart.similarity_sum[layer], together.similarity_sum[layer], rtol=1e-4)


def test_a_head_cut_off_from_the_output_has_zero_importance():
    model = build(small_config()).train()
    head_dim = model.blocks[0].attn.head_dim
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[:, 3 * head_dim:4 * head_dim] = 0
    stats = batch_head_stats(model, make_batch())
    assert stats.importance_sum[0][3] == 0
    assert np.all(np.delete(stats.importance_sum[0], 3) > 0)


def test_collecting_without_a_backward_pass_is_an_error():
    model = build(small_config()).train()
    model.enable_head_stats()
    model(**make_batch())
    with pytest.raises(RuntimeError, match="backward"):
        model.collect_head_stats()


def test_head_stats_add_up_and_round_trip_through_plain_arrays():
    g = np.random.default_rng(0)
    a = HeadStats([g.random(4), g.random(4)], [g.random((4, 4)), g.random((4, 4))], 5)
    b = HeadStats([g.random(4), g.random(4)], [g.random((4, 4)), g.random((4, 4))], 7)
    total = a + b
    assert total.n_samples == 12
    np.testing.assert_array_equal(total.importance_sum[1], a.importance_sum[1] + b.importance_sum[1])
    np.testing.assert_array_equal(total.similarity_sum[0], a.similarity_sum[0] + b.similarity_sum[0])
    assert sum([a, b]).n_samples == 12
    arrays = total.to_dict()
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    back = HeadStats.from_dict(arrays)
    assert back.n_samples == 12
    np.testing.assert_array_equal(back.similarity_sum[1], total.similarity_sum[1])
    with pytest.raises(ValueError):
        a + HeadStats.zeros(2, 8)
    with pytest.raises(ValueError, match="missing"):
        HeadStats.from_dict({"n_samples": 1, "layer0.importance_sum": np.zeros(4)})


# ---- the plan


def planted_stats() -> HeadStats:
    """One layer, 8 heads; importance order 5 > 2 > 7 > 0 > ...; similarity planted so each
    non-centre head has a clear favourite centre."""
    importance = np.array([0.4, 0.1, 0.8, 0.05, 0.2, 0.9, 0.3, 0.6])
    similarity = np.full((8, 8), 0.1)
    np.fill_diagonal(similarity, 1.0)
    for head, centre in ((1, 2), (3, 5), (4, 5), (6, 0)):
        similarity[head, centre] = similarity[centre, head] = 0.7
    n = 4  # sums over 4 samples
    return HeadStats([importance * n], [similarity * n], n)


def test_plan_picks_the_most_important_heads_as_centres_and_assigns_by_similarity():
    plan = compute_consolidation_plan(planted_stats(), ratio=0.5)
    (layer,) = plan.layers
    assert [c[0] for c in layer.clusters] == [0, 2, 5, 7]  # top 4 by importance, in head order
    assert layer.clusters == ((0, 6), (2, 1), (5, 3, 4), (7,))
    assert sorted(h for c in layer.clusters for h in c) == list(range(8))
    importance = planted_stats().mean_importance(0)
    for cluster, weights in zip(layer.clusters, layer.weights, strict=True):
        np.testing.assert_allclose(weights, scipy_softmax(importance[list(cluster)]), rtol=1e-12)


def test_plan_is_deterministic_with_ties_going_to_the_lower_head_index():
    stats = HeadStats([np.ones(4)], [np.ones((4, 4))], 1)  # everything tied
    plan = compute_consolidation_plan(stats, ratio=0.5)
    assert plan.layers[0].clusters == ((0, 2, 3), (1,))
    assert plan == compute_consolidation_plan(HeadStats([np.ones(4)], [np.ones((4, 4))], 1), ratio=0.5)


def test_cluster_count_follows_the_ratio():
    assert [n_cluster_centres(r, 8) for r in (0.0, 0.1, 0.3, 0.5, 0.7, 1.0)] == [1, 1, 2, 4, 6, 8]
    identity = compute_consolidation_plan(planted_stats(), ratio=1.0)
    assert identity.layers[0].clusters == tuple((h,) for h in range(8))
    assert compute_consolidation_plan(planted_stats(), ratio=0.0).layers[0].n_clusters == 1


def test_plan_round_trips_through_json_and_rejects_bad_plans():
    plan = compute_consolidation_plan(planted_stats(), ratio=0.5)
    assert ConsolidationPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    bad = plan.to_dict()
    bad["layers"][0]["clusters"][0] = [0]  # head 6 now in no cluster
    bad["layers"][0]["weights"][0] = [1.0]
    with pytest.raises(ValueError, match="exactly once"):
        ConsolidationPlan.from_dict(bad)
    with pytest.raises(ValueError, match="not a consolidation plan"):
        ConsolidationPlan.from_dict({"layers": []})


# ---- applying a plan


def test_a_cluster_with_shared_query_and_key_outputs_the_weighted_sum_of_its_members():
    model = build(small_config())
    attn = model.blocks[0].attn
    dh = attn.head_dim
    members, weights = (1, 3, 4), (0.5, 0.3, 0.2)
    with torch.no_grad():  # members share head 1's query and key weights
        for layer in (attn.query, attn.key):
            for h in members[1:]:
                layer.weight[h * dh:(h + 1) * dh] = layer.weight[dh:2 * dh]
                layer.bias[h * dh:(h + 1) * dh] = layer.bias[dh:2 * dh]
    others = [h for h in range(8) if h not in members]
    plan = LayerPlan(((0,), members, *((h,) for h in others[1:])), ((1.0,), weights, *((1.0,),) * 4))
    merged = copy.deepcopy(attn)
    merged.consolidate(plan)
    x, mask = torch.randn(2, 9, 32), torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        before, after = head_outputs(attn, x, mask), head_outputs(merged, x, mask)
    assert merged.n_heads == 6 and after.shape[1] == 6
    expected = sum(w * before[:, h] for h, w in zip(members, weights, strict=True))
    torch.testing.assert_close(after[:, 1], expected)  # paper eq. 1
    for slot, head in ((0, 0), *((i + 2, h) for i, h in enumerate(others[1:]))):
        torch.testing.assert_close(after[:, slot], before[:, head])
    # With the values shared too, every member's output IS the cluster's: the layer is unchanged.
    with torch.no_grad():
        for h in members[1:]:
            attn.value.weight[h * dh:(h + 1) * dh] = attn.value.weight[dh:2 * dh]
            attn.value.bias[h * dh:(h + 1) * dh] = attn.value.bias[dh:2 * dh]
    merged = copy.deepcopy(attn)
    merged.consolidate(plan)
    with torch.no_grad():
        torch.testing.assert_close(merged(x, mask)[0], attn(x, mask)[0])


@pytest.mark.parametrize("training", [True, False])
def test_one_head_per_cluster_leaves_the_model_unchanged(training):
    model = build(small_config()).train()
    batch = make_batch()
    plan = compute_consolidation_plan(batch_head_stats(model, batch), ratio=1.0)
    model.train(training)
    torch.manual_seed(1)
    before = model(**batch)
    model.apply_consolidation(plan)
    torch.manual_seed(1)
    after = model(**batch)
    torch.testing.assert_close(after.hazard_logits, before.hazard_logits)
    torch.testing.assert_close(after.cls_attention, before.cls_attention)


def test_consolidated_model_is_smaller_cheaper_and_still_trains():
    config = small_config()
    model = build(config).train()
    batch = make_batch()
    plan = compute_consolidation_plan(batch_head_stats(model, batch), ratio=0.5)
    params_before = count_parameters(model)
    flops_before = count_flops(model, **batch)
    model.apply_consolidation(plan)
    d, dh, removed_heads = config.d_model, config.d_model // config.n_heads, 4
    # Per block, q/k/v lose 4 heads' rows (weights and biases) and the output projection their columns.
    assert params_before - count_parameters(model) == config.n_layers * removed_heads * dh * (3 * (d + 1) + d)
    flops_after = count_flops(model, **batch)
    assert flops_after.attention < flops_before.attention
    assert flops_before.total - flops_after.total == flops_before.attention - flops_after.attention
    assert model.blocks[0].attn.n_heads == 4
    # A training step on the new parameters works, and head statistics follow the new head count.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    query_before = model.blocks[0].attn.query.weight.detach().clone()
    stats = batch_head_stats(model, batch)
    optimizer.step()
    assert not torch.equal(model.blocks[0].attn.query.weight, query_before)
    assert stats.importance_sum[0].shape == (4,)
    assert torch.isfinite(model(**batch).hazard_logits).all()


def test_consolidated_checkpoint_round_trip(tmp_path):
    config = small_config()
    model = build(config).train()
    batch = make_batch()
    model.apply_consolidation(compute_consolidation_plan(batch_head_stats(model, batch), ratio=0.5))
    path = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict(), "plan": json.dumps(model.consolidation_plan.to_dict())}, path)
    saved = torch.load(path)
    restored = CancerMoE(config, plan=ConsolidationPlan.from_dict(json.loads(saved["plan"])))
    restored.load_state_dict(saved["state_dict"])
    assert restored.consolidation_plan == model.consolidation_plan
    model.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(**batch).hazard_logits, model(**batch).hazard_logits, rtol=0, atol=0)
    with pytest.raises(RuntimeError):  # the unconsolidated shapes do not fit
        CancerMoE(config).load_state_dict(saved["state_dict"])


def test_consolidation_is_refused_without_acs_twice_or_for_another_shape():
    plan = compute_consolidation_plan(HeadStats([np.arange(8.0)] * 2, [np.eye(8)] * 2, 1), ratio=0.5)
    with pytest.raises(ValueError, match="acs"):
        build(small_config(acs=False)).apply_consolidation(plan)
    with pytest.raises(ValueError, match="acs"):
        CancerMoE(small_config(acs=False), plan=plan)
    model = build(small_config())
    model.apply_consolidation(plan)
    with pytest.raises(ValueError, match="already"):
        model.apply_consolidation(plan)
    with pytest.raises(ValueError, match="does not fit"):
        build(small_config(n_layers=3)).apply_consolidation(plan)
