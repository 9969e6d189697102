"""An ablation study: a grid over dotted config paths, replicated over seeds.

Studies are plain data so that they can be defined anywhere (``ablations/studies.py`` or a user's
module) and resolved by name: ``resolve_study("assignment")`` looks in ``ablations.studies``,
``resolve_study("mylab.studies:widths")`` imports that function. `pipeline.sweep.driver` turns a study into
Ray Tune trials over its config paths; `pipeline.sweep.report` groups runs back into its variants.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_STUDY_MODULE = "ablations.studies"
SEED_PATH = "train.seed"


def default_sweep_dir(name: str) -> str:
    """Where a sweep lives unless ``--run-dir`` says otherwise (its store, trials and report)."""
    return f"runs/sweeps/{name}"


@dataclass(frozen=True)
class Study:
    """A factorial grid over config fields.

    Attributes:
        name: the study's name (MLflow parent-run tag ``study``).
        space: dotted config path -> the values to try, e.g.
            ``{"model.decoder.assignment": ["spatial_softmax", "cluster_softmax", "argmax"]}``.
        seeds: replicates of every variant, with ``train.seed`` = 0..seeds-1.
        fixed: overrides applied to every trial (e.g. a shorter schedule for this study).
        reference: the variant the report compares every other one with (pipeline.sweep.report), as
            dotted path -> value; a path left out takes its first value, so the default (None) is the
            first variant of the grid. ``--until-decided`` needs it named (it spends seeds on comparisons
            with it).
        seeds_per_variant: variant name (`variant_name`) -> how many seeds (0..k-1) it runs, at most
            `seeds`; a variant left out runs `seeds`, as every variant does when None. An until-decided
            sweep adds seeds to some variants only (`with_seed_counts`).
    """

    name: str
    space: dict[str, Sequence[Any]]
    seeds: int = 1
    fixed: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] | None = None
    seeds_per_variant: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("study.name must be non-empty")
        if not self.space:
            raise ValueError(f"study {self.name}: space must name at least one config path")
        for path, values in self.space.items():
            if "." not in path:
                raise ValueError(f"study {self.name}: space key {path!r} is not a dotted config path")
            if isinstance(values, str) or len(values) == 0:
                raise ValueError(f"study {self.name}: space[{path!r}] must be a non-empty list of values")
        if SEED_PATH in self.space:
            raise ValueError(f"study {self.name}: seeds are set by `seeds`, not by space[{SEED_PATH!r}]")
        if self.seeds < 1:
            raise ValueError(f"study {self.name}: seeds must be >= 1, got {self.seeds}")
        for path, value in (self.reference or {}).items():
            if path not in self.space or _plain(value) not in [_plain(v) for v in self.space[path]]:
                raise ValueError(f"study {self.name}: reference {path}={value!r} is not a point of the space")
        self._check_seed_counts()

    def _check_seed_counts(self) -> None:
        names = {variant_name(v, self) for v in self.variants()}
        for name, count in (self.seeds_per_variant or {}).items():
            if name not in names or not 1 <= count <= self.seeds:
                raise ValueError(f"study {self.name}: seeds_per_variant[{name!r}] = {count} is not 1..seeds")

    def with_seed_counts(self, counts: dict[str, int]) -> Study:
        """This study with each variant (variant name -> count, every variant named) run on seeds
        0..count-1; `seeds` becomes the largest count."""
        missing = sorted({variant_name(v, self) for v in self.variants()} - set(counts))
        if missing:
            raise ValueError(f"study {self.name}: no seed count for {', '.join(missing)}")
        return dataclasses.replace(self, seeds=max(counts.values()), seeds_per_variant=dict(counts))

    def seeds_of(self, variant: dict[str, Any]) -> int:
        """How many seeds (0..k-1) the variant runs."""
        return (self.seeds_per_variant or {}).get(variant_name(variant, self), self.seeds)

    def reference_point(self) -> dict[str, Any]:
        """The reference variant: `reference`, with the first value of every path it leaves out."""
        return {path: (self.reference or {}).get(path, values[0]) for path, values in self.space.items()}

    def variants(self) -> list[dict[str, Any]]:
        """Every point of the grid (without the seed), in a stable order."""
        paths = list(self.space)
        return [dict(zip(paths, combo)) for combo in itertools.product(*(self.space[p] for p in paths))]

    def trials(self) -> list[dict[str, Any]]:
        """Every (variant, seed) pair as the full set of overrides of one trial."""
        return [
            {**self.fixed, **variant, SEED_PATH: seed}
            for variant in self.variants()
            for seed in range(self.seeds_of(variant))
        ]


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (a value read back from JSON is a list)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def variant_name(overrides: dict[str, Any], study: Study) -> str:
    """A short, stable label of a variant: ``assignment=argmax,coord_conv=True``."""
    parts = []
    for path in study.space:
        value = overrides[path]
        if isinstance(value, (list, tuple)):
            value = "x".join(str(v) for v in value)
        parts.append(f"{path.rsplit('.', 1)[-1]}={value}")
    return ",".join(parts)


def trial_key(point: dict[str, Any], study: Study) -> str:
    """Deterministic, filesystem-safe name of a trial (its run directory, its Tune trial and MLflow run
    name): ``assignment=argmax__seed0``."""
    name = f"{variant_name(point, study)}__seed{point[SEED_PATH]}"
    return re.sub(r"[^A-Za-z0-9_.=,-]", "_", name)


def resolve_study(spec: str, seeds: int | None = None) -> Study:
    """Resolve ``NAME`` (a function of ``ablations.studies``) or ``module:function`` to a `Study`.

    The function is called with ``seeds=`` when given. Raises ValueError naming what was not found.
    """
    module_name, _, func_name = spec.rpartition(":") if ":" in spec else (DEFAULT_STUDY_MODULE, "", spec)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"--study {spec}: cannot import module {module_name!r} ({exc})") from exc
    func: Callable[..., Study] | None = getattr(module, func_name, None)
    if not callable(func):
        known = sorted(
            n
            for n, f in vars(module).items()
            if inspect.isfunction(f) and f.__module__ == module.__name__ and not n.startswith("_")
        )
        raise ValueError(
            f"--study {spec}: {module_name} has no study {func_name!r}; known: {', '.join(known)}"
        )
    study = func(seeds=seeds) if seeds is not None else func()
    if not isinstance(study, Study):
        raise ValueError(
            f"--study {spec}: {module_name}.{func_name}() returned {type(study).__name__}, not Study"
        )
    return study
