"""The grouped expert path equals the dense-loop reference; routing, aux losses and parameter counts."""

import pytest
import torch

import kiln
from kiln.models.moe import (
    MoE,
    grouped_experts,
    load_balancing_loss,
    reference_experts,
    route,
    router_z_loss,
)


def _config(num_experts=8, top_k=2, **overrides):
    values = dict(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=40,
        num_experts=num_experts,
        num_experts_per_token=top_k,
        moe_intermediate_size=24,
    )
    return kiln.ModelConfig(**{**values, **overrides})


def _moe(config, seed=0):
    torch.manual_seed(seed)
    layer = MoE(config)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.3)
    return layer


def _grads(layer, x, reference):
    layer.use_reference = reference
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize(
    "num_experts,top_k,shared", [(3, 1, 0), (3, 2, 1), (8, 1, 0), (8, 2, 0), (8, 2, 2), (5, 3, 1)]
)
def test_grouped_matches_reference_forward_and_gradients(num_experts, top_k, shared):
    config = _config(num_experts, top_k, num_shared_experts=shared, shared_expert_gate=shared == 1)
    layer = _moe(config).train()
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
    out, x_grad, grads = _grads(layer, x, reference=False)
    ref_out, ref_x_grad, ref_grads = _grads(layer, x, reference=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_grad, ref_x_grad, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_experts_without_tokens_get_zero_gradients():
    layer = _moe(_config(8, 2))
    with torch.no_grad():  # the router sends every token to experts 2 and 5 only
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0
        layer.router.weight[5] = 0.5
    x = torch.rand(2, 5, 32) + 0.1
    out, x_grad, grads = _grads(layer, x, reference=False)
    ref_out, ref_x_grad, ref_grads = _grads(layer, x, reference=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_grad, ref_x_grad, atol=1e-5, rtol=1e-5)
    idle = [e for e in range(8) if e not in (2, 5)]
    for name in ("gate_proj", "up_proj", "down_proj"):
        grad = grads[f"experts.{name}"]
        assert grad[idle].abs().max() == 0 and grad[[2, 5]].abs().max() > 0
        torch.testing.assert_close(grad, ref_grads[f"experts.{name}"], atol=1e-5, rtol=1e-5)


def test_grouped_result_of_a_token_is_the_same_in_any_batch_to_round_off():
    layer = _moe(_config(8, 2)).eval()
    x = torch.randn(40, 32)
    with torch.no_grad():
        probs, weights, ids = route(layer.router(x), 2, True)
        full = grouped_experts(x, ids, weights, layer.experts)
        for start, stop in [(0, 1), (3, 4), (5, 17), (39, 40)]:
            part = grouped_experts(x[start:stop], ids[start:stop], weights[start:stop], layer.experts)
            torch.testing.assert_close(part, full[start:stop], atol=1e-5, rtol=1e-5)
        assert torch.allclose(full, reference_experts(x, ids, weights, layer.experts), atol=1e-5)


def test_router_renormalisation_and_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs, weights, ids = route(logits, 2, renormalize=False)
    assert ids.tolist() == [[0, 1]] and torch.allclose(weights, probs[:, :2])
    _, renormalised, _ = route(logits, 2, renormalize=True)
    assert torch.allclose(renormalised.sum(-1), torch.ones(1))
    assert torch.allclose(renormalised, weights / weights.sum())


def test_load_balancing_loss_is_k_when_uniform_and_larger_when_skewed():
    num_experts, top_k = 4, 2
    probs = torch.full((8, num_experts), 1 / num_experts)
    ids = torch.tensor([[0, 1], [2, 3]] * 4)
    assert load_balancing_loss(probs, ids).item() == pytest.approx(top_k)
    skewed_probs = torch.tensor([[0.7, 0.2, 0.05, 0.05]] * 8)
    skewed_ids = torch.tensor([[0, 1]] * 8)
    assert load_balancing_loss(skewed_probs, skewed_ids).item() == pytest.approx(4 * (0.7 + 0.2))
    # per sequence: two sequences of 4 tokens, each the mean of its own loss
    both = torch.cat([probs[:4], skewed_probs[:4]]), torch.cat([ids[:4], skewed_ids[:4]])
    assert load_balancing_loss(*both, num_sequences=2).item() == pytest.approx((top_k + 3.6) / 2)


def test_aux_losses_of_sequence_shards_equal_the_whole_sequences_loss_and_gradient():
    """Under sequence parallelism each rank holds a slice of every sequence and sums the statistics of
    all slices (`sum_over_shards`): the loss, and each slice's gradient, are the whole sequences'."""
    num_sequences, length, num_experts, top_k = 3, 8, 5, 2
    torch.manual_seed(0)
    logits = torch.randn(num_sequences, length, num_experts, requires_grad=True)

    def losses(part, sum_over_shards=None):
        rows = part.reshape(-1, num_experts)
        probs, _, ids = route(rows, top_k, renormalize=True)
        balance = load_balancing_loss(probs, ids, num_sequences, sum_over_shards)
        return balance + router_z_loss(rows, sum_over_shards)

    whole = losses(logits)
    whole.backward()
    first, second = logits.detach()[:, : length // 2], logits.detach()[:, length // 2 :]
    recorded = []
    losses(second, lambda t: recorded.append(t.detach()) or t)  # the other rank's statistics
    first = first.clone().requires_grad_()
    sharded = losses(first, lambda t: t + recorded.pop(0))
    sharded.backward()
    assert not recorded
    assert sharded.item() == pytest.approx(whole.item(), rel=1e-6)
    assert torch.allclose(first.grad, logits.grad[:, : length // 2], atol=1e-7)


def test_aux_losses_are_recorded_in_training_only_and_reach_the_router():
    config = _config(4, 2, router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    torch.manual_seed(0)
    model = kiln.Transformer(config).train()
    ids = torch.randint(0, 64, (2, 9))
    model(ids)
    aux = model.moe_aux_loss()
    assert aux is not None and aux.item() > 0
    aux.backward()
    assert model.layers[0].mlp.router.weight.grad.abs().max() > 0
    counts = model.layers[0].mlp.last_expert_counts
    assert counts.sum().item() == 2 * 9 * 2
    model.eval()
    model(ids)
    assert model.moe_aux_loss() is None


def test_parameter_counts_total_and_active():
    config = _config(8, 2, num_shared_experts=1, shared_expert_gate=True, dense_layers=[1])
    model = kiln.Transformer(config)
    assert isinstance(model.layers[0].mlp, MoE) and not isinstance(model.layers[1].mlp, MoE)
    assert config.num_parameters() == model.num_parameters()
    idle = 6 * 3 * 32 * 24  # one MoE layer, 6 experts not in the top-2
    assert config.num_active_parameters() == config.num_parameters() - idle


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(num_experts=1), "num_experts"),
        (dict(num_experts=4, num_experts_per_token=5), "num_experts_per_token"),
        (dict(num_experts=4, dense_layers=[2]), "dense_layers"),
        (dict(num_experts=4, mlp="plain"), "gated"),
    ],
)
def test_invalid_moe_configs_are_refused(overrides, match):
    with pytest.raises(kiln.KilnError, match=match):
        _config(**overrides)
