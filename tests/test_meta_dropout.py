"""Meta-dropout (``MetaConfig.meta_dropout``, ``meta.options.meta_dropout``): learned per-channel dropout after each
BatchNorm layer, identity in eval mode, its logits adapted by the inner loop and meta-learned by ``meta_train``."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metaadv as ma
from metaadv import checkpoint as ckpt
from metaadv.functional import clone_buffers, state
from metaadv.meta.inner import adapt, inner_parameter_names
from metaadv.meta.options.meta_dropout import MetaDropout
from metaadv.models import SmallCNN

P = 0.2
START = math.log((1 - P) / P)  # logit(1 - p): every keep logit's initial value


def tiny(p: float = P) -> MetaDropout:
    torch.manual_seed(0)
    return MetaDropout(SmallCNN(image_size=8, hidden=16), p)


def images(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def logits_of(params) -> list[torch.Tensor]:
    return [v for k, v in params.items() if k.startswith("keep_logits.")]


def test_one_logit_per_channel_of_each_batchnorm_starting_at_logit_of_the_keep_probability():
    model = tiny()
    assert [tuple(v.shape) for v in model.keep_logits] == [(32,), (64,)]
    assert all(torch.allclose(v, torch.full_like(v, START)) for v in model.keep_logits)
    base_names = [f"model.{k}" for k, _ in model.model.named_parameters()]
    assert [k for k, _ in model.named_parameters()] == ["keep_logits.0", "keep_logits.1", *base_names]


def test_head_is_still_the_base_models_classifier():
    assert inner_parameter_names(tiny(), "head") == ["model.head.3.weight", "model.head.3.bias"]


def test_eval_mode_is_the_base_model_bit_for_bit():
    model, (x, _) = tiny().eval(), images()
    expected = model.model(x)
    assert torch.equal(model(x), expected)
    params, buffers = state(model)
    assert torch.equal(functional_call(model, {**params, **buffers}, (x,)), expected)


def test_training_mode_is_random_and_the_base_model_alone_stays_plain():
    model, (x, _) = tiny().train(), images()
    assert not torch.equal(model(x), model(x))  # a fresh mask per forward pass
    base = model.model
    assert torch.equal(base(x), base(x))  # no hooks left on the base model outside the wrapper's forward
    torch.manual_seed(3)
    first = model(x)
    torch.manual_seed(3)
    assert torch.equal(model(x), first)  # the noise is the global RNG's: a seed repeats it


def test_mask_is_inverted_dropout_dropping_about_p_of_the_channels():
    norm = nn.BatchNorm1d(8)
    model = MetaDropout(nn.Sequential(norm), P).train()
    norm.eval()  # normalize with the running statistics (0, 1): every feature is 1 / sqrt(1 + eps) before the mask
    with torch.no_grad():
        scaled_mask = model(torch.ones(4000, 8)) * math.sqrt(1 + norm.eps)  # m / k, (4000, 8)
    assert abs(float(scaled_mask.mean()) - 1) < 0.02  # E[m / k] ~ 1
    dropped = float((scaled_mask * (1 - P) < 0.5).float().mean())  # m < 1/2 exactly when u < 1 - k = p
    assert abs(dropped - P) < 0.02


def test_the_logits_receive_a_gradient_through_functional_call():
    model, (x, y) = tiny().train(), images()
    params, buffers = state(model)
    shifted = {k: v + 0.5 if k.startswith("keep_logits.") else v for k, v in params.items()}
    leaves = logits_of(shifted)
    loss = F.cross_entropy(functional_call(model, {**shifted, **buffers}, (x,)), y)
    grads = torch.autograd.grad(loss, leaves)
    assert all(float(g.abs().max()) > 0 for g in grads)
    torch.manual_seed(0)
    at_start = functional_call(model, {**params, **buffers}, (x,))
    torch.manual_seed(0)
    assert not torch.equal(functional_call(model, {**shifted, **buffers}, (x,)), at_start)  # the given logits count
    model.eval()
    loss = F.cross_entropy(functional_call(model, {**shifted, **buffers}, (x,)), y)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(loss, leaves))  # eval: no effect


def test_the_inner_loop_adapts_the_logits_unless_only_the_head_adapts():
    model, (x, y) = tiny().train(), images()
    start = logits_of(dict(model.named_parameters()))
    adapted = logits_of(adapt(model, x, y, steps=2, lr=0.5))
    assert all(not torch.equal(a, s) for a, s in zip(adapted, start, strict=True))
    head_only = logits_of(adapt(model, x, y, steps=2, lr=0.5, inner_params="head"))
    assert all(torch.equal(a, s) for a, s in zip(head_only, start, strict=True))
    model.eval()  # evaluate's "sgd" adaptation: all parameters, eval mode; the logits stay where they are
    evaluated = adapt(model, x, y, buffers=clone_buffers(dict(model.named_buffers())), lr=0.5, first_order=True)
    assert all(torch.equal(a, s) for a, s in zip(logits_of(evaluated), start, strict=True))


def test_evaluate_sees_the_base_model_even_with_all_parameters_adapted():
    model, data = tiny(), images(12)
    settings = {"adapt_shots": 4, "adapt_steps": 2, "adapt_lr": 0.5, "adapt_methods": ("sgd", "bn")}
    wrapped = ma.evaluate(model, data, ["fgsm(eps=0.1)"], **settings).to_dict()
    plain = ma.evaluate(model.model, data, ["fgsm(eps=0.1)"], **settings).to_dict()
    assert {k: v for k, v in wrapped.items() if k != "seconds"} == {k: v for k, v in plain.items() if k != "seconds"}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": nn.Sequential(nn.Linear(3, 2))}, ValueError, "has none"),
        ({"p": 0.0}, ValueError, "p must be > 0"),
        ({"p": 1.0}, ValueError, r"p must be in \(0, 1\)"),
        ({"temperature": 0}, ValueError, "temperature"),
        ({"model": "SmallCNN"}, TypeError, "model must be a torch.nn.Module"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    arguments = {"model": SmallCNN(image_size=8, hidden=16), "p": P, **kwargs}
    with pytest.raises(error, match=match):
        MetaDropout(**arguments)


def tiny_run(tmp_path=None, steps=2, resume=False, **options):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    torch.manual_seed(0)
    model = SmallCNN(hidden=16)
    tasks = ma.AttackDistribution(["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2)"], seed=0)
    cfg = ma.MetaConfig(tasks_per_batch=1, support_size=4, query_size=4, steps=steps, inner_lr=0.05, **options)
    where = {"checkpoint_dir": tmp_path, "checkpoint_every": 1, "resume": resume} if tmp_path else {}
    return model, ma.meta_train(model, (x, y), tasks, cfg, progress=False, **where)


def test_meta_train_meta_learns_the_logits_and_zero_leaves_the_model_unwrapped():
    model, result = tiny_run(meta_dropout=P)
    assert isinstance(result.model, MetaDropout) and result.model.model is model and not result.model.training
    assert all(float((v.detach() - START).abs().max()) > 1e-4 for v in result.model.keep_logits)
    plain, plain_result = tiny_run(meta_dropout=0.0)
    assert plain_result.model is plain
    assert not torch.equal(model.head[3].weight, plain.head[3].weight)  # the masks changed the training


def test_resume_equals_an_uninterrupted_run(tmp_path):
    _, whole = tiny_run(steps=3, meta_dropout=P)
    tiny_run(tmp_path, steps=1, meta_dropout=P)
    with pytest.raises(ckpt.CheckpointError):
        tiny_run(tmp_path, steps=3, resume=True)  # a run without meta-dropout cannot continue this one
    _, resumed = tiny_run(tmp_path, steps=3, resume=True, meta_dropout=P)
    expected = whole.model.state_dict()
    assert set(resumed.model.state_dict()) == set(expected)
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, expected[k]), k
