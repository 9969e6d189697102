"""Where persistent state lives: a local directory, a shared mount, or an object store URI.

On a real cluster the nodes share nothing but the network: a path written on one node can be read on
another only under the storage root (shared/docs/DESIGN.md, "Cluster storage"). Every room names persistent
locations as strings (paths or URIs) and reads and writes them through this module, which maps them to
``pyarrow.fs`` filesystems: a local or shared-mount path (``/mnt/efs/kmax``), ``s3://bucket/prefix``,
``gs://bucket/prefix``. An S3-compatible endpoint comes from the standard settings, ``AWS_ENDPOINT_URL_S3``
or ``AWS_ENDPOINT_URL`` (credentials and region from the usual AWS variables or the instance profile); it is
passed explicitly as ``endpoint_override``, so it works whatever the pyarrow build reads by itself.

Ray workers and tasks run in other working directories (on a cluster, on other machines), so a relative
path means nothing to them: the driver makes every path absolute before Ray starts (`absolute`).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from urllib.parse import urlparse

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
"""The standard S3 endpoint settings, most specific first (AWS CLI / SDK convention)."""
COMMIT_LAST = "manifest.json"
"""Moved last when a folder is published to an object store (pipeline.data.records' manifest)."""
STORAGE_VARIABLE = "KMAX_STORAGE"
"""The environment variable that sets the storage root when no ``--storage`` / ``storage`` is given."""


def is_uri(location: str) -> bool:
    """True for ``scheme://...`` (object stores, MLflow servers), False for file-system paths."""
    return "://" in location


def absolute(location: str) -> str:
    """A path made absolute against this process's working directory (``~`` expanded); URIs unchanged."""
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for a path or a URI (URIs always join with ``/``)."""
    if is_uri(location):
        return posixpath.join(location.rstrip("/"), *parts)
    return os.path.join(location, *parts)


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint URL from the standard environment settings, or None (AWS itself)."""
    return next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)


def filesystem(location: str):
    """``(pyarrow filesystem, path inside it)`` of a location; see the module docstring."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), absolute(location)
    parsed = urlparse(location)
    if parsed.scheme == "s3":
        endpoint = s3_endpoint()
        kwargs = {}
        if endpoint:
            url = urlparse(endpoint)
            kwargs = {"endpoint_override": url.netloc or url.path, "scheme": url.scheme or "https"}
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme == "file":
        return pafs.LocalFileSystem(), parsed.path
    return pafs.FileSystem.from_uri(location)


def exists(location: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(location: str) -> bytes:
    """The whole object or file; FileNotFoundError naming the location when absent."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{location} does not exist") from None
    except OSError as exc:
        if not exists(location):
            raise FileNotFoundError(f"{location} does not exist") from None
        raise OSError(f"cannot read {location}: {exc}") from exc


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str, data: bytes) -> str:
    """Write a whole file or object, atomically where the filesystem allows it: locally (and on a shared
    mount) under a temporary name moved into place, so a reader never sees half a file; an object store
    PUT is atomic by itself. Parent folders are created. Returns the location."""
    fs, path = filesystem(location)
    parent = posixpath.dirname(path) if is_uri(location) else os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if is_uri(location):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return location
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return location


def write_text(location: str, text: str) -> str:
    return write_bytes(location, text.encode())


def list_names(location: str) -> list[str]:
    """Names directly inside a folder or prefix (sorted); empty when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def make_dirs(location: str) -> None:
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)


def delete_dir(location: str) -> None:
    """Remove a folder or prefix with everything under it (nothing when absent)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def replace_dir(tmp: str, final: str) -> None:
    """Put the finished folder ``tmp`` in place of ``final``. On a file system: renames (atomic on one
    filesystem), the old folder removed last. On an object store, where nothing renames: the old prefix is
    removed, then each object moved, the manifest-like last name last, so a reader that finds the last
    object finds everything."""
    fs, final_path = filesystem(final)
    if not is_uri(final):
        old = f"{final_path}.old-{os.getpid()}"
        if os.path.exists(final_path):
            os.rename(final_path, old)
        os.rename(filesystem(tmp)[1], final_path)
        delete_dir(old)
        return
    delete_dir(final)
    names = list_names(tmp)
    for name in sorted(names, key=lambda n: n == COMMIT_LAST):
        fs.move(filesystem(join(tmp, name))[1], f"{final_path}/{name}")
    delete_dir(tmp)
