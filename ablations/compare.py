"""Write the comparison report of a sweep from MLflow (table + plots, logged on the sweep's parent run).

    python ablations/compare.py --sweep assignment [--run-dir runs/sweeps/assignment] [--tracking-uri URI]

All options: ``kmax compare --help`` (pipeline/sweep/report.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from pipeline.sweep import report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ablations/compare.py", description=__doc__.splitlines()[0])
    report.add_arguments(parser)
    return report.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
