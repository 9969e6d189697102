"""The images `kmax predict` reads: finding them, naming their outputs, and decoding them to RGB.

Inputs (`find_images`): one file (tried whatever its suffix), a folder (every file with an image suffix
below it, recursively, hidden entries and the output folder left out) or a glob pattern (every file it
matches, ``**`` included). A prepared split (`pipeline.data.records`) is listed by `prepared_items`.

Decoding (`decode_file`, `to_rgb`) turns every readable image into uint8 RGB [H, W, 3]: the EXIF
orientation is applied (`PIL.ImageOps.exif_transpose`, so the output has the transposed size), 16/32-bit
integer greys (PIL modes ``I;16*``, ``I``) are scaled from 0..65535 to 0..255, float greys (``F``) are
clipped to 0..255, and every other mode (L, LA, P, RGBA, CMYK, YCbCr, 1) goes through PIL's conversion to
RGB (alpha dropped). A file that cannot be read raises `pipeline.data.quarantine.RecordError`, whose
``code`` (missing_file, unreadable_file, truncated_file) and message say why.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline.data.quarantine import UNREADABLE_FILE, RecordError, open_image, read_bytes
from pipeline.data.records import decode_image, open_shard, read_manifest, read_shard, shard_paths, split_dir

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jp2"}
)
"""Suffixes (lower case) of the files a folder input takes; a file or glob input is tried whatever it is."""
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
"""PIL modes of integer greys above 8 bits, scaled by `SIXTEEN_BIT_MAX`."""
SIXTEEN_BIT_MAX = 65535
EIGHT_BIT_MAX = 255


@dataclass(frozen=True)
class Item:
    """One image to predict.

    Attributes:
        name: output name (``DIR/panoptic/<name>.png``), unique among the run's items, may hold ``/``.
        source: where the image comes from: an absolute file path, or ``<split dir>#<record_id>``.
        file_name: the image's path relative to its input root (the COCO ``images[].file_name``).
        image_id: the COCO ``image_id``: the int of an all-digit file stem or record id, else the output
            name (files) or the record id (prepared split); see `image_ids`.
        shard, row: for a prepared split, the shard location and the row's index in it (else "" and -1).
    """

    name: str
    source: str
    file_name: str
    image_id: int | str
    shard: str = ""
    row: int = -1


def _walk(folder: Path, exclude: Path | None) -> list[tuple[str, str]]:
    """(absolute path, path relative to ``folder``) of the image files below ``folder``, sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and (exclude is None or Path(root, d) != exclude)]
        for f in files:
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES:
                path = Path(root, f)
                found.append((str(path), path.relative_to(folder).as_posix()))
    return sorted(found, key=lambda p: p[1])


def _glob_root(pattern: str) -> Path:
    """The folder of a glob pattern's leading non-magic components (what its matches are relative to)."""
    parts = Path(pattern).parts
    fixed = parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
    return Path(*fixed) if fixed else Path(".")


def find_images(spec: str, exclude: Path | None = None) -> list[tuple[str, str]]:
    """(absolute path, path relative to the input root) of every image an ``--input`` names, sorted by the
    relative path; [] when nothing matches. ``exclude``: a folder never entered (the output folder)."""
    path = Path(spec)
    if path.is_file():
        return [(str(path.resolve()), path.name)]
    if path.is_dir():
        return [(str(Path(p).resolve()), rel) for p, rel in _walk(path, exclude)]
    if not glob.has_magic(spec):
        return []
    root = _glob_root(spec)
    matches = [Path(m) for m in glob.glob(spec, recursive=True)]
    files = [
        m for m in matches if m.is_file() and (exclude is None or not m.resolve().is_relative_to(exclude))
    ]
    return sorted(((str(m.resolve()), m.relative_to(root).as_posix()) for m in files), key=lambda p: p[1])


def output_names(rels: list[str]) -> list[str]:
    """Output names of unique relative paths: the path without its suffix (``a/b.jpg`` -> ``a/b``); paths
    whose stems collide keep their suffix as ``_<suffix>`` (``a/b.jpg`` -> ``a/b_jpg``). ValueError in the
    rare case that this still leaves two equal names (``a/b.jpg`` beside a file named ``a/b_jpg``)."""
    stems = [str(Path(r).with_suffix("")) for r in rels]
    counts = Counter(stems)
    names = [s if counts[s] == 1 else s + "_" + Path(r).suffix.lstrip(".") for s, r in zip(stems, rels)]
    twice = [n for n, c in Counter(names).items() if c > 1]
    if twice:
        raise ValueError(f"inputs would share the output name {twice[0]!r}: rename one of them")
    return names


def image_ids(keys: list[str], texts: list[str]) -> list[int | str]:
    """COCO image ids: ``int(key)`` for an all-digit key (``000000142238`` -> 142238, as the COCO JSONs have
    them), else the matching ``texts`` entry; all ``texts`` (unique) when the ints would collide."""
    ids: list[int | str] = [int(k) if k.isdigit() else t for k, t in zip(keys, texts)]
    return ids if len(set(ids)) == len(ids) else list(texts)


def file_items(found: list[tuple[str, str]]) -> list[Item]:
    """`Item`s of `find_images`' files; image id: the int of an all-digit file stem, else the output name."""
    names = output_names([rel for _, rel in found])
    ids = image_ids([Path(n).name for n in names], names)
    return [Item(n, p, rel, i) for (p, rel), n, i in zip(found, names, ids)]


def prepared_items(data_dir: str, split: str) -> list[Item]:
    """`Item`s of every record of a prepared split, in record order (reads two columns of each shard); the
    output names are the image files' (without their folders when that keeps them unique)."""
    read_manifest(data_dir, split)  # FileNotFoundError / ValueError naming the manifest
    where = split_dir(data_dir, split)
    rows = []
    for shard in shard_paths(data_dir, split):
        table = read_shard(shard, ["record_id", "file_name"]).to_pylist()
        rows += [(shard, i, str(r["record_id"]), str(r["file_name"])) for i, r in enumerate(table)]
    bases = [Path(f).name for _, _, _, f in rows]  # "val2017/x.jpg" -> "x" while the base names are unique
    names = output_names(bases if len(set(bases)) == len(bases) else [f for _, _, _, f in rows])
    record_ids = [rid for _, _, rid, _ in rows]
    ids = image_ids(record_ids, record_ids)
    return [
        Item(n, f"{where}#{rid}", f, i, shard, row) for (shard, row, rid, f), n, i in zip(rows, names, ids)
    ]


def to_rgb(image: Image.Image) -> np.ndarray:
    """A decoded PIL image as uint8 RGB [H, W, 3] after its EXIF orientation (see the module docstring)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            values = np.clip(values, 0, SIXTEEN_BIT_MAX) * (EIGHT_BIT_MAX / SIXTEEN_BIT_MAX)
        grey = np.rint(np.clip(values, 0, EIGHT_BIT_MAX)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_file(path: str) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3]; `RecordError` (code and reason) when it cannot be read."""
    image = open_image(read_bytes(Path(path), path), path)
    try:
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError) as exc:  # e.g. a malformed EXIF block
        raise RecordError(UNREADABLE_FILE, path, f"cannot convert image ({exc})") from None


def skip_reason(exc: Exception) -> tuple[str, str]:
    """(code, reason) of a decoding failure: a `RecordError`'s, or any other exception as unreadable."""
    if isinstance(exc, RecordError):
        return exc.code, exc.message
    return UNREADABLE_FILE, f"{type(exc).__name__}: {exc}"


def read_prepared(shard: str, rows: list[int]) -> dict[int, np.ndarray]:
    """{row: uint8 RGB [H, W, 3]} of rows of one prepared shard, decoded as evaluation decodes them
    (`pipeline.data.records.decode_image`); only the row groups holding them are read."""
    parquet = open_shard(shard)
    wanted, out, start = sorted(set(rows)), {}, 0
    for group in range(parquet.metadata.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        inside = [r for r in wanted if start <= r < start + size]
        if inside:
            images = parquet.read_row_group(group, columns=["image"]).column("image")
            out.update({r: decode_image(images[r - start].as_py()) for r in inside})
        start += size
    return out
