"""The looks of an until-decided sweep: what each look saw and decided, kept in the sweep's location.

    <location>/until_decided.json   {"study", "reference", "settings", "looks": [look, ...]}

It lies beside the sweep's other resume bookkeeping (``mlflow_run.json``, the trials' ``trial_done.json``),
in storage when the sweep has one, so that ``--resume`` on any node continues the same sequence: the look
after the last one recorded, never one again and none skipped. ``settings`` are what the guarantee of the
sequence depends on (alpha, margin, the sequence's precision, the initial seeds, the variants); a resume
under other settings is refused (`LookBook.check`).

A look (`Look`): ``look`` (1, 2, ...), ``seeds`` (variant -> the seeds 0..k-1 it had), ``comparisons`` (one
per variant but the reference: n, mean, std, low, high (null: unbounded), decision, method, seeds_needed),
``spent_h`` and ``unit`` (device-hours of every trial so far, the report's cost), ``trial_h`` (variant -> the
mean hours of one of its trials), ``max_seeds`` and ``budget`` (the caps it was taken under) and what it
decided: ``next`` (variant -> seeds for the next look) or ``stop`` (`pipeline.sweep.until_decided`). The
book is also an artifact of the sweep's parent run, with the tags below.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from pipeline import storage
from pipeline.sweep.decision import Comparison

LOOKS_FILE = "until_decided.json"
LOOKS_TAG, STOP_TAG = "until_decided.looks", "until_decided.stop"
MAX_SEEDS_TAG, BUDGET_TAG = "until_decided.max_seeds", "until_decided.budget"
"""Parent-run tags of an until-decided sweep: looks taken, why it stopped ("" while running), its caps."""
STOP_DECIDED, STOP_MAX_SEEDS, STOP_BUDGET = "decided", "max_seeds", "budget"
STOP_TEXT = {
    STOP_DECIDED: "every comparison is decided",
    STOP_MAX_SEEDS: "the undecided comparisons reached --max-seeds",
    STOP_BUDGET: "the next round would pass --budget",
}
"""Why a look stopped the study (`Look.stop`), for the reader."""
SETTING_NAMES = {"alpha": "--alpha", "margin": "--margin", "initial_seeds": "--seeds (initial seeds)",
                 "precision": "the sequence's precision", "variants": "the study's variants"}  # fmt: skip
"""How a refusal names each setting of `LookBook.settings`."""


def _finite(x: Any) -> Any:
    """JSON has no infinity or nan: null for them (an unbounded interval, an undefined std)."""
    return x if not isinstance(x, float) or math.isfinite(x) else None


@dataclass
class Look:
    index: int
    seeds: dict[str, int]
    comparisons: list[Comparison]
    spent_h: float
    unit: str
    trial_h: dict[str, float]
    max_seeds: int
    budget: str | None
    next: dict[str, int] | None = None
    stop: str | None = None

    def to_dict(self) -> dict[str, Any]:
        comparisons = [{k: _finite(v) for k, v in dataclasses.asdict(c).items()} for c in self.comparisons]
        return {
            "look": self.index, "seeds": self.seeds, "comparisons": comparisons,
            "spent_h": _finite(self.spent_h), "unit": self.unit,
            "trial_h": {k: _finite(v) for k, v in self.trial_h.items()},
            "max_seeds": self.max_seeds, "budget": self.budget, "next": self.next, "stop": self.stop,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Look:
        """The look as `to_dict` wrote it (null numbers read back as nan)."""
        nan = lambda v: math.nan if v is None else v  # noqa: E731
        floats = ("mean", "std", "low", "high")
        comparisons = [Comparison(**{k: nan(v) if k in floats else v for k, v in c.items()})
                       for c in d["comparisons"]]  # fmt: skip
        return cls(
            d["look"], dict(d["seeds"]), comparisons, nan(d["spent_h"]), d["unit"],
            {k: nan(v) for k, v in d["trial_h"].items()}, d["max_seeds"], d["budget"], d["next"], d["stop"],
        )  # fmt: skip


@dataclass
class LookBook:
    """Every look of one until-decided sweep, in order, with the settings they were all taken under."""

    study: str
    reference: str
    settings: dict[str, Any]
    looks: list[Look] = field(default_factory=list)

    @staticmethod
    def path(location: str) -> str:
        return storage.join(location, LOOKS_FILE)

    @classmethod
    def load(cls, location: str) -> LookBook | None:
        """The book kept at ``location`` (None when the sweep has taken no look)."""
        if not storage.is_file(cls.path(location)):
            return None
        d = json.loads(storage.read_text(cls.path(location)))
        return cls(d["study"], d["reference"], d["settings"], [Look.from_dict(x) for x in d["looks"]])

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.study, "reference": self.reference, "settings": self.settings,
                "looks": [look.to_dict() for look in self.looks]}  # fmt: skip

    def save(self, location: str) -> None:
        storage.write_text(self.path(location), json.dumps(self.to_dict(), indent=1) + "\n")

    def check(self, study: str, reference: str, settings: dict[str, Any]) -> None:
        """ValueError naming the first setting that differs from the book's (flag and both values): a
        confidence sequence keeps its guarantee only under the settings it started with."""
        if (study, reference) != (self.study, self.reference):
            raise ValueError(
                f"--resume: this sweep's looks are of study {self.study} against {self.reference}, not "
                f"{study} against {reference}"
            )
        for key, value in settings.items():
            if self.settings.get(key) != value:
                raise ValueError(
                    f"{SETTING_NAMES.get(key, key)} {value} differs from the {self.settings.get(key)} this "
                    "sequential study started with; resume it with its own settings"
                )
