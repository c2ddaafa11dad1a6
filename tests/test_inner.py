"""The inner loop ``adapt``: its meta-gradient equals higher's and a hand-unrolled one; first order differs."""

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metaadv import adapt
from metaadv.functional import call, clone_buffers, state

LR, STEPS = 0.1, 2


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).double()


def task_data():
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.rand(8, 1, 8, 8, generator=g).double(), torch.rand(8, 1, 8, 8, generator=g).double()
    return xs, torch.randint(0, 3, (8,), generator=g), xq, torch.randint(0, 3, (8,), generator=g)


def metaadv_meta_grad(model, first_order=False):
    xs, ys, xq, yq = task_data()
    params, buffers = state(model)
    adapted = adapt(model, xs, ys, steps=STEPS, lr=LR, first_order=first_order)
    query = F.cross_entropy(call(model, adapted, clone_buffers(buffers), xq), yq)
    return torch.autograd.grad(query, list(params.values())), adapted


def higher_meta_grad(model):
    xs, ys, xq, yq = task_data()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(STEPS):
            diffopt.step(F.cross_entropy(fmodel(xs), ys))
        query = F.cross_entropy(fmodel(xq), yq)
        return torch.autograd.grad(query, list(model.parameters()))


def unrolled_meta_grad(model):
    xs, ys, xq, yq = task_data()
    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    fast = params
    for _ in range(STEPS):
        loss = F.cross_entropy(functional_call(model, {**fast, **buffers}, (xs,)), ys)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {k: p - LR * g for (k, p), g in zip(fast.items(), grads, strict=True)}
    query = F.cross_entropy(functional_call(model, {**fast, **buffers}, (xq,)), yq)
    return torch.autograd.grad(query, list(params.values()))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_second_order_meta_gradient_matches_higher_and_hand_unrolled(mode):
    model = bn_model().train(mode == "train")
    ours, _ = metaadv_meta_grad(model)
    for reference in (higher_meta_grad(model), unrolled_meta_grad(model)):
        for a, b in zip(ours, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_first_order_differs_and_equals_query_gradient_at_adapted_point():
    model = bn_model()
    second, _ = metaadv_meta_grad(model, first_order=False)
    first, adapted = metaadv_meta_grad(model, first_order=True)
    gap = max(float((a - b).abs().max()) for a, b in zip(first, second, strict=True))
    assert gap > 1e-6, "first-order MAML must drop the second-order term"

    _, _, xq, yq = task_data()
    at_adapted = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    query = F.cross_entropy(call(model, at_adapted, clone_buffers(dict(model.named_buffers())), xq), yq)
    expected = torch.autograd.grad(query, list(at_adapted.values()))
    for a, b in zip(first, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_adapt_leaves_the_model_untouched_and_moves_the_copy():
    model = bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xs, ys, _, _ = task_data()
    adapted = adapt(model, xs, ys, steps=3, lr=LR)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"adapt changed the model's {k}"
    assert any(not torch.equal(adapted[k], before[k]) for k in adapted)
    assert all(p.grad is None for p in model.parameters())


def test_adapt_with_zero_steps_is_the_identity_and_works_under_no_grad():
    model = bn_model().eval()
    xs, ys, _, _ = task_data()
    params = {k: v.detach() for k, v in model.named_parameters()}
    assert all(torch.equal(a, params[k]) for k, a in adapt(model, xs, ys, params=params, steps=0).items())
    with torch.no_grad():
        adapted = adapt(model, xs, ys, params=params, steps=1, first_order=True)
    assert any(not torch.equal(adapted[k], params[k]) for k in adapted)


def test_adapt_rejects_bad_arguments():
    model = bn_model()
    xs, ys, _, _ = task_data()
    with pytest.raises(ValueError, match="steps"):
        adapt(model, xs, ys, steps=-1)
    with pytest.raises(ValueError, match="lr"):
        adapt(model, xs, ys, lr=0.0)
    with pytest.raises(ValueError, match="missing"):
        adapt(model, xs, ys, params={"0.weight": model[0].weight})
