"""Named studies resolve to the right grids and every trial is a valid experiment config."""

from __future__ import annotations

import sys
import textwrap

import pytest

from ablations import studies
from pipeline.sweep.study import SEED_PATH, Study, resolve_study, variant_name


def test_named_studies_grids():
    assert [v[studies.ASSIGNMENT] for v in resolve_study("assignment").variants()] == [
        "argmax",
        "cluster_softmax",
        "spatial_softmax",
    ]
    assert len(resolve_study("assignment").trials()) == 3 * studies.DEFAULT_SEEDS == 9
    design = resolve_study("design")
    assert [v[studies.ASSIGNMENT] for v in design.variants()] == ["argmax", "cmt", "cross_attention"]
    assert design.seeds == 3 and design.reference_point() == {studies.ASSIGNMENT: "argmax"}
    assert len(resolve_study("coord_conv", seeds=3).trials()) == 6
    assert [v[studies.DEPTH] for v in resolve_study("decoder_depth").variants()] == [
        (1, 1, 1),
        (2, 2, 2),
        (3, 3, 3),
    ]
    full = resolve_study("full", seeds=2)
    assert len(full.variants()) == 18 and len(full.trials()) == 36
    # every variant appears once per seed
    keys = {(variant_name(t, full), t[SEED_PATH]) for t in full.trials()}
    assert len(keys) == 36


def test_every_trial_builds_a_valid_config():
    from kmax_model.config_utils import apply_overrides
    from pipeline.config import ExperimentConfig

    base = ExperimentConfig()
    for trial in resolve_study("full").trials():
        cfg = apply_overrides(base, trial)
        assert cfg.model.decoder.assignment == trial[studies.ASSIGNMENT]
        assert tuple(cfg.model.decoder.blocks_per_stride) == tuple(trial[studies.DEPTH])


def test_user_study_from_module(tmp_path, monkeypatch):
    (tmp_path / "mylab_studies.py").write_text(
        textwrap.dedent(
            """
            from pipeline.sweep.study import Study
            def widths(seeds=1):
                return Study("widths", {"model.decoder.hidden_dim": [32, 64]}, seeds=seeds)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    study = resolve_study("mylab_studies:widths", seeds=2)
    assert study.name == "widths" and len(study.trials()) == 4
    sys.modules.pop("mylab_studies", None)


def test_bad_studies_are_named():
    with pytest.raises(ValueError, match="no study 'nope'.*assignment"):
        resolve_study("nope")
    with pytest.raises(ValueError, match="cannot import module"):
        resolve_study("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="dotted config path"):
        Study("x", {"assignment": ["argmax"]})
    with pytest.raises(ValueError, match="seeds"):
        Study("x", {"a.b": [1]}, seeds=0)
