"""The `kmax` command: one sub-command per pipeline stage, and the flags several commands share.

Each sub-command lives in the module that implements its stage; that module exposes
``add_arguments(parser: argparse.ArgumentParser) -> None`` and ``run(args: argparse.Namespace) -> int``.
Modules are imported only when their command is used, so ``kmax synth --help`` does not pay for
importing Ray, torch and MLflow. Flags set fields of the typed config (`run_fields`), never strings; every
path flag is made absolute here, before Ray starts. A command that refuses its input prints one line
(`fail`) and exits with 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from pipeline.storage import absolute

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("pipeline.data.synthetic", "write a deterministic synthetic panoptic dataset"),
    "prepare": ("pipeline.data.prepare", "validate and convert a dataset to Parquet shards (Ray Data)"),
    "train": ("pipeline.train.driver", "train a kMaX model with Ray Train, tracked in MLflow"),
    "evaluate": ("pipeline.eval.evaluate", "PQ, mIoU and mask AP of predictions or a checkpoint"),
    "predict": ("pipeline.serve.predict", "panoptic predictions of a checkpoint on images or a split"),
    "import-weights": ("pipeline.serve.import_weights", "an official kMaX-DeepLab checkpoint as a kmax one"),
    "export": ("pipeline.serve.export", "the inference network as ONNX, TorchScript or an ExportedProgram"),
    "sweep": ("pipeline.sweep.driver", "run an ablation study as a Ray Tune sweep"),
    "compare": ("pipeline.sweep.report", "write the comparison report of a sweep from MLflow"),
    "dashboard": ("pipeline.sweep.dashboard", "serve the MLflow UI over the project's tracking store"),
    "tracking-server": ("pipeline.tracking_server", "the cluster's MLflow server: PostgreSQL, logins"),
    "demo": ("pipeline.sweep.demo", "synthetic data -> prepare -> assignment study -> comparison report"),
}


def add_config_arguments(parser: argparse.ArgumentParser, what: str = "the run", preset: bool = True) -> None:
    """``--config PRESET_OR_YAML`` (unless ``preset`` is False) and repeatable ``--set dotted.path=value``."""
    if preset:
        parser.add_argument(
            "--config", default="tiny", help="experiment preset name (tiny, resnet50_coco, ...) or YAML file"
        )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"dotted config override of {what}, e.g. train.lr=1e-3 (repeatable)",
    )  # fmt: skip


def add_run_arguments(parser: argparse.ArgumentParser, run_dir_help: str = "runs/train") -> None:
    """``--data``, ``--run-dir``, ``--tracking-uri`` and ``--storage`` (paths made absolute as they are
    parsed; URIs kept)."""
    parser.add_argument(
        "--data", type=absolute, help="prepared dataset directory (default: the synthetic dataset)"
    )
    parser.add_argument("--run-dir", type=absolute, help=f"run directory (default: {run_dir_help})")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite store in the run dir)")
    parser.add_argument(
        "--storage", type=absolute,
        help="where checkpoints, the journal and run state go: a shared mount path or s3://bucket/prefix "
        "(default: $KMAX_STORAGE, else the run dir; needed on a cluster of several nodes)",
    )  # fmt: skip


def run_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields `add_run_arguments`' flags set: {dotted path: typed value}, given flags only."""
    flags = {
        "data.prepared_dir": args.data, "run_dir": args.run_dir, "tracking.uri": args.tracking_uri,
        "storage": args.storage,
    }  # fmt: skip
    return {path: value for path, value in flags.items() if value is not None}


def fail(command: str, error: Exception | str) -> int:
    """Print ``kmax COMMAND: error`` on stderr (no traceback); the exit code of refused input."""
    print(f"kmax {command}: {error}", file=sys.stderr)
    return 2


def _load(name: str):
    return importlib.import_module(COMMANDS[name][0])


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Import only the module of the command being run (or none when only listing commands).
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (_, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        if name == wanted:
            _load(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.ray_setup import QUIET_ENV, RayJoinError

    for key, value in QUIET_ENV.items():  # before anything imports mlflow or ray
        os.environ.setdefault(key, value)
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(_load(args.command).run(args) or 0)
    except RayJoinError as exc:  # every command that joins a cluster: one line, before any work there
        return fail(args.command, exc)


if __name__ == "__main__":
    sys.exit(main())
