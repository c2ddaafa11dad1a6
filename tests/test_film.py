"""Task encoding with FiLM (``MetaConfig.task_encoding``, ``meta.options.film``): a fresh wrapper is the base model,
the code reaches the features and the meta-gradient reaches the code's own parameters, ``meta_train`` trains
them, ``evaluate`` infers a support-mode code from each attack's support set, and a resume repeats the run."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metaadv as ma
from metaadv import checkpoint as ckpt
from metaadv.functional import batchnorm_training, clone_buffers, detach, state
from metaadv.meta.inner import adapt, inner_parameter_names
from metaadv.meta.options.film import FiLM, encoding_of, task_code, with_code
from metaadv.meta.options.meta_dropout import MetaDropout
from metaadv.models import SmallCNN

N_TYPES, DIM = 3, 4


def tiny(encoding: str = "type") -> FiLM:
    torch.manual_seed(0)
    return FiLM(SmallCNN(image_size=8, hidden=16), N_TYPES, DIM, encoding)


def images(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def with_random_films(model: FiLM, std: float = 0.5) -> FiLM:
    """The FiLM Linears moved away from their zero start, so the code changes the output."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.films.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def coded_logits(model: FiLM, params, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    buffers = dict(model.named_buffers())
    return functional_call(model, {**params, **with_code(buffers, code)}, (x,))


def test_a_fresh_wrapper_is_the_base_model_bit_for_bit():
    for encoding in ("type", "support"):
        model, (x, _) = tiny(encoding), images()
        for mode in (True, False):
            model.train(mode)
            base = copy.deepcopy(model.model)  # its BatchNorm statistics move as the wrapper's do
            assert torch.equal(model(x), base(x))
        params = dict(model.named_parameters())
        code = torch.randn(DIM)
        assert torch.equal(coded_logits(model.eval(), params, x, code), model.model(x))  # W = b = 0: no effect


def test_names_and_head_are_the_base_models():
    model = tiny()
    base_names = [f"model.{k}" for k, _ in model.model.named_parameters()]
    films = [f"films.{i}.{p}" for i in range(2) for p in ("weight", "bias")]
    assert [k for k, _ in model.named_parameters()] == ["embedding", *films, *base_names]
    assert inner_parameter_names(model, "head") == ["model.head.3.weight", "model.head.3.bias"]
    assert [tuple(f.weight.shape) for f in model.films] == [(64, DIM), (128, DIM)]  # (gamma, beta) per channel
    assert torch.equal(model.task_code, torch.zeros(DIM))  # the unknown code
    assert encoding_of(model) == "type" and encoding_of(tiny("support")) == "support"
    assert encoding_of(model.model) == "none" and encoding_of(MetaDropout(model, 0.2)) == "type"


def test_the_code_modulates_the_features_once_the_films_are_trained():
    model, (x, _) = with_random_films(tiny()).eval(), images()
    params = dict(model.named_parameters())
    zero, first, second = (coded_logits(model, params, x, task_code(model, params, type_index=i)) for i in (3, 0, 1))
    assert torch.equal(zero, model(x))  # the unknown type's code is the buffer's zeros
    assert not torch.equal(first, zero) and not torch.equal(first, second)
    base = model.model
    assert torch.equal(base(x), base(x)) and not torch.equal(base(x), zero)  # no hooks left on the base model
    # h * (1 + gamma) + beta after the first BatchNorm, by hand
    code = params["embedding"][0]
    gamma, beta = model.films[0](code).view(2, 1, -1, 1, 1)
    h = base.features[1](base.features[0](x))
    second_gamma, second_beta = model.films[1](code).view(2, 1, -1, 1, 1)
    hook = base.features[5].register_forward_hook(lambda m, i, out: out * (1 + second_gamma) + second_beta)
    try:
        hand = base.head(base.features[2:](h * (1 + gamma) + beta))
    finally:
        hook.remove()
    torch.testing.assert_close(first, hand, rtol=0, atol=1e-6)


def test_the_meta_gradient_reaches_the_embedding_row_and_the_encoder_through_functional_call():
    model, (x, y) = with_random_films(tiny()).train(), images()
    params = dict(model.named_parameters())
    loss = F.cross_entropy(coded_logits(model, params, x, task_code(model, params, type_index=1)), y)
    grad = torch.autograd.grad(loss, params["embedding"])[0]
    assert float(grad[1].abs().max()) > 0 and torch.equal(grad[[0, 2]], torch.zeros(2, DIM))

    model = with_random_films(tiny("support")).train()
    params = dict(model.named_parameters())
    code = task_code(model, params, support_adv=(x + 0.1).clamp(0, 1), support_clean=x)
    loss = F.cross_entropy(coded_logits(model, params, x, code), y)
    encoder = [v for k, v in params.items() if k.startswith("encoder.")]
    assert all(float(g.abs().max()) > 0 for g in torch.autograd.grad(loss, encoder))


def test_support_codes_tell_attacks_apart_and_no_support_is_the_unknown_code():
    model, (x, y) = tiny("support").eval(), images()
    params, buffers = state(model)
    fn = lambda v: functional_call(model, {**params, **buffers}, (v,))  # noqa: E731
    codes = [task_code(model, params, support_adv=ma.attacks.make(a)(fn, x, y), support_clean=x)
             for a in ("fgsm(eps=0.3)", "pgd_l2(eps=1.0, steps=3)")]  # fmt: skip
    assert codes[0].shape == (DIM,) and float((codes[0] - codes[1]).detach().abs().max()) > 1e-4
    assert torch.equal(task_code(model, params), torch.zeros(DIM))


def test_the_inner_loop_adapts_all_parameters_and_leaves_the_code_parameters_alone():
    model, (x, y) = with_random_films(tiny()).train(), images()
    params, buffers = state(model)
    code = task_code(model, detach(params), type_index=0)  # a fixed code: the embedding is not in the forward pass
    adapted = adapt(model, x, y, buffers=with_code(clone_buffers(buffers), code), steps=2, lr=0.5)
    assert torch.equal(adapted["embedding"], params["embedding"])  # held in the graph with a zero gradient
    assert not torch.equal(adapted["films.0.weight"], params["films.0.weight"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": nn.Sequential(nn.Linear(3, 2))}, ValueError, "has none"),
        ({"model": "SmallCNN"}, TypeError, "model must be a torch.nn.Module"),
        ({"n_types": 0}, ValueError, "n_types"),
        ({"dim": 2.5}, TypeError, "dim must be an integer"),
        ({"encoding": "none"}, ValueError, "encoding must be one of"),
        ({"model": nn.Sequential(nn.BatchNorm1d(3)), "encoding": "support"}, ValueError, "pass in_channels"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    arguments = {"model": SmallCNN(image_size=8, hidden=16), "n_types": N_TYPES, **kwargs}
    with pytest.raises(error, match=match):
        FiLM(**arguments)


def test_bad_codes_are_refused():
    model, (x, _) = tiny(), images()
    params, buffers = state(model)
    with pytest.raises(ValueError, match="type_index must be in"):
        task_code(model, params, type_index=N_TYPES + 1)
    with pytest.raises(ValueError, match="reads type_index"):
        task_code(model, params, support_adv=x, support_clean=x)
    with pytest.raises(TypeError, match="needs a FiLM model"):
        task_code(model.model, params, type_index=0)
    support = tiny("support")
    with pytest.raises(ValueError, match="both be given"):
        task_code(support, dict(support.named_parameters()), support_adv=x)
    with pytest.raises(ValueError, match="shape"):
        with_code(buffers, torch.zeros(DIM + 1))
    with pytest.raises(ValueError, match="one FiLM task code"):
        with_code(dict(model.model.named_buffers()), torch.zeros(DIM))


# meta_train and evaluate -----------------------------------------------------------------------------------------

SPECS = ["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2)", "pgd_l2(eps=1.5, steps=2)"]


def tiny_run(tmp_path=None, steps=2, resume=False, **options):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    torch.manual_seed(0)
    model = SmallCNN(hidden=16)
    tasks = ma.AttackDistribution(SPECS, seed=0)
    cfg = ma.MetaConfig(tasks_per_batch=1, support_size=4, query_size=4, steps=steps, inner_lr=0.05, **options)
    where = {"checkpoint_dir": tmp_path, "checkpoint_every": 1, "resume": resume} if tmp_path else {}
    return model, ma.meta_train(model, (x, y), tasks, cfg, progress=False, **where)


def as_in_meta_train(encoding: str) -> FiLM:
    """The wrapper ``tiny_run`` starts from: meta_train seeds the RNG with config.seed (0), then wraps."""
    base = SmallCNN(hidden=16)
    torch.manual_seed(0)
    return FiLM(base, N_TYPES, DIM, encoding)


def test_meta_train_learns_the_sampled_types_codes_and_none_leaves_the_model_unwrapped():
    model, result = tiny_run(task_encoding="type", encoding_dim=DIM)
    film = result.model
    assert isinstance(film, FiLM) and film.model is model and not film.training and film.encoding == "type"
    assert all(float(p.detach().abs().max()) > 0 for p in film.films.parameters())  # moved off their zero start
    start = as_in_meta_train("type").embedding.detach()
    names = [a.name for a in ma.AttackDistribution(SPECS, seed=0).types]
    sampled = {names.index(n) for record in result.history for n in record["task_names"]}
    assert 0 < len(sampled) < N_TYPES  # 1 task per step, 2 steps, 3 types
    for i in range(N_TYPES):  # a code reaches the loss (through the FiLM Linears' inner step) only for its type
        assert torch.equal(film.embedding[i].detach(), start[i]) is (i not in sampled), i
    plain, plain_result = tiny_run()
    assert plain_result.model is plain
    assert not torch.equal(model.head[3].weight, plain.head[3].weight)  # the codes changed the training


def test_meta_train_support_mode_trains_the_encoder_and_composes_with_meta_dropout():
    start = as_in_meta_train("support").encoder.state_dict()
    _, result = tiny_run(task_encoding="support", encoding_dim=DIM)
    trained = result.model.encoder.state_dict()
    assert all(not torch.equal(trained[k], v) for k, v in start.items())  # the query loss reached the encoder
    _, both = tiny_run(steps=1, task_encoding="type", encoding_dim=DIM, meta_dropout=0.2)
    assert isinstance(both.model, MetaDropout) and isinstance(both.model.model, FiLM)
    assert all(r["loss"] == r["loss"] for r in both.history)  # finite


def test_evaluate_adapts_a_support_model_at_the_inferred_code_and_zero_shot_at_the_unknown_code():
    model = with_random_films(tiny("support"), std=2.0).eval()
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), batchnorm_training(model, cumulative=True):
        model.encoder[-1].weight.mul_(50)  # codes of order 1 from perturbations of order eps
        model(x)  # BatchNorm statistics of x: predictions that depend on the input
    with torch.no_grad():
        y = model(x).argmax(1)  # the labels the model gives at the unknown code
    blind = copy.deepcopy(model)  # its encoder infers code 0 from any support set
    with torch.no_grad():
        blind.encoder[-1].weight.zero_()
        blind.encoder[-1].bias.zero_()
    settings = {"adapt_shots": 8, "adapt_steps": 0, "adapt_methods": ("sgd",)}  # 0 steps: only the code changes
    attacks = ["fgsm(eps=0.3)", "pgd_l2(eps=1.5, steps=3)"]
    coded, zero = (ma.evaluate(m, (x, y), attacks, **settings) for m in (model, blind))
    assert coded.clean_acc == zero.clean_acc == 1.0 and coded.per_attack == zero.per_attack  # zero-shot: code 0
    assert set(zero.adapted_clean["sgd"].values()) == {1.0}
    assert all(acc < 1.0 for acc in coded.adapted_clean["sgd"].values())  # each attack's own inferred code


def test_resume_equals_an_uninterrupted_run(tmp_path):
    _, whole = tiny_run(steps=3, task_encoding="type", encoding_dim=DIM)
    tiny_run(tmp_path, steps=1, task_encoding="type", encoding_dim=DIM)
    with pytest.raises(ckpt.CheckpointError):
        tiny_run(tmp_path, steps=3, resume=True)  # a run without task encoding cannot continue this one
    _, resumed = tiny_run(tmp_path, steps=3, resume=True, task_encoding="type", encoding_dim=DIM)
    expected = whole.model.state_dict()
    assert set(resumed.model.state_dict()) == set(expected)
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_a_saved_run_with_film_and_meta_dropout_loads_back_for_the_cli(tmp_path):
    from metaadv.runs import load_run, save_run

    _, result = tiny_run(steps=1, task_encoding="support", encoding_dim=DIM, meta_dropout=0.2)
    meta = ma.MetaConfig(tasks_per_batch=1, support_size=4, query_size=4, steps=1, inner_lr=0.05,
                         task_encoding="support", encoding_dim=DIM, meta_dropout=0.2)  # fmt: skip
    cfg = ma.RunConfig(model={"name": "SmallCNN", "hidden": 16}, tasks={"specs": SPECS}, meta=meta)
    save_run(tmp_path, cfg, result)
    _, loaded, _ = load_run(tmp_path)  # the wrappers are rebuilt from the config before the weights load
    assert isinstance(loaded, MetaDropout) and isinstance(loaded.model, FiLM)
    x, _ = images()
    x = torch.nn.functional.interpolate(x, size=28)
    assert torch.equal(loaded(x), result.model(x))
