"""Run an ablation study as a Ray Tune sweep (the script users `ray submit`).

    python ablations/sweep.py --study assignment [--resume] [--set train.steps=2000 ...]
    ray submit cluster.yaml ablations/sweep.py -- --study assignment --ray-address auto

Under `ray submit` (RAY_ADDRESS set, or ``--ray-address auto``) it joins the running cluster; otherwise
it starts a local Ray. All options: ``kmax sweep --help`` (pipeline/sweep/driver.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from pipeline.sweep import driver as sweep  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ablations/sweep.py", description=__doc__.splitlines()[0])
    sweep.add_arguments(parser)
    return sweep.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
