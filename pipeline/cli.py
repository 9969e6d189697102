"""The `kmax` command: one sub-command per pipeline stage.

Each sub-command lives in the module that implements its stage; that module exposes
``add_arguments(parser: argparse.ArgumentParser) -> None`` and ``run(args: argparse.Namespace) -> int``.
Modules are imported only when their command is used, so ``kmax synth --help`` does not pay for
importing Ray, torch and MLflow.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("pipeline.data.synthetic", "write a deterministic synthetic panoptic dataset"),
    "prepare": ("pipeline.data.prepare", "validate and convert a dataset to Parquet shards (Ray Data)"),
    "train": ("pipeline.train.driver", "train a kMaX model with Ray Train, tracked in MLflow"),
    "evaluate": ("pipeline.eval.evaluate", "PQ, mIoU and mask AP of predictions or a checkpoint"),
    "sweep": ("pipeline.sweep.driver", "run an ablation study as a Ray Tune sweep"),
    "compare": ("pipeline.sweep.report", "write the comparison report of a sweep from MLflow"),
    "dashboard": ("pipeline.sweep.dashboard", "serve the MLflow UI over the project's tracking store"),
    "demo": ("pipeline.sweep.demo", "synthetic data -> prepare -> assignment study -> comparison report"),
}


def _load(name: str):
    module_name = COMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Import only the module of the command being run (or none when only listing commands).
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (_, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        if name == wanted and (module := _load(name)) is not None:
            module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.ray_setup import QUIET_ENV

    for key, value in QUIET_ENV.items():  # before anything imports mlflow or ray
        os.environ.setdefault(key, value)
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    module = _load(args.command)
    if module is None:
        print(f"kmax {args.command}: not built yet", file=sys.stderr)
        return 2
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
