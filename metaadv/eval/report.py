"""``RobustnessReport``: one model's accuracies on one evaluation set, zero-shot and adapted; JSON and markdown."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RobustnessReport"]


@dataclass(frozen=True)
class RobustnessReport:
    """Accuracies in [0, 1] of one model on one evaluation set; attacks are named by their canonical spec."""

    clean_acc: float  # accuracy on the clean evaluation examples
    per_attack: dict[str, float]  # spec -> accuracy on that attack's adversarial examples (all points)
    union_acc: float  # fraction correct on clean inputs AND under every attack
    n_examples: int  # evaluation examples (the support pool is disjoint from them)
    attacks: tuple[str, ...]  # specs, in the order given
    adapt_shots: int = 0  # support examples per attack for few-shot adaptation (0: zero-shot only)
    adapted: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> spec -> accuracy
    adapted_union: dict[str, float] = field(default_factory=dict)  # method -> union over per-attack models
    adapted_clean: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> spec -> clean acc
    seconds: float = 0.0  # wall-clock time of the evaluation
    meta: dict[str, Any] = field(default_factory=dict)  # seed, torch version, device, options

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of JSON types (``attacks`` as a list)."""
        d = dataclasses.asdict(self)
        d["attacks"] = list(self.attacks)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RobustnessReport:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown RobustnessReport fields {sorted(unknown)}; expected {sorted(names)}")
        return cls(**{**d, "attacks": tuple(d.get("attacks", ()))})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str) -> RobustnessReport:
        return cls.from_dict(json.loads(s))

    def to_markdown(self) -> str:
        """A table in percent: rows clean, each attack, union; columns zero-shot and ``method@shots``.

        The clean row of an adaptation column is the mean clean accuracy over the per-attack adapted models.
        """
        methods = list(self.adapted)
        header = ["", "zero-shot", *(f"{m}@{self.adapt_shots}" for m in methods)]

        def pct(v: float | None) -> str:
            return "–" if v is None else f"{100 * v:.1f}"

        def mean(values: Mapping[str, float]) -> float | None:
            return sum(values.values()) / len(values) if values else None

        rows = [["clean", pct(self.clean_acc), *(pct(mean(self.adapted_clean.get(m, {}))) for m in methods)]]
        for spec in self.attacks:
            name = "`" + spec.replace("|", "\\|") + "`"
            rows.append([name, pct(self.per_attack[spec]), *(pct(self.adapted[m].get(spec)) for m in methods)])
        rows.append(["union", pct(self.union_acc), *(pct(self.adapted_union.get(m)) for m in methods)])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        note = f"\nAccuracy (%) on {self.n_examples} evaluation examples."
        if methods:
            note += (
                f" `method@{self.adapt_shots}`: each attack re-run against the model adapted to "
                f"{self.adapt_shots} of its adversarial examples; clean: mean over those models."
            )
        lines.append(note)
        return "\n".join(lines)
