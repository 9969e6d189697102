"""`kmax sweep --until-decided` (pipeline.sweep.until_decided): the seed-adding rule and its stops by hand,
the looks' record, refusals before any trial, and a real until-decided sweep on synthetic data that ends by
itself after a known number of looks, resumes after a failed trial without repeating a look, and writes
the decisions into stats.json and the parent run."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import load_experiment
from pipeline.sweep.confidence_sequence import TMixtureSequence
from pipeline.sweep.decision import BETTER, EQUIVALENT, UNDECIDED, WORSE, Comparison
from pipeline.sweep.driver import run_sweep, setup_sweep
from pipeline.sweep.looks import Look, LookBook
from pipeline.sweep.study import Study, trial_key
from pipeline.sweep.until_decided import (
    Budget,
    Rounds,
    UntilDecidedConfig,
    check_study,
    keeps_adding,
    next_step,
    run_until_decided,
)
from tests import fault_hooks
from tests.sweep_helpers import OVERRIDES


def _look(decisions: dict[str, str], n: int = 2, spent_h: float = 0.0, trial_h: float = 0.1) -> Look:
    comparisons = [
        Comparison(v, "r", n, 1.0, 2.0, -1.0, 3.0, dec, "t_mixture_cs") for v, dec in decisions.items()
    ]
    seeds = {"r": n, **dict.fromkeys(decisions, n)}
    return Look(1, seeds, comparisons, spent_h, "CPU", dict.fromkeys(seeds, trial_h), 10, None)


def test_seeds_go_only_to_undecided_comparisons_and_their_reference():
    cfg = UntilDecidedConfig()
    step = next_step(_look({"a": UNDECIDED, "b": BETTER, "c": EQUIVALENT, "d": UNDECIDED}), "r", cfg)
    assert step == ({"r": 3, "a": 3, "b": 2, "c": 2, "d": 3}, None)
    assert next_step(_look({"a": WORSE, "b": BETTER}), "r", cfg) == (None, "decided")
    assert next_step(_look({"a": UNDECIDED, "b": BETTER}, n=10), "r", cfg) == (None, "max_seeds")
    # the budget: 0.5 h spent, the next round is a's and r's trials at 0.1 h each
    at = lambda hours: UntilDecidedConfig(budget=Budget(hours, "CPU"))  # noqa: E731
    assert next_step(_look({"a": UNDECIDED}, spent_h=0.5), "r", at(0.7))[1] is None
    assert next_step(_look({"a": UNDECIDED}, spent_h=0.5), "r", at(0.65)) == (None, "budget")
    assert next_step(_look({"a": UNDECIDED}, trial_h=math.nan), "r", at(9.0)) == (None, "budget")
    rule = keeps_adding(np.array([UNDECIDED, UNDECIDED, BETTER, EQUIVALENT]), np.array([3, 10, 3, 2]), 10)
    assert rule.tolist() == [True, False, False, False]


def test_settings_and_budget_are_checked():
    assert (
        Budget.parse("40gpu-h") == Budget(40.0, "GPU") and str(Budget.parse("2.5 CPU-hours")) == "2.5 CPU-h"
    )
    for bad, message in (("3", "give hours and a unit"), ("0cpu-h", "more than 0"), ("2tpu-h", "a unit")):
        with pytest.raises(ValueError, match=message):
            Budget.parse(bad)
    for kwargs, flag in (
        ({"max_seeds": 1}, "--max-seeds"),
        ({"margin": -1.0}, "--margin"),
        ({"alpha": 0.0}, "--alpha"),
    ):
        with pytest.raises(ValueError, match=flag):
            UntilDecidedConfig(**kwargs)
    base = load_experiment("tiny", [])
    one = Study("one", {"model.decoder.coord_conv": [False]}, reference={"model.decoder.coord_conv": False})
    with pytest.raises(ValueError, match="one variant, nothing to compare"):
        check_study(one, UntilDecidedConfig(), base, None)
    three = Study(
        "three",
        {"model.decoder.coord_conv": [False, True]},
        seeds=3,
        reference={"model.decoder.coord_conv": False},
    )
    with pytest.raises(ValueError, match="--max-seeds 2 is below the study's 3 seeds"):
        check_study(three, UntilDecidedConfig(max_seeds=2), base, None)


def test_the_looks_are_kept_and_a_resume_keeps_their_settings(tmp_path):
    look = _look({"a": UNDECIDED, "b": BETTER})
    look.comparisons[0] = Comparison("a", "r", 2, 1.0, 2.0, -math.inf, math.inf, UNDECIDED, "t_mixture_cs", 9)
    look.next = {"r": 3, "a": 3, "b": 2}
    settings = {
        "alpha": 0.05,
        "margin": 0.5,
        "precision": 0.1,
        "initial_seeds": 2,
        "variants": ["a", "b", "r"],
    }
    LookBook("s", "r", settings, [look]).save(str(tmp_path))
    back = LookBook.load(str(tmp_path))
    assert back is not None and back.looks[0].to_dict() == look.to_dict()
    assert (
        json.loads((tmp_path / "until_decided.json").read_text())["looks"][0]["comparisons"][0]["low"] is None
    )
    back.check("s", "r", settings)
    with pytest.raises(ValueError, match="--alpha 0.1 differs from the 0.05"):
        back.check("s", "r", {**settings, "alpha": 0.1})
    with pytest.raises(ValueError, match="looks are of study s against r"):
        back.check("s", "x", settings)
    assert LookBook.load(str(tmp_path / "none")) is None


def test_a_study_runs_the_planned_seeds_of_each_variant():
    study = Study("s", {"model.decoder.coord_conv": [False, True]}, seeds=2)
    planned = study.with_seed_counts({"coord_conv=False": 3, "coord_conv=True": 2})
    assert [trial_key(t, planned) for t in planned.trials()] == [
        "coord_conv=False__seed0", "coord_conv=False__seed1", "coord_conv=False__seed2",
        "coord_conv=True__seed0", "coord_conv=True__seed1",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no seed count for coord_conv=True"):
        study.with_seed_counts({"coord_conv=False": 3})


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--until-decided", "--asha"], "--until-decided cannot run with --asha"),
        (["--until-decided", "--max-seeds", "1"], "--max-seeds must be >= 2"),
        (["--until-decided", "--budget", "2gpu-h"], "--budget 2 GPU-h: the trials train on CPUs"),
        (["--until-decided", "--budget", "2"], "--budget 2: give hours and a unit"),
        (["--max-seeds", "4"], "--max-seeds applies with --until-decided only"),
        (["--until-decided", "--study", "decoder_depth"], "study decoder_depth names no reference variant"),
    ],
)
def test_bad_input_is_refused_in_one_line_before_any_trial(flags, message, tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    study = [] if "--study" in flags else ["--study", "assignment"]
    code = main(["sweep", *study, "--run-dir", str(sweep_dir), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not sweep_dir.exists()  # nothing made: no store, no trial


def test_kmax_sweep_until_decided_runs_the_rounds_of_the_driver(tmp_path, monkeypatch, capsys):
    from pipeline.sweep import driver, until_decided

    calls = []

    def fake(study, sweep_dir, base, **kwargs):
        calls.append((study.name, kwargs))
        return until_decided.UntilDecidedSummary(str(sweep_dir), "uri", "parent", finished=["a", "b"])

    monkeypatch.setattr(until_decided, "run_until_decided", fake)
    flags = [
        "--study",
        "design",
        "--until-decided",
        "--max-seeds",
        "4",
        "--budget",
        "1cpu-h",
        "--alpha",
        "0.1",
    ]
    assert main(["sweep", *flags, "--run-dir", str(tmp_path / "s")]) == 0
    ((name, kwargs),) = calls
    assert name == "design" and kwargs["rounds"] == until_decided.Rounds(driver.run_sweep, driver.setup_sweep)
    assert kwargs["cfg"] == UntilDecidedConfig(max_seeds=4, alpha=0.1, budget=Budget(1.0, "CPU"))
    assert "2 trial(s) run" in capsys.readouterr().out


# ---- a real until-decided sweep ------------------------------------------------------------------------

LIMIT = "model.postprocess.stuff_area_limit"
# one training per seed, three post-processings: 0 (the reference) and 1 keep every segment (areas are >= 1
# pixel), so their PQ is the same seed by seed and their differences are exactly 0; 100000 voids every
# segment, PQ 0, so its differences are -PQ of the reference, which varies with the seed
STUDY = Study("t_until", {LIMIT: [0, 1, 100000]}, seeds=2, reference={LIMIT: 0})
REF, SAME, VOID = "stuff_area_limit=0", "stuff_area_limit=1", "stuff_area_limit=100000"
ROUNDS = Rounds(run_sweep, setup_sweep)
KEEP_ALL = [f"model.postprocess.{k}=0" for k in ("thing_threshold", "stuff_threshold", "thing_area_limit",
            "pixel_confidence_threshold", "overlap_threshold")]  # fmt: skip


@pytest.mark.slow
@pytest.mark.ray
def test_until_decided_sweep_ends_by_itself_adding_seeds_only_where_undecided(ray_session, tmp_path_factory):
    """alpha is set just above the least at which 2 paired seeds can bound the sequence: there its radius
    is ~3000 s, so at the first look (2 seeds) the comparison with differences exactly 0 is equivalent
    ([0, 0]) and the one with varying differences is undecided whatever the PQs are. Only the latter and the
    reference get seed 2; --max-seeds 3 makes the second look the last. Seed 2 of the undecided variant fails
    once (a step hook): the call stops with 1 look, and --resume runs that trial alone and takes look 2."""
    from mlflow.tracking import MlflowClient

    from pipeline.data.synthetic import make_prepared_synthetic

    root = tmp_path_factory.mktemp("until_decided")
    data = make_prepared_synthetic(root / "data", train=8, val=4, height=48, width=48, seed=0, progress=False)
    replaced = ("train.eval_interval", "train.vis_interval", "scaling.cpus_per_worker")
    # one validation at the end; 1.3 CPUs a trial (0.25 driver, 0.05 worker: one torch thread, 1 data), so
    # the session's 4 logical CPUs run 3 trials at a time: the first round is one wave, not three
    overrides = [o for o in OVERRIDES if not o.startswith(replaced)]
    overrides += ["train.eval_interval=6", "scaling.cpus_per_worker=0.05", *KEEP_ALL]
    base = load_experiment("tiny", [f"data.prepared_dir={data}", *overrides])
    alpha = float(TMixtureSequence().smallest_alpha(2)) * (1 + 1e-6)
    cfg = UntilDecidedConfig(max_seeds=3, alpha=alpha, budget=Budget(100.0, "CPU"))
    late = trial_key({LIMIT: 100000, "train.seed": 2}, STUDY)
    fault_hooks.by_value()
    fail = fault_hooks.FailRun(late, str(root / "failed.marker"))
    lines: list[str] = []
    t0 = time.time()
    first = run_until_decided(
        STUDY, root / "sweep", base, cfg, rounds=ROUNDS, hooks=[fail], echo=lines.append
    )
    assert first.failed == [late] and first.stop is None and len(first.looks) == 1
    (look1,) = first.looks
    decided = {c.variant: c for c in look1.comparisons}
    assert decided[SAME].decision == EQUIVALENT and (decided[SAME].low, decided[SAME].high) == (0.0, 0.0)
    assert decided[VOID].decision == UNDECIDED and decided[VOID].n == 2
    assert look1.next == {REF: 3, SAME: 2, VOID: 3}

    resumed = run_until_decided(
        STUDY, root / "sweep", base, cfg, rounds=ROUNDS, resume=True, echo=lines.append
    )
    elapsed = time.time() - t0
    assert resumed.finished == [late] and resumed.failed == [] and len(resumed.skipped) == 7
    assert [look.index for look in resumed.looks] == [1, 2]
    assert resumed.looks[0].to_dict() == look1.to_dict()  # kept, not taken again
    look2 = resumed.looks[1]
    void = next(c for c in look2.comparisons if c.variant == VOID)
    assert void.n == 3 and void.decision in (WORSE, UNDECIDED) and look2.next is None
    assert resumed.stop == ("decided" if void.decision == WORSE else "max_seeds") == look2.stop
    ran = sorted(p.name for p in (root / "sweep" / "trials").iterdir())
    planned = {0: 3, 1: 2, 100000: 3}  # seeds per variant: the equivalent one got no third
    assert ran == sorted(
        trial_key({LIMIT: v, "train.seed": k}, STUDY) for v, n in planned.items() for k in range(n)
    )
    assert any(line.startswith("until decided, look 2:") for line in lines)

    stats = json.loads((root / "sweep" / "report" / "stats.json").read_text())
    design = stats["design"]
    assert (design["kind"], design["method"], design["looks"], design["stop"]) == (
        "until_decided", "t_mixture_cs", 2, resumed.stop)  # fmt: skip
    assert design["budget"] == "100 CPU-h" and 0 < design["spent_h"] < 100 and design["unit"] == "CPU"
    by_variant = {d["variant"]: d for d in stats["differences"]}
    assert by_variant[SAME]["decision"] == EQUIVALENT
    assert (by_variant[SAME]["n"], by_variant[SAME]["interval"], by_variant[SAME]["seeds"]) == (
        2,
        [0.0, 0.0],
        ["0", "1"],
    )
    assert by_variant[VOID]["decision"] == void.decision and by_variant[VOID]["n"] == 3
    assert by_variant[VOID]["interval"] == pytest.approx([void.low, void.high])
    assert {d["method"] for d in stats["differences"]} == {"t_mixture_cs"}
    assert all(d["cost_h"] > 0 for d in stats["differences"])
    if void.decision == UNDECIDED:
        assert by_variant[VOID]["seeds_needed"] == void.seeds_needed and design["undecided"]

    parent = MlflowClient(resumed.tracking_uri).get_run(resumed.parent_run_id).data
    assert parent.params["design"] == "until_decided" and parent.tags["until_decided.looks"] == "2"
    assert parent.tags["report.decision.stuff_area_limit_1"] == EQUIVALENT
    assert parent.tags["report.method"] == "t_mixture_cs"

    again = run_until_decided(
        STUDY, root / "sweep", base, cfg, rounds=ROUNDS, resume=True, echo=lines.append, report=False
    )
    assert again.finished == [] and len(again.looks) == 2 and again.stop == resumed.stop
    print(f"until-decided sweep: 8 trials, 2 looks, {elapsed:.0f} s")
