"""Configuration: ``LoopConfig`` (the training loop every method shares), ``MetaConfig`` (the meta-training
algorithm, with its loop settings beside it) and ``RunConfig`` (a whole CLI run from YAML/JSON).

Every field is validated on construction; errors name the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .validation import is_int

__all__ = ["LOOP_FIELDS", "OPTIMIZERS", "LoopConfig", "MetaConfig", "RunConfig", "load_run_config", "read_config_file",
           "run_config_from"]  # fmt: skip

OPTIMIZERS = ("adam", "sgd")  # the optimizers every method may use (see engine.make_optimizer)
_QUERY_ATTACK = ("meta", "adapted")
INNER_PARAMS = ("all", "head", "bn")  # what the inner loop adapts (see inner.inner_parameter_names)
TASK_ENCODINGS = ("none", "type", "support")  # where FiLM's task code comes from (see film.py)
TASK_AGGREGATIONS = ("mean", "max", "softmax")  # how the tasks' query losses are weighted (see worst_case.py)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


@dataclass(frozen=True)
class LoopConfig:
    """The training loop's settings, the same for every method (``metaadv.train``, ``engine.fit``)."""

    epochs: int = 3  # passes over the training data (the last incomplete batch of an epoch is dropped)
    steps: int | None = None  # if set, the number of optimizer steps (overrides epochs)
    batch_size: int = 128  # clean training examples consumed by one step
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9)
    lr: float = 1e-3  # learning rate
    weight_decay: float = 0.0  # the optimizer's weight decay
    seed: int = 0  # seeds the data order (and, for each method, its own randomness)
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...
    log_every: int = 10  # log a line and read the steps' values from the device every this many steps
    max_bad_steps: int | None = 5  # stop after this many consecutive non-finite steps (each skipped); None: never
    deterministic: bool = False  # GPU: deterministic cuDNN/cuBLAS kernels (slower); CPU runs repeat exactly anyway

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "log_every"):
            _require(self, name, is_int(getattr(self, name)) and getattr(self, name) >= 1, "an integer >= 1")
        _require(self, "steps", self.steps is None or (is_int(self.steps) and self.steps >= 1), "None or >= 1")
        _require(self, "max_bad_steps", self.max_bad_steps is None or (is_int(self.max_bad_steps)
                 and self.max_bad_steps >= 1), "None or an integer >= 1")  # fmt: skip
        _require(self, "seed", is_int(self.seed) and self.seed >= 0, "an integer >= 0")
        _require(self, "lr", _is_num(self.lr) and self.lr > 0, "a number > 0")
        _require(self, "weight_decay", _is_num(self.weight_decay) and self.weight_decay >= 0, "a number >= 0")
        _require(self, "optimizer", self.optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}")
        _require(self, "deterministic", isinstance(self.deterministic, bool), "True or False")
        _require(self, "device", isinstance(self.device, str) and self.device != "", "'auto', 'cpu' or 'cuda[:i]'")


def _require(config: Any, name: str, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{type(config).__name__}.{name} must be {allowed}, got {getattr(config, name)!r}")


# MetaConfig field -> the LoopConfig field it is (a meta-step's batch size is derived: ``examples_per_step``).
LOOP_FIELDS = {"outer_optimizer": "optimizer", "outer_lr": "lr", "weight_decay": "weight_decay", "epochs": "epochs",
               "steps": "steps", "seed": "seed", "device": "device", "log_every": "log_every",
               "max_bad_steps": "max_bad_steps", "deterministic": "deterministic"}  # fmt: skip


@dataclass(frozen=True)
class MetaConfig:
    """Hyper-parameters of meta-adversarial training (one meta-step = sample tasks -> support/query ->
    inner loop -> query loss -> outer update)."""

    tasks_per_batch: int = 2  # tasks (attack types) sampled per meta-step
    support_size: int = 32  # clean examples per task turned into its adversarial support set
    query_size: int = 32  # clean examples per task turned into its adversarial query set (disjoint)
    sample_replace: bool = False  # sample tasks with replacement (needed if tasks_per_batch > #types)
    inner_steps: int = 1  # SGD steps of the inner loop on each task's support set
    inner_lr: float = 0.01  # inner-loop learning rate
    first_order: bool = False  # True: first-order MAML (inner gradients detached); False: exact second order
    query_attack: str = "meta"  # craft query examples against "meta" (the meta-parameters) or "adapted" copies
    clean_weight: float = 0.0  # fraction w of the query loss on clean examples: (1-w)*L_adv + w*L_clean
    outer_optimizer: str = "adam"  # meta-optimizer: "adam" or "sgd" (momentum 0.9)
    outer_lr: float = 1e-3  # meta learning rate
    weight_decay: float = 0.0  # meta-optimizer weight decay
    epochs: int = 3  # passes over the training data (one meta-step uses tasks*(support+query) examples)
    steps: int | None = None  # if set, the number of meta-steps (overrides epochs)
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...
    seed: int = 0  # seeds model-independent randomness: data order, task sampling, attack starts
    log_every: int = 10  # log a line and read the steps' values from the device every this many meta-steps
    max_bad_steps: int = 5  # stop after this many consecutive meta-steps with a non-finite loss/gradient (each skipped)
    deterministic: bool = False  # GPU: deterministic cuDNN/cuBLAS kernels (slower); CPU runs repeat exactly anyway
    batched: bool = True  # task-batched meta-step (every device); False: the looped reference, one task at a time
    vmap_tasks: bool | None = None  # batched step's T forward passes: vmapped, looped, None: vmapped on CUDA only
    # Inner-loop options (docs/meta_options.md); the defaults are plain MAML.
    inner_params: str = "all"  # adapted in the inner loop: "all", "head" (ANIL) or "bn" (BatchNorm affine only)
    proximal: float = 0.0  # lambda >= 0: the inner loss is L_support(theta') + lambda * ||theta' - theta||^2
    first_order_until: int = 0  # meta-steps 0..N-1 first order, then second order (MAML++); first_order wins
    learn_inner_lr: bool = False  # Meta-SGD: a learned step size per parameter entry, initialized to inner_lr
    # Outer-loop options (docs/meta_options.md).
    task_attention: bool = False  # weight the tasks' query losses by a learned attention network (else uniform 1/T)
    attention_entropy: float = 1.0  # tau > 0: the attention's entropy bonus; optimum softmax(L / tau)
    attention_lr: float = 0.01  # learning rate of the attention network (its own group of the meta-optimizer)
    task_bn: bool = False  # also keep BatchNorm running statistics per attack type (for evaluate's "task_bn")
    log_adaptation_gap: bool = False  # log each task's query accuracy at theta and its adapted-minus-theta gap
    zero_shot_weight: float = 0.0  # lambda >= 0: + lambda * the meta-parameters' adversarial support loss
    consistency_weight: float = 0.0  # lambda >= 0: + lambda * theta's symmetric KL across the tasks' attacks
    task_aggregation: str = "mean"  # task weights of the meta-loss: "mean", "max" (worst task), "softmax"
    aggregation_temperature: float = 1.0  # tau > 0 of task_aggregation="softmax"
    # Model conditioning and regularization options (docs/meta_options.md).
    task_encoding: str = "none"  # FiLM task code: "none", "type" (learned per type), "support" (inferred)
    encoding_dim: int = 8  # size of the task code fed to FiLM
    meta_dropout: float = 0.0  # p in [0, 1): learned per-channel dropout, adapted in the inner loop (0: off)
    per_step_bn: bool = False  # MAML++: BatchNorm running statistics per inner step (step 0 = at the meta-parameters)
    persistent_generator: bool = False  # generator(...) task types keep one generator each, trained across meta-steps
    # Performance options (docs/performance.md).
    reuse_every: int = 1  # R: craft a task type's adversarial sets at most every R meta-steps, reuse them between
    autocast_attacks: bool = False  # craft adversarial examples under bf16 autocast (the meta-gradient stays fp32)
    compile_attacks: str = "off"  # attacks' per-step gradient: "off", "compile" (torch.compile), "cudagraphs" (CUDA)

    def __post_init__(self) -> None:
        for name in ("tasks_per_batch", "support_size", "query_size", "epochs", "log_every", "max_bad_steps",
                     "reuse_every", "encoding_dim"):  # fmt: skip
            self._require(name, is_int(getattr(self, name)) and getattr(self, name) >= 1, "an integer >= 1")
        self._require("inner_steps", is_int(self.inner_steps) and self.inner_steps >= 0, "an integer >= 0")
        self._require("steps", self.steps is None or (is_int(self.steps) and self.steps >= 1), "None or >= 1")
        self._require("seed", is_int(self.seed) and self.seed >= 0, "an integer >= 0")
        for name in ("inner_lr", "outer_lr", "attention_entropy", "attention_lr"):
            self._require(name, _is_num(getattr(self, name)) and getattr(self, name) > 0, "a number > 0")
        self._require("weight_decay", _is_num(self.weight_decay) and self.weight_decay >= 0, "a number >= 0")
        self._require("clean_weight", _is_num(self.clean_weight) and 0 <= self.clean_weight <= 1, "in [0, 1]")
        self._require("proximal", _is_num(self.proximal) and self.proximal >= 0, "a number >= 0")
        for name in ("zero_shot_weight", "consistency_weight"):
            self._require(name, _is_num(getattr(self, name)) and getattr(self, name) >= 0, "a number >= 0")
        self._require("task_aggregation", self.task_aggregation in TASK_AGGREGATIONS, f"one of {TASK_AGGREGATIONS}")
        self._require("aggregation_temperature", _is_num(self.aggregation_temperature)
                      and self.aggregation_temperature > 0, "a number > 0")  # fmt: skip
        self._require("first_order_until", is_int(self.first_order_until) and self.first_order_until >= 0,
                      "an integer >= 0")  # fmt: skip
        self._require("inner_params", self.inner_params in INNER_PARAMS, f"one of {INNER_PARAMS}")
        for name in ("first_order", "sample_replace", "deterministic", "batched", "learn_inner_lr", "autocast_attacks",
                     "task_attention", "task_bn", "per_step_bn", "persistent_generator",
                     "log_adaptation_gap"):  # fmt: skip
            self._require(name, isinstance(getattr(self, name), bool), "True or False")
        self._require("vmap_tasks", self.vmap_tasks is None or isinstance(self.vmap_tasks, bool), "True, False or None")
        self._require("compile_attacks", self.compile_attacks in ("off", "compile", "cudagraphs"),
                      "'off', 'compile' or 'cudagraphs'")  # fmt: skip
        self._require("task_encoding", self.task_encoding in TASK_ENCODINGS, f"one of {TASK_ENCODINGS}")
        self._require("meta_dropout", _is_num(self.meta_dropout) and 0 <= self.meta_dropout < 1, "in [0, 1)")
        self._require("outer_optimizer", self.outer_optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}")
        self._require("query_attack", self.query_attack in _QUERY_ATTACK, f"one of {_QUERY_ATTACK}")
        self._require("device", isinstance(self.device, str) and self.device != "", "'auto', 'cpu' or 'cuda[:i]'")

    def _require(self, name: str, ok: bool, allowed: str) -> None:
        _require(self, name, ok, allowed)

    @property
    def loop(self) -> LoopConfig:
        """The training loop of this config: one meta-step per batch of ``examples_per_step`` examples, the
        meta-optimizer's settings as the loop's optimizer."""
        fields = {loop: getattr(self, meta) for meta, loop in LOOP_FIELDS.items()}
        return LoopConfig(batch_size=self.examples_per_step, **fields)

    def first_order_at(self, step: int | None) -> bool:
        """Whether meta-step ``step`` (0-based) uses first-order meta-gradients: ``first_order``, or
        ``step < first_order_until``. ``step=None`` is allowed only without a schedule (``first_order_until=0``)."""
        if step is None:
            if self.first_order_until:
                raise ValueError(
                    f"MetaConfig.first_order_until={self.first_order_until} needs the meta-step index: pass step="
                )
            return self.first_order
        return self.first_order or step < self.first_order_until

    @property
    def examples_per_step(self) -> int:
        """Clean examples consumed by one meta-step."""
        return self.tasks_per_batch * (self.support_size + self.query_size)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MetaConfig:
        """Build from a mapping, rejecting unknown keys by name."""
        return cls(**_known_fields(cls, values, "meta"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _known_fields(cls: type, values: Any, section: str) -> dict[str, Any]:
    if not isinstance(values, Mapping):
        raise TypeError(f"config section {section!r} must be a mapping, got {type(values).__name__}")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in values if k not in allowed)
    if unknown:
        raise ValueError(f"unknown {section} option(s) {unknown}; allowed: {sorted(allowed)}")
    return dict(values)


@dataclass(frozen=True)
class RunConfig:
    """A whole run, as the CLI reads it from YAML or JSON (sections: data, model, tasks, meta, eval, method,
    methods)."""

    data: str = "mnist5k"  # dataset name for metaadv.data.load
    data_root: str | None = None  # where torchvision datasets are stored
    model: dict[str, Any] = field(default_factory=lambda: {"name": "SmallCNN"})  # class in metaadv.models + kwargs
    tasks: dict[str, Any] = field(default_factory=dict)  # AttackDistribution kwargs: specs, weights, eps_ranges
    meta: MetaConfig = field(default_factory=MetaConfig)  # the meta methods' settings; its .loop: every method's loop
    eval: dict[str, Any] = field(default_factory=dict)  # metaadv.evaluate kwargs: attacks, n_examples, adapt_shots
    method: str = "meta"  # the training method, one of metaadv.methods() (`metaadv train --method` overrides it)
    # baseline name -> {attacks: [specs], its settings (e.g. clean_weight)}; attacks default to tasks.specs
    methods: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.data, str):
            raise TypeError(f"data must be a dataset name, got {self.data!r}")
        if not isinstance(self.model, Mapping) or not isinstance(self.model.get("name"), str):
            raise ValueError(f"model must be a mapping with a 'name' (e.g. SmallCNN), got {self.model!r}")
        specs = self.tasks.get("specs") if isinstance(self.tasks, Mapping) else None
        if not isinstance(specs, list) or not specs:
            raise ValueError(f"tasks.specs must be a non-empty list of attack specs, got {specs!r}")
        extra = set(self.tasks) - {"specs", "weights", "eps_ranges", "seed"}
        if extra:
            raise ValueError(f"unknown tasks option(s) {sorted(extra)}; allowed: specs, weights, eps_ranges, seed")
        self._check_methods()

    def _check_methods(self) -> None:
        from .training_methods import get, methods  # here: the registry imports this module

        if self.method not in methods():
            raise ValueError(f"method must be one of {methods()}, got {self.method!r}")
        if not isinstance(self.methods, Mapping):
            raise TypeError(
                f"methods must be a mapping of baseline name -> its attacks and settings, got {self.methods!r}"
            )
        for name, section in self.methods.items():
            if name not in methods() or get(name).meta:
                raise ValueError(f"methods: {name!r} is not a baseline (meta methods take the meta section); "
                                 f"baselines: {[m for m in methods() if not get(m).meta]}")  # fmt: skip
            if not isinstance(section, Mapping):
                raise TypeError(f"methods.{name} must be a mapping of attacks and settings, got {section!r}")
            unknown = sorted(set(section) - {"attacks", *get(name).settings})
            if unknown:
                raise ValueError(f"unknown methods.{name} option(s) {unknown}; allowed: "
                                 f"{['attacks', *sorted(get(name).settings)]}")  # fmt: skip
            attacks = section.get("attacks", [])
            if not isinstance(attacks, list) or not all(isinstance(a, str | Mapping) for a in attacks):
                raise ValueError(f"methods.{name}.attacks must be a list of attack specs, got {attacks!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunConfig:
        fields = _known_fields(cls, values, "top-level")
        fields["meta"] = MetaConfig.from_dict(fields.get("meta") or {})
        for section in ("model", "tasks", "eval", "methods"):
            if section in fields and not isinstance(fields[section], Mapping):
                raise TypeError(f"config section {section!r} must be a mapping, got {fields[section]!r}")
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "meta": self.meta.to_dict()}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a ``.yaml``/``.yml``/``.json`` config file; ValueError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    elif path.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
    else:
        raise ValueError(f"config file must end in .yaml, .yml or .json, got {path.name}")
    if not isinstance(values, Mapping):
        raise ValueError(f"{path}: the top level must be a mapping of sections, got {type(values).__name__}")
    return dict(values)


def run_config_from(values: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """A RunConfig from config sections; ``overrides`` update the meta section."""
    if overrides:
        values = {**values, "meta": {**(values.get("meta") or {}), **overrides}}
    return RunConfig.from_dict(values)


def load_run_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a RunConfig from a ``.yaml``/``.yml``/``.json`` file; ``overrides`` update the meta section."""
    return run_config_from(read_config_file(path), overrides)
