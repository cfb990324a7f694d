"""The CancerMoE network: token layout, masks, missing modalities, CLS attention, inference token filtering."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cancermoe.model as model_module
from cancermoe.acs import kept_wsi_tokens
from cancermoe.model import (
    MODALITY_CLS,
    MODALITY_GENOMICS,
    MODALITY_WSI,
    Attention,
    CancerMoE,
    GenomicEmbedding,
    count_flops,
    count_parameters,
    genomic_pieces,
)
from tests.model_helpers import FEATURES, build, make_batch, small_config

# ---- genomic tokens


def test_genomic_pieces_cut_in_order_and_zero_pad_the_last_piece():
    vector = np.arange(1, 20, dtype=np.float64)  # 19 values
    pieces = genomic_pieces(vector, 8)
    assert pieces.shape == (3, 8) and pieces.dtype == torch.float32
    assert pieces.reshape(-1)[:19].tolist() == list(range(1, 20))
    assert pieces[2, 3:].tolist() == [0.0] * 5
    assert torch.equal(genomic_pieces(torch.arange(1, 17.0), 8), torch.arange(1, 17.0).view(2, 8))


def test_too_many_genomic_tokens_is_refused():
    model = build(small_config(max_genomic_tokens=4))
    with pytest.raises(ValueError, match="max_genomic_tokens"):
        model(**make_batch(n_pieces=5))


def test_per_piece_genomic_embedding_gives_each_piece_position_its_own_map():
    """A change of gene j in piece 0 moves token 0 only, and differently from the same change in piece 1."""
    torch.manual_seed(0)
    embed = GenomicEmbedding(piece=8, d_model=32, max_tokens=4, per_piece=True)
    base = torch.zeros(1, 2, 8)
    bumped = base.clone()
    bumped[0, :, 3] = 1.0  # gene 3 of both pieces
    shift = embed(bumped) - embed(base)
    assert torch.allclose(shift[0, 0], embed.weight[0, 3]) and torch.allclose(shift[0, 1], embed.weight[1, 3])
    assert not torch.allclose(shift[0, 0], shift[0, 1])
    shared = GenomicEmbedding(piece=8, d_model=32, max_tokens=4, per_piece=False)
    shared_shift = shared(bumped) - shared(base)
    assert torch.allclose(shared_shift[0, 0], shared_shift[0, 1])  # a shared map cannot tell the pieces apart


@pytest.mark.parametrize("per_piece", [False, True])
def test_genomic_offset_gives_each_cancer_its_own_positions(per_piece):
    """The same values at offset 2 are read by positions 2.. (another cancer's genes), and only those learn."""
    torch.manual_seed(0)
    embed = GenomicEmbedding(piece=8, d_model=32, max_tokens=4, per_piece=per_piece)
    values = torch.randn(2, 2, 8)
    at_zero, at_two = embed(values, torch.tensor([0, 0])), embed(values, torch.tensor([2, 2]))
    assert torch.allclose(at_zero, embed(values))  # offset 0 is the layout-free embedding
    assert not torch.allclose(at_zero, at_two)
    embed(values, torch.tensor([2, 2])).sum().backward()
    learned = embed.weight.grad if per_piece else embed.position.weight.grad
    assert learned[:2].abs().sum() == 0 and learned[2:].abs().sum() > 0


def test_genomic_l1_counts_every_gene_weight_of_the_per_piece_map():
    embed = GenomicEmbedding(piece=8, d_model=32, max_tokens=4, per_piece=True)
    assert embed.l1_norm().item() == pytest.approx(embed.weight.abs().sum().item())
    assert embed.weight.shape == (4, 8, 32)


@pytest.mark.parametrize("per_piece", [False, True])
def test_genomic_embedding_choices_train_end_to_end(per_piece):
    config = small_config(genomic_embedding="per-piece" if per_piece else "shared")
    model = build(config).train()
    out = model(**make_batch())
    out.hazard_logits.sum().backward()
    grads = model.genomic_embed.weight.grad if per_piece else model.genomic_embed.linear.weight.grad
    assert grads is not None and grads.abs().sum() > 0


def test_unknown_genomic_embedding_is_refused():
    with pytest.raises(ValueError, match="genomic_embedding"):
        small_config(genomic_embedding="per-gene")


# ---- shapes, modes, missing modalities


@pytest.mark.parametrize("acs", [True, False])
@pytest.mark.parametrize("smoe", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_output_shapes_and_finite(acs, smoe, training):
    config = small_config(acs=acs, smoe=smoe)
    model = build(config).train(training)
    out = model(**make_batch())
    assert out.hazard_logits.shape == (3, config.n_bins)
    assert out.cls_attention.shape == (3, 32)
    assert out.aux_loss.shape == ()
    assert torch.isfinite(out.hazard_logits).all() and torch.isfinite(out.aux_loss)
    assert not out.cls_attention.requires_grad


@pytest.mark.parametrize("training", [True, False])
def test_patients_without_slide_or_without_genomics_get_finite_risks(training):
    model = build(small_config()).train(training)
    batch = make_batch()
    batch["wsi_mask"][0] = False  # no slide
    batch["genomics_mask"][1] = False  # no genomics
    batch["wsi_mask"][2, 7:] = False  # a short slide
    out = model(**batch)
    assert torch.isfinite(out.hazard_logits).all()
    assert torch.all(out.cls_attention[0] == 0)
    assert torch.all(out.cls_attention[2, 7:] == 0)
    # A whole batch without slides (N = 0), and one without genomic tokens at all.
    no_slides = model(torch.zeros(2, 0, FEATURES), torch.zeros(2, 0, dtype=torch.bool),
                      batch["genomics"][:2], batch["genomics_mask"][:2])
    assert torch.isfinite(no_slides.hazard_logits).all() and no_slides.cls_attention.shape == (2, 0)
    slides_only = model(batch["wsi"], batch["wsi_mask"], None, None)
    assert torch.isfinite(slides_only.hazard_logits).all()


@pytest.mark.parametrize("acs", [True, False])
def test_padding_wsi_tokens_does_not_change_outputs(acs):
    model = build(small_config(acs=acs)).eval()
    batch = make_batch(n_wsi=20)
    padded = dict(batch)
    padded["wsi"] = torch.cat([batch["wsi"], 5 * torch.randn(3, 12, FEATURES)], dim=1)  # garbage in padding
    padded["wsi_mask"] = torch.cat([batch["wsi_mask"], torch.zeros(3, 12, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        plain, with_padding = model(**batch), model(**padded)
    torch.testing.assert_close(with_padding.hazard_logits, plain.hazard_logits)
    torch.testing.assert_close(with_padding.cls_attention[:, :20], plain.cls_attention)
    assert torch.all(with_padding.cls_attention[:, 20:] == 0)


def test_genomics_change_the_risk_unless_the_ablation_drops_them():
    batch = make_batch()
    other = dict(batch, genomics=batch["genomics"] + 1.0)
    with_genomics = build(small_config()).eval()
    assert not torch.allclose(with_genomics(**batch).hazard_logits, with_genomics(**other).hazard_logits)
    without = build(small_config(use_genomics=False)).eval()
    torch.testing.assert_close(without(**batch).hazard_logits, without(**other).hazard_logits, rtol=0, atol=0)
    torch.testing.assert_close(without(**batch).hazard_logits,
                               without(batch["wsi"], batch["wsi_mask"], None, None).hazard_logits, rtol=0, atol=0)


# ---- CLS attention (the DPS token score)


@pytest.mark.parametrize("training", [True, False])
def test_cls_attention_is_a_partial_distribution_zero_at_padding(training):
    model = build(small_config()).train(training)
    batch = make_batch()
    batch["wsi_mask"][1, 10:] = False
    out = model(**batch)
    assert torch.all(out.cls_attention >= 0)
    assert torch.all(out.cls_attention.sum(dim=1) <= 1 + 1e-6)
    assert torch.all(out.cls_attention[1, 10:] == 0)
    if training:  # every real token is a key of the last block's dense attention
        assert torch.all(out.cls_attention[batch["wsi_mask"]] > 0)


def test_cls_attention_is_the_last_blocks_head_mean_cls_row():
    model = build(small_config(acs=False)).eval()
    batch = make_batch()
    captured = {}
    model.blocks[-1].attn.register_forward_hook(lambda m, args, out: captured.update(row=out[1]))
    out = model(**batch)
    torch.testing.assert_close(out.cls_attention, captured["row"][:, 1:33])


def block_cls_rows(model: CancerMoE) -> list[dict]:
    """Hooks that capture each block's returned CLS attention row (the third output of `Block.forward`)."""
    rows: list[dict] = [{} for _ in model.blocks]
    for block, captured in zip(model.blocks, rows, strict=True):
        block.register_forward_hook(lambda m, args, out, captured=captured: captured.update(row=out[2]))
    return rows


@pytest.mark.parametrize("acs", [True, False])
def test_dps_score_picks_the_block_whose_cls_row_scores_tokens_in_training(acs):
    batch = make_batch()
    batch["wsi_mask"][1, 20:] = False
    outputs = {}
    for score in ("last-cls", "first-cls"):
        model = build(small_config(acs=acs, dps_score=score)).train()
        rows = block_cls_rows(model)
        outputs[score] = out = model(**batch)
        first, last = (r["row"][:, 1:33] * batch["wsi_mask"] for r in (rows[0], rows[-1]))
        torch.testing.assert_close(out.first_cls_attention, first)
        torch.testing.assert_close(out.cls_attention, last)
        torch.testing.assert_close(out.token_scores, first if score == "first-cls" else last)
        assert not out.token_scores.requires_grad
    assert not torch.allclose(outputs["first-cls"].token_scores, outputs["last-cls"].token_scores)


def test_first_cls_score_covers_every_token_under_sparse_inference():
    """At inference the first block's CLS row over all N tokens is what filtered them: every real token is scored."""
    model = build(small_config(sparsify_keep=0.25, dps_score="first-cls")).eval()
    batch = make_batch()
    batch["wsi_mask"][2, 12:] = False
    with torch.no_grad():
        out = model(**batch)
        x, _, mask = model.embed(**batch)
        _, dense_first = model.blocks[0].attn(model.blocks[0].ln_attn(x), mask)
    torch.testing.assert_close(out.token_scores, dense_first[:, 1:33] * batch["wsi_mask"])
    assert torch.equal(out.token_scores > 0, batch["wsi_mask"])
    assert (out.cls_attention > 0).sum(1).tolist() == [8, 8, 3]  # the last block saw only the kept tokens
    kept = out.cls_attention > 0
    for b in range(3):  # and those are the tokens of highest first-block score
        assert out.token_scores[b][kept[b]].min() >= out.token_scores[b][~kept[b] & batch["wsi_mask"][b]].max()


def test_unknown_dps_score_is_refused():
    with pytest.raises(ValueError, match="dps_score"):
        small_config(dps_score="middle-cls")
    with pytest.raises(ValueError, match="test_time_dps_passes"):
        small_config(test_time_dps_passes=-1)


# ---- sparsification inside the model


def test_training_sparsifies_the_first_block_only_with_qn_squared_entries(monkeypatch):
    config = small_config(sparsify_keep=0.25)
    model = build(config).train()
    batch = make_batch()
    batch["wsi_mask"][1, 12:] = False  # 12 real tokens -> qN = 3
    calls = []
    original = model_module.sparsify_attention

    def recording(attn, keep_entries):
        sparse = original(attn, keep_entries)
        calls.append(sparse.detach())
        return sparse

    monkeypatch.setattr(model_module, "sparsify_attention", recording)
    model(**batch)
    assert len(calls) == 1  # first block only
    nonzero = (calls[0] != 0).sum(dim=(2, 3))  # [B, H]
    expected = kept_wsi_tokens(batch["wsi_mask"].sum(1), 0.25) ** 2  # 8^2, 3^2, 8^2
    assert expected.tolist() == [64, 9, 64]
    assert torch.equal(nonzero, expected[:, None].expand_as(nonzero))


def test_no_sparsification_without_acs(monkeypatch):
    monkeypatch.setattr(model_module, "sparsify_attention", lambda *a: pytest.fail("sparsified with acs off"))
    model = build(small_config(acs=False)).train()
    model(**make_batch())
    out = model.eval()(**make_batch())
    assert torch.all((out.cls_attention > 0).sum(1) == 32)  # inference attends over every token


def test_inference_keeps_the_qn_tokens_of_highest_first_block_cls_attention():
    config = small_config(sparsify_keep=0.25)
    model = build(config).eval()
    batch = make_batch()
    batch["wsi_mask"][2, 12:] = False
    with torch.no_grad():
        out = model(**batch)
        x, modality, mask = model.embed(**batch)
        _, first_row = model.blocks[0].attn(model.blocks[0].ln_attn(x), mask)
    kept = kept_wsi_tokens(batch["wsi_mask"].sum(1), 0.25)
    assert (out.cls_attention > 0).sum(1).tolist() == kept.tolist() == [8, 8, 3]
    scores = first_row[:, 1:33].masked_fill(~batch["wsi_mask"], -1)
    for b in range(3):
        chosen = set(out.cls_attention[b].nonzero().squeeze(1).tolist())
        assert chosen == set(scores[b].topk(int(kept[b])).indices.tolist())


def test_inference_equals_a_dense_model_run_on_the_selected_tokens_only():
    """'At inference the attention calculation purely happens among the selected qN tokens.'"""
    sparse = build(small_config(sparsify_keep=0.25)).eval()
    dense = CancerMoE(small_config(acs=False)).eval()
    dense.load_state_dict(sparse.state_dict())
    batch = make_batch()
    with torch.no_grad():
        out = sparse(**batch)
        for b in range(3):
            selected = out.cls_attention[b].nonzero().squeeze(1)
            alone = dense(batch["wsi"][b:b + 1, selected], batch["wsi_mask"][b:b + 1, selected],
                          batch["genomics"][b:b + 1], batch["genomics_mask"][b:b + 1])
            torch.testing.assert_close(alone.hazard_logits, out.hazard_logits[b:b + 1])
            torch.testing.assert_close(alone.cls_attention[0], out.cls_attention[b, selected])


def test_sparse_inference_can_be_switched_off_in_eval_mode():
    model = build(small_config()).eval()
    out = model(**make_batch(), sparse_inference=False)  # e.g. to score every token for DPS without dropout
    assert torch.all((out.cls_attention > 0).sum(1) == 32)


# ---- cost


def test_sparse_inference_attention_flops_are_those_of_the_selected_tokens_only():
    """At N = 3072 (paper default), eval-mode attention = the CLS-row choice over all tokens + full
    attention among 1 + qN tokens in every block: computed here independently of the model."""
    config = small_config(max_genomic_tokens=1024)
    model = build(config).eval()
    n_wsi, d, blocks = 3072, config.d_model, config.n_layers
    batch = {"wsi": torch.randn(1, n_wsi, FEATURES), "wsi_mask": torch.ones(1, n_wsi, dtype=torch.bool),
             "genomics": None, "genomics_mask": None}
    flops = count_flops(model, **batch)
    length = 1 + n_wsi
    kept = 1 + int(kept_wsi_tokens(torch.tensor([n_wsi]), config.sparsify_keep))  # CLS + 246
    choice = 2 * length * d * d + 2 * d * d + 2 * length * d  # keys of all tokens, the CLS query, its scores
    per_block = 4 * 2 * kept * d * d + 2 * 2 * kept * kept * d  # q, k, v, out projections; QK^T and AV
    assert flops.attention == choice + blocks * per_block
    # Against dense attention over the same tokens (N = 1024 here to keep the test fast): far fewer.
    short = {**batch, "wsi": batch["wsi"][:, :1024], "wsi_mask": batch["wsi_mask"][:, :1024]}
    dense = count_flops(CancerMoE(config.replace(acs=False)).eval(), **short)
    assert count_flops(model, **short).attention < dense.attention / 20


@pytest.mark.parametrize("genomic_embedding", ["shared", "per-piece"])
def test_count_parameters_counts_every_weight(genomic_embedding):
    config = small_config(genomic_embedding=genomic_embedding)
    model = build(config)
    d, hidden = config.d_model, config.mlp_hidden
    attention = 4 * (d * d + d)
    norms = 2 * 2 * d
    dense_mlp = d * hidden + hidden + hidden * d + d
    # one Linear(8 -> d) for all pieces, or one 8 x d map per piece position (its position embedding is its bias)
    genomic = 8 * d + d if genomic_embedding == "shared" else 16 * 8 * d
    embeddings = d + (FEATURES * d + d) + genomic + 16 * d + 3 * d
    router = 2 * ((d + 3) * config.n_experts + config.n_experts)
    head = 2 * d + d * config.n_bins + config.n_bins
    expected = embeddings + 2 * (attention + norms) + dense_mlp + (dense_mlp + router) + head
    assert count_parameters(model) == expected


# ---- SMoE routing statistics


def test_routing_counts_count_real_tokens_by_modality_and_reset():
    config = small_config()
    model = build(config).train()
    batch = make_batch()
    batch["wsi_mask"][0, 20:] = False
    batch["genomics_mask"][1] = False
    model(**batch)
    counts = model.routing_counts()
    assert counts.shape == (3, config.n_experts)
    k = config.top_k
    assert counts[MODALITY_CLS].sum() == k * 3
    assert counts[MODALITY_WSI].sum() == k * (32 + 32 + 20)  # training sees every token
    assert counts[MODALITY_GENOMICS].sum() == k * 5 * 2
    model.reset_routing_counts()
    assert torch.all(model.routing_counts() == 0)


def test_genomic_token_counts_count_real_pieces_by_position_in_training_only():
    """Patient 0 at offset 0 (positions 0-4), patient 1 at offset 8 with its last 2 pieces missing, patient 2
    without genomics: the counts are what the server weighs each genomic row by."""
    model = build(small_config()).train()
    batch = make_batch()
    batch["genomic_offset"] = torch.tensor([0, 8, 8])
    batch["genomics_mask"][1, 3:] = False
    batch["genomics_mask"][2] = False
    model(**batch)
    expected = torch.zeros(16, dtype=torch.float64)
    expected[0:5] += 1
    expected[8:11] += 1
    assert torch.equal(model.genomic_token_counts(), expected)
    model.eval()
    model(**batch)
    assert torch.equal(model.genomic_token_counts(), expected)  # inference counts nothing
    model.reset_routing_counts()
    assert torch.all(model.genomic_token_counts() == 0)
    assert "genomic_embed.token_counts" not in model.state_dict()  # statistics, not weights


def test_fused_dense_attention_equals_the_explicit_map():
    """The fused kernel (training, dense blocks) and the explicit map (FLOP counting) agree, gradients too."""
    config = small_config(acs=False, dropout=0.0)
    model = build(config).train()
    batch = make_batch()
    outputs = []
    for fused in (True, False):
        for module in model.modules():
            if isinstance(module, Attention):
                module.fused = fused
        model.zero_grad()
        torch.manual_seed(1)  # the same router noise for both runs
        out = model(**batch)
        out.hazard_logits.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        outputs.append((out.hazard_logits.detach(), out.cls_attention, grads))
    for fused_value, explicit_value in zip(outputs[0], outputs[1], strict=True):
        torch.testing.assert_close(fused_value, explicit_value, rtol=1e-4, atol=1e-5)
