"""Headless Chromium for the dashboard's tests: run it, and read MLflow's runs table from the DOM."""

from __future__ import annotations

import re
import shutil
import subprocess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "needs Debian's chromium package (apt-get install chromium)"
BROWSER_TIMEOUT_S = 120
WINDOW = "--window-size=2400,1000"  # wide enough that ag-grid renders every column of a sweep's view

CELL = r'col-id="([^"]+)"[^>]*>(?:<[^>]*>)*?<span[^>]*class="ag-cell-value">([^<]*)<'  # id, text


def chromium(*args: str) -> str:
    """Run headless Chromium (30 s of virtual time for the page's requests); returns its stdout."""
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--virtual-time-budget=30000", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S).stdout


def grid_rows(dom: str) -> list[dict[str, str]]:
    """The runs table as rendered: one {column id: cell text} per row, in row-index order (ag-grid
    splits a row over its pinned and scrolling containers; their cells are merged)."""
    rows: dict[int, dict[str, str]] = {}
    starts = list(re.finditer(r'row-index="(\d+)"', dom)) + [None]
    for start, end in zip(starts, starts[1:]):
        block = dom[start.end() : end.start() if end else len(dom)]
        rows.setdefault(int(start.group(1)), {}).update(re.findall(CELL, block))
    return [rows[i] for i in sorted(rows)]
