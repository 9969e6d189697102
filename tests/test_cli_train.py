"""`kmax train` from the command line: flags set typed config fields, paths are made absolute before Ray
starts (a relative --data trains from another directory), and what the driver can check fails first, as one
line naming the file or field, exit code 2, before Ray starts."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from pipeline.cli import main
from pipeline.train.driver import add_arguments, config_from_args
from tests.train_helpers import make_data

TRAIN_FLAGS = [
    "--set", "train.steps=2", "--set", "train.warmup_steps=1", "--set", "train.eval_interval=0",
    "--set", "train.checkpoint_interval=0", "--set", "data.batch_size=2", "--set", "data.num_vis_images=0",
    "--set", "data.augment.crop_size=49", "--set", "scaling.cpus_per_worker=0.5", "--num-workers", "1",
]  # fmt: skip


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_flags_set_typed_fields_without_string_round_trips(tmp_path, monkeypatch):
    """A path holding ',', '=' and '[' would not survive a ``--set key=value`` string; a flag sets it as
    it is, made absolute against the working directory."""
    monkeypatch.chdir(tmp_path)
    cfg = _parse(["--data", "d,a=t[a]", "--run-dir", "runs/x", "--num-workers", "3", "--gpu"])
    assert cfg.data.prepared_dir == str(tmp_path / "d,a=t[a]")
    assert cfg.run_dir == str(tmp_path / "runs" / "x")
    assert cfg.scaling.num_workers == 3 and cfg.scaling.use_gpu is True
    # --set still works, and a flag wins over it
    cfg = _parse(["--set", "scaling.num_workers=5", "--set", "train.lr=0.25", "--num-workers", "2"])
    assert (cfg.scaling.num_workers, cfg.train.lr) == (2, 0.25)


@pytest.fixture(scope="module")
def data_dir(ray_session, tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("cli_data"))


@pytest.mark.ray
@pytest.mark.slow
def test_relative_data_and_run_dir_train_from_another_directory(data_dir, tmp_path, monkeypatch, capsys):
    """The Ray Train workers run in Ray's own directories: the relative paths only work because the driver
    made them absolute."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(data_dir)
    monkeypatch.chdir(work)
    assert main(["train", "--data", "data", "--run-dir", "runs/rel", *TRAIN_FLAGS]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    saved = json.loads((work / "runs" / "rel" / "mlflow_run.json").read_text())
    assert saved["tracking_uri"] == f"sqlite:///{work / 'runs' / 'rel' / 'mlflow.db'}"
    assert os.path.isabs(saved["tracking_uri"].removeprefix("sqlite:///"))


def _refused(argv: list[str], capsys, monkeypatch) -> str:
    """Run `kmax train`; assert it refused with exit code 2 and one line, without starting Ray."""

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the input was checked")

    monkeypatch.setattr("pipeline.ray_setup.init_ray", no_ray)
    assert main(["train", *TRAIN_FLAGS, *argv]) == 2  # argv last: its --set wins
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kmax train: ") and "Traceback" not in err, err
    return err


@pytest.mark.ray
def test_what_the_driver_can_check_fails_first_in_one_line(data_dir, tmp_path, capsys, monkeypatch):
    run = ["--run-dir", str(tmp_path / "run")]
    err = _refused(["--data", str(tmp_path / "nowhere"), *run], capsys, monkeypatch)
    assert str(tmp_path / "nowhere" / "train" / "manifest.json") in err
    broken = tmp_path / "broken"
    (broken / "train").mkdir(parents=True)
    (broken / "train" / "manifest.json").write_text("{not json")
    err = _refused(["--data", str(broken), *run], capsys, monkeypatch)
    assert str(broken / "train" / "manifest.json") in err and "not a readable manifest" in err
    err = _refused(["--data", str(data_dir), *run, "--set", "train.lr=fast"], capsys, monkeypatch)
    assert "train.lr" in err
    err = _refused(["--data", str(data_dir), *run, "--set", "data.batch_size=9"], capsys, monkeypatch)
    assert "data.batch_size=9 exceeds the 8 training images" in err and "scaling.num_workers=1" in err
    err = _refused(["--data", str(data_dir), *run, "--set", "data.val_split=nope"], capsys, monkeypatch)
    assert str(data_dir / "nope" / "manifest.json") in err
