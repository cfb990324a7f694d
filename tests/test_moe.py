"""Tests for the modality-aware sparse mixture of experts (cancermoe/moe.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cancermoe.moe import DenseMLP, SparseMoE, cv_squared, prob_in_top_k

D_MODEL, HIDDEN, N_EXPERTS, TOP_K, N_MODALITIES = 8, 32, 4, 2, 2


def make_moe(seed: int = 0, **overrides) -> SparseMoE:
    torch.manual_seed(seed)
    kwargs = dict(d_model=D_MODEL, hidden=HIDDEN, n_experts=N_EXPERTS, top_k=TOP_K, n_modalities=N_MODALITIES)
    return SparseMoE(**(kwargs | overrides))


def make_batch(seed: int = 0, batch: int = 3, length: int = 10, padded_tail: int = 3):
    """x [B, L, D], modality [B, L] (first half genomics = 0, rest WSI = 1), mask with the last tokens padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, D_MODEL, generator=g)
    modality = torch.zeros(batch, length, dtype=torch.long)
    modality[:, length // 2 :] = 1
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1:, length - padded_tail :] = False  # row 0 is full, the others padded
    return x, modality, mask


def randomise_router(moe: SparseMoE, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=g))
        moe.router.bias.copy_(torch.randn(moe.router.bias.shape, generator=g))


# ---------------------------------------------------------------- pure balancing functions


def test_cv_squared_is_zero_when_uniform_and_grows_with_skew():
    assert cv_squared(torch.full((4,), 2.5)).item() == pytest.approx(0.0, abs=1e-7)
    assert cv_squared(torch.zeros(4)).item() == 0.0
    mild = cv_squared(torch.tensor([3.0, 2.0, 2.0, 1.0]))
    strong = cv_squared(torch.tensor([6.0, 1.0, 1.0, 0.0]))
    one_hot = cv_squared(torch.tensor([8.0, 0.0, 0.0, 0.0]))
    assert 0 < mild < strong < one_hot
    assert one_hot.item() == pytest.approx(N_EXPERTS - 1)  # all mass on one of E experts
    values = np.random.default_rng(0).random(7)
    assert cv_squared(torch.from_numpy(values)).item() == pytest.approx(np.var(values) / np.mean(values) ** 2, rel=1e-5)


def test_prob_in_top_k_matches_monte_carlo():
    # Definition: redraw only expert e's noise, keep the other noisy logits; how often is e in the top-k?
    torch.manual_seed(0)
    k, n_experts, draws = 2, 5, 40_000
    clean = torch.randn(1, n_experts)
    std = torch.rand(1, n_experts) + 0.3
    noisy = clean + torch.randn(1, n_experts) * std
    selected = torch.zeros(1, n_experts, dtype=torch.bool)
    selected[0, noisy[0].topk(k).indices] = True
    predicted = prob_in_top_k(clean, noisy, std, selected, k)[0]
    for e in range(n_experts):
        redrawn = noisy.repeat(draws, 1)
        redrawn[:, e] = clean[0, e] + torch.randn(draws) * std[0, e]
        in_top_k = (redrawn.topk(k, dim=1).indices == e).any(dim=1).double().mean().item()
        assert predicted[e].item() == pytest.approx(in_top_k, abs=0.015)


def test_prob_in_top_k_is_one_when_every_expert_is_chosen():
    clean = torch.randn(6, 3)
    probs = prob_in_top_k(clean, clean, torch.ones_like(clean), torch.ones_like(clean, dtype=torch.bool), k=3)
    assert torch.equal(probs, torch.ones_like(clean))


# ---------------------------------------------------------------- routing


@pytest.mark.parametrize("training", [True, False])
def test_each_real_token_goes_to_exactly_k_distinct_experts(training):
    moe = make_moe()
    randomise_router(moe)
    moe.train(training)
    x, modality, mask = make_batch()
    routing = moe.route(x, modality, mask)
    assert routing.gates.shape == (int(mask.sum()), N_EXPERTS)
    assert ((routing.gates > 0).sum(dim=1) == TOP_K).all()
    chosen = torch.zeros_like(routing.gates, dtype=torch.bool).scatter(1, routing.experts, True)
    assert torch.equal(chosen, routing.gates > 0)  # the k listed experts are distinct and carry the gates


def test_gates_are_softmax_over_all_experts_kept_top_k_not_renormalised():
    moe = make_moe().eval()
    randomise_router(moe)
    x, modality, mask = make_batch()
    routing = moe.route(x, modality, mask)
    tokens, token_modality = x[mask], modality[mask]
    probs = moe.router(torch.cat([tokens, F.one_hot(token_modality, N_MODALITIES).float()], dim=1)).softmax(dim=1)
    top = probs.topk(TOP_K, dim=1)
    expected = torch.zeros_like(probs).scatter(1, top.indices, top.values)
    torch.testing.assert_close(routing.gates, expected)
    assert (routing.gates.sum(dim=1) < 1).all()  # k < E: the kept mass is below one, no renormalisation
    torch.testing.assert_close(routing.importance, expected.sum(dim=0))


def test_output_is_the_gated_sum_of_the_chosen_experts():
    moe = make_moe().eval()
    randomise_router(moe)
    with torch.no_grad():
        moe.output_bias.normal_()
    x, modality, mask = make_batch()
    y, _ = moe(x, modality, mask)
    routing = moe.route(x, modality, mask)
    tokens = x[mask]
    expected = torch.stack([expert(tokens) for expert in moe.experts], dim=1)  # [T, E, D]
    expected = (routing.gates.unsqueeze(2) * expected).sum(dim=1) + moe.output_bias
    torch.testing.assert_close(y[mask], expected)


def test_masked_tokens_get_zero_output_and_do_not_matter():
    moe = make_moe().eval()
    randomise_router(moe)
    x, modality, mask = make_batch()
    y, aux = moe(x, modality, mask)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    assert (y[mask].abs().sum(dim=1) > 0).all()
    changed = x.clone()
    changed[~mask] = 1e3 * torch.randn_like(changed[~mask])
    y_changed, aux_changed = moe(changed, modality, mask)
    assert torch.equal(y_changed, y)
    assert torch.equal(aux_changed, aux)


def test_routing_counts_are_k_per_real_token_split_by_modality():
    moe = make_moe().train()
    randomise_router(moe)
    x, modality, mask = make_batch()
    moe(x, modality, mask)
    moe(x, modality, mask)  # counts accumulate over forwards
    counts = moe.routing_counts
    assert counts.shape == (N_MODALITIES, N_EXPERTS) and counts.dtype == torch.float64
    for m in range(N_MODALITIES):
        real_of_modality = int((mask & (modality == m)).sum())
        assert counts[m].sum().item() == 2 * TOP_K * real_of_modality
    assert counts.sum().item() == 2 * TOP_K * int(mask.sum())


def test_routing_counts_only_in_training_and_reset():
    moe = make_moe()
    x, modality, mask = make_batch()
    moe.eval()
    moe(x, modality, mask)
    assert moe.routing_counts.sum().item() == 0
    moe.train()
    moe(x, modality, mask)
    assert moe.routing_counts.sum().item() > 0
    moe.reset_routing_counts()
    assert moe.routing_counts.sum().item() == 0
    assert "routing_counts" not in moe.state_dict()  # statistics, not weights


def test_each_expert_runs_only_on_its_own_tokens():
    moe = make_moe().train()
    randomise_router(moe)
    rows_seen = [0] * N_EXPERTS

    def record(e):
        def hook(_module, inputs):
            rows_seen[e] += inputs[0].shape[0]

        return hook

    for e, expert in enumerate(moe.experts):
        expert.register_forward_pre_hook(record(e))
    x, modality, mask = make_batch()
    moe(x, modality, mask)
    assert sum(rows_seen) == TOP_K * int(mask.sum())  # not E * tokens
    assert rows_seen == moe.routing_counts.sum(dim=0).long().tolist()


def test_modality_one_hot_lets_the_router_separate_modalities():
    moe = make_moe().train()
    genomic_experts, wsi_experts = [0, 1], [2, 3]
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[genomic_experts, D_MODEL + 0] = 10.0  # one-hot column of modality 0
        moe.router.weight[wsi_experts, D_MODEL + 1] = 10.0
        moe.noise_router.bias.fill_(-20.0)  # noise std ~ NOISE_EPSILON: the modality decides
    x, modality, mask = make_batch()
    moe(x, modality, mask)
    counts = moe.routing_counts
    n_genomic, n_wsi = int((mask & (modality == 0)).sum()), int((mask & (modality == 1)).sum())
    assert counts[0].tolist() == [n_genomic, n_genomic, 0, 0]
    assert counts[1].tolist() == [0, 0, n_wsi, n_wsi]


def test_ties_of_the_zero_initialised_router_go_to_the_lowest_experts_in_eval():
    moe = make_moe().eval()
    x, modality, mask = make_batch()
    routing = moe.route(x, modality, mask)
    assert (routing.experts == torch.arange(TOP_K)).all()
    torch.testing.assert_close(routing.gates[:, :TOP_K], torch.full((len(routing.gates), TOP_K), 1 / N_EXPERTS))


def test_training_noise_spreads_tokens_from_the_zero_initialised_router():
    moe = make_moe().train()
    x, modality, mask = make_batch(batch=8, length=32, padded_tail=0)
    moe(x, modality, mask)
    per_expert = moe.routing_counts.sum(dim=0)
    assert (per_expert > 0).all()


def test_eval_is_deterministic_and_noise_free():
    moe = make_moe().eval()
    randomise_router(moe)
    with torch.no_grad():
        moe.noise_router.bias.fill_(5.0)  # large noise scale: would change routing if it were applied
    x, modality, mask = make_batch()
    torch.manual_seed(1)
    y1, aux1 = moe(x, modality, mask)
    torch.manual_seed(2)
    y2, aux2 = moe(x, modality, mask)
    assert torch.equal(y1, y2) and torch.equal(aux1, aux2)
    moe.train()
    torch.manual_seed(1)
    y_train, _ = moe(x, modality, mask)
    assert not torch.allclose(y_train, y1)  # the same noise scale does act in training


# ---------------------------------------------------------------- balancing loss and gradients


def test_aux_loss_is_larger_for_skewed_routing():
    x, modality, mask = make_batch(batch=8, length=32, padded_tail=0)
    balanced = make_moe().train()
    torch.manual_seed(0)
    _, aux_balanced = balanced(x, modality, mask)
    skewed = make_moe().train()
    with torch.no_grad():
        skewed.router.bias.copy_(torch.tensor([4.0, 3.0, 0.0, 0.0]))
    torch.manual_seed(0)
    _, aux_skewed = skewed(x, modality, mask)
    assert aux_skewed.dtype == torch.float32 and aux_skewed.dim() == 0
    assert aux_skewed > 10 * aux_balanced
    routing = skewed.route(x, modality, mask)
    expected = skewed.balance_weight * (cv_squared(routing.importance) + cv_squared(routing.load))
    assert skewed.balance_loss(routing).item() == pytest.approx(expected.item())


def test_eval_load_is_the_hard_token_count():
    moe = make_moe().eval()
    randomise_router(moe)
    x, modality, mask = make_batch()
    routing = moe.route(x, modality, mask)
    assert routing.load.tolist() == torch.bincount(routing.experts.reshape(-1), minlength=N_EXPERTS).tolist()


def test_gradients_reach_router_noise_layer_experts_and_bias():
    moe = make_moe().train()
    randomise_router(moe)
    x, modality, mask = make_batch()
    torch.manual_seed(0)
    y, _ = moe(x, modality, mask)
    y.square().sum().backward()  # task loss only: the router learns through the gate values
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.output_bias.grad.abs().sum() > 0
    used = moe.routing_counts.sum(dim=0) > 0
    for e, expert in enumerate(moe.experts):
        grads = [p.grad for p in expert.parameters()]
        assert all(g is not None for g in grads)
        assert (sum(g.abs().sum() for g in grads) > 0) == bool(used[e])
    moe.zero_grad()
    torch.manual_seed(0)
    _, aux = moe(x, modality, mask)
    aux.backward()  # the balancing losses train both the router and the noise scale
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.noise_router.weight.grad.abs().sum() > 0


def test_every_expert_k_equals_e_has_zero_load_loss():
    moe = make_moe(top_k=N_EXPERTS).train()
    x, modality, mask = make_batch()
    routing = moe.route(x, modality, mask)
    assert cv_squared(routing.load).item() == 0.0
    torch.testing.assert_close(routing.gates.sum(dim=1), torch.ones(len(routing.gates)))


def test_no_real_tokens():
    moe = make_moe().train()
    x, modality, _ = make_batch()
    mask = torch.zeros(x.shape[:2], dtype=torch.bool)
    y, aux = moe(x, modality, mask)
    assert torch.equal(y, torch.zeros_like(y))
    assert aux.item() == 0.0
    assert moe.routing_counts.sum().item() == 0


def test_bf16_autocast_forward_and_backward():
    moe = make_moe().train()
    randomise_router(moe)
    x, modality, mask = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = moe(x, modality, mask)
    assert aux.dtype == torch.float32
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    (y.float().sum() + aux).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.routing_counts.sum().item() == TOP_K * int(mask.sum())


def test_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="divisible"):
        make_moe(hidden=30)
    with pytest.raises(ValueError, match="top_k"):
        make_moe(top_k=N_EXPERTS + 1)


# ---------------------------------------------------------------- dense ablation


def test_dense_mlp_has_the_experts_parameters_and_is_their_sum():
    moe = make_moe()
    dense = DenseMLP(D_MODEL, HIDDEN, N_MODALITIES)
    routing_params = {"router.weight", "router.bias", "noise_router.weight", "noise_router.bias"}
    moe_params = sum(p.numel() for name, p in moe.named_parameters() if name not in routing_params)
    assert moe_params == sum(p.numel() for p in dense.parameters())
    # The experts are the dense MLP's hidden units cut into E groups: with every expert on at gate 1 they
    # reproduce it exactly.
    width = HIDDEN // N_EXPERTS
    with torch.no_grad():
        for e, expert in enumerate(moe.experts):
            part = slice(e * width, (e + 1) * width)
            expert.fc_in.weight.copy_(dense.fc_in.weight[part])
            expert.fc_in.bias.copy_(dense.fc_in.bias[part])
            expert.fc_out.weight.copy_(dense.fc_out.weight[:, part])
        moe.output_bias.copy_(dense.fc_out.bias)
    x, modality, mask = make_batch()
    every_expert_at_gate_one = sum(expert(x[mask]) for expert in moe.experts) + moe.output_bias
    torch.testing.assert_close(every_expert_at_gate_one, dense(x, modality, mask)[0][mask])


def test_dense_mlp_interface():
    dense = DenseMLP(D_MODEL, HIDDEN, N_MODALITIES).train()
    x, modality, mask = make_batch()
    y, aux = dense(x, modality, mask)
    assert y.shape == x.shape and aux.item() == 0.0 and aux.dim() == 0
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    assert dense.routing_counts.shape == (N_MODALITIES, 1)
    assert dense.routing_counts[:, 0].tolist() == [int((mask & (modality == m)).sum()) for m in range(N_MODALITIES)]
    dense.eval()
    dense(x, modality, mask)
    assert dense.routing_counts.sum().item() == int(mask.sum())
    dense.reset_routing_counts()
    assert dense.routing_counts.sum().item() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_in_eval_and_trains_under_bf16_autocast():
    moe = make_moe().eval()
    randomise_router(moe)
    x, modality, mask = make_batch()
    y_cpu, aux_cpu = moe(x, modality, mask)
    tied_cpu = make_moe().eval().route(x, modality, mask).experts
    moe.cuda()
    y_cuda, aux_cuda = moe(x.cuda(), modality.cuda(), mask.cuda())
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(aux_cuda.cpu(), aux_cpu, rtol=1e-4, atol=1e-6)
    assert torch.equal(make_moe().cuda().eval().route(x.cuda(), modality.cuda(), mask.cuda()).experts.cpu(), tied_cpu)
    moe.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, aux = moe(x.cuda(), modality.cuda(), mask.cuda())
    (y.float().sum() + aux).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.routing_counts.sum().item() == TOP_K * int(mask.sum())
