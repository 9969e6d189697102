"""Quarantine checks: every rejected record gets a precise, machine-readable reason.

A reader or the converter raises `RecordError(code, file, message)`; `pipeline.data.prepare` catches it,
writes ``{"record_id", "file", "code", "reason"}`` to quarantine.jsonl and keeps every other record.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# Reason codes (stable strings: tests and users grep quarantine.jsonl for them).
MISSING_FILE = "missing_file"
UNREADABLE_FILE = "unreadable_file"
TRUNCATED_FILE = "truncated_file"
SIZE_MISMATCH = "size_mismatch"
PNG_ID_WITHOUT_SEGMENT = "png_id_without_segment"
SEGMENT_NOT_IN_PNG = "segment_not_in_png"
AREA_MISMATCH = "area_mismatch"
UNKNOWN_CATEGORY = "unknown_category"
CROWD_STUFF = "crowd_stuff"
DUPLICATE_IMAGE_ID = "duplicate_image_id"
DUPLICATE_SEGMENT_ID = "duplicate_segment_id"
REPEATED_STUFF = "repeated_stuff"
NO_IMAGE_ENTRY = "no_image_entry"
TOO_MANY_INSTANCES = "too_many_instances"
LABEL_MISMATCH = "label_mismatch"
MALFORMED_ANNOTATION = "malformed_annotation"


class RecordError(Exception):
    """A record that cannot be converted; ``code`` is one of the module constants."""

    def __init__(self, code: str, file: str, message: str):
        super().__init__(f"{file}: {message}")
        self.code, self.file, self.message = code, file, message

    def to_json(self, record_id: str) -> dict:
        return {"record_id": record_id, "file": self.file, "code": self.code, "reason": self.message}


def read_bytes(path: Path, rel: str) -> bytes:
    if not path.is_file():
        raise RecordError(MISSING_FILE, rel, "file does not exist")
    return path.read_bytes()


def open_image(data: bytes, rel: str) -> Image.Image:
    """Fully decode an image, telling truncated files apart from files that are not images at all."""
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises UnidentifiedImageError, SyntaxError, ... on garbage
        raise RecordError(
            UNREADABLE_FILE, rel, f"not a readable image ({type(exc).__name__}: {exc})"
        ) from None
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc).lower()
        code = TRUNCATED_FILE if ("truncat" in text or "broken data stream" in text) else UNREADABLE_FILE
        raise RecordError(code, rel, f"cannot decode image ({exc})") from None
    return im


def check_size(rel: str, what: str, got: tuple[int, int], expected: tuple[int, int]) -> None:
    if tuple(got) != tuple(expected):
        raise RecordError(
            SIZE_MISMATCH,
            rel,
            f"{what} is {got[0]}x{got[1]} (HxW) but {expected[0]}x{expected[1]} is expected",
        )


def check_segments_info(rel: str, segments: list[dict], categories: dict[int, tuple[int, bool]]) -> None:
    """JSON-only checks: unknown categories, crowd stuff, duplicate segment ids, a stuff class twice."""
    seen_ids: set[int] = set()
    seen_stuff: set[int] = set()
    for seg in segments:
        sid, cat = int(seg["id"]), int(seg["category_id"])
        if cat not in categories:
            raise RecordError(UNKNOWN_CATEGORY, rel, f"segment {sid} has unknown category_id {cat}")
        if sid in seen_ids:
            raise RecordError(DUPLICATE_SEGMENT_ID, rel, f"segment id {sid} is listed twice in segments_info")
        seen_ids.add(sid)
        isthing = categories[cat][1]
        if not isthing and int(seg.get("iscrowd", 0)):
            raise RecordError(CROWD_STUFF, rel, f"stuff segment {sid} (category {cat}) is marked iscrowd=1")
        if not isthing:
            if cat in seen_stuff:
                raise RecordError(REPEATED_STUFF, rel, f"stuff category {cat} has more than one segment")
            seen_stuff.add(cat)


def check_ids_against_segments(
    rel: str,
    ids: np.ndarray,
    seg_ids: np.ndarray,
    counts: np.ndarray,
    unmatched: np.ndarray,
    segments: list[dict],
    check_area: bool,
) -> None:
    """Id-map checks after the lookup: stray PNG ids, segments absent from the PNG, areas that disagree.

    ``seg_ids`` are the segments' ids (JSON order), ``counts`` their pixel counts in the PNG,
    ``unmatched`` the distinct non-void PNG ids that have no segment.
    """
    if unmatched.size:
        shown = ", ".join(str(int(v)) for v in unmatched[:5])
        raise RecordError(PNG_ID_WITHOUT_SEGMENT, rel, f"PNG ids with no segments_info entry: {shown}")
    for seg, n in zip(segments, counts):
        if n == 0:
            raise RecordError(
                SEGMENT_NOT_IN_PNG, rel, f"segment {seg['id']} of segments_info is absent from the PNG"
            )
        if check_area and "area" in seg and int(seg["area"]) != int(n):
            raise RecordError(
                AREA_MISMATCH,
                rel,
                f"segment {seg['id']}: JSON area {seg['area']} but {int(n)} pixels in the PNG",
            )
