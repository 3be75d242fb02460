"""Small file helpers shared by the local runtime: atomic writes, JSON, tarballs, hashing.

Every file the runner leaves behind is written to a temporary name in the same folder and then
renamed over the target, so a reader (or a run killed with SIGKILL) only ever sees the old
content or the new one, never half of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Temporary files carry this marker so that listings of the object store can ignore them.
PARTIAL_MARKER = ".kennel-partial-"


def _new_file_mode() -> int:
    """The mode open() would give a new file (0666 less the umask); mkstemp's own is 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_sibling(target: Path) -> tuple[int, str]:
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}{PARTIAL_MARKER}", dir=target.parent)
    os.fchmod(fd, _new_file_mode())
    return fd, temp_name


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = _temp_sibling(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        _remove_quietly(Path(temp_name))
        raise


def copy_file_atomic(source: Path, target: Path) -> None:
    """Copy `source` to `target` through a temporary sibling and a rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = _temp_sibling(target)
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_name, target)
    except BaseException:
        _remove_quietly(Path(temp_name))
        raise


def write_json_atomic(path: Path, document: Any) -> None:
    """Write `document` as indented JSON, atomically."""
    text = json.dumps(document, indent=2, sort_keys=False, default=str)
    write_bytes_atomic(path, (text + "\n").encode("utf-8"))


def read_json(path: Path) -> Any:
    with path.open("r", encoding="utf-8") as handle:
        return json.load(handle)


def is_partial(name: str) -> bool:
    """True for the temporary names used by the atomic writers."""
    return PARTIAL_MARKER in name


def walk_files(root: Path) -> Iterator[Path]:
    """Every regular file under `root` in a stable (sorted) order, skipping partial writes."""
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not is_partial(name):
                yield Path(folder) / name


def tar_folder(folder: Path, target: Path) -> None:
    """Pack the contents of `folder` (not the folder itself) into a gzipped tarball, atomically.

    SageMaker's model.tar.gz holds the files of /opt/ml/model at its top level; the inference
    container unpacks it straight into /opt/ml/model, so the layout must match.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = _temp_sibling(target)
    os.close(fd)
    try:
        with tarfile.open(temp_name, "w:gz", compresslevel=6) as archive:
            for path in walk_files(folder):
                archive.add(path, arcname=str(path.relative_to(folder)), recursive=False)
        os.replace(temp_name, target)
    except BaseException:
        _remove_quietly(Path(temp_name))
        raise


def extract_tarball(archive_path: Path, target: Path) -> None:
    """Unpack a tarball into `target`, refusing members that would land outside it."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive_path, "r:*") as archive:
        # The "data" filter rejects absolute paths, '..' and links that escape the target.
        archive.extractall(target, filter="data")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
