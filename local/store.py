"""The local object store: `s3://bucket/key` <-> `<home>/s3/bucket/key`.

It follows S3's semantics where the runner relies on them: a URI used as an input is a *key
prefix* (all objects whose key starts with it, as SageMaker's S3Prefix inputs), an object is
written whole or not at all (temporary name, then rename), and outputs are uploaded as
`<prefix>/<path relative to the local folder>`. Keys that would escape the store ('..', absolute
parts) are refused.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from local.files import copy_file_atomic, is_partial, sha256_file, walk_files, write_bytes_atomic

SCHEME = "s3://"


class StoreError(Exception):
    """A URI the store cannot map, or an object it does not hold."""


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not isinstance(uri, str) or not uri.startswith(SCHEME):
            raise StoreError(f"{uri!r} is not an s3:// URI (expected s3://bucket/key)")
        bucket, _, key = uri[len(SCHEME) :].partition("/")
        if not bucket or bucket in (".", "..") or "\\" in bucket:
            raise StoreError(f"{uri!r} has no valid bucket name")
        parts = [part for part in key.split("/") if part]
        if any(part in (".", "..") for part in parts):
            raise StoreError(f"{uri!r}: '.' and '..' are not allowed in keys of the local store")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    def child(self, relative: str) -> S3Uri:
        base = self.key.rstrip("/")
        return S3Uri(self.bucket, f"{base}/{relative}" if base else relative)


@dataclass(frozen=True)
class StoredObject:
    uri: S3Uri
    path: Path


class ObjectStore:
    """S3-like storage rooted at a folder (normally `<home>/s3`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # --- mapping -------------------------------------------------------------------------
    def path_for(self, uri: str | S3Uri) -> Path:
        """The file (or folder, for a prefix) that holds `uri`."""
        parsed = uri if isinstance(uri, S3Uri) else S3Uri.parse(uri)
        parts = [part for part in parsed.key.split("/") if part]
        return self.root.joinpath(parsed.bucket, *parts)

    # --- writing -------------------------------------------------------------------------
    def put_bytes(self, uri: str, data: bytes) -> None:
        write_bytes_atomic(self._object_path(uri), data)

    def put_file(self, source: Path, uri: str) -> None:
        copy_file_atomic(Path(source), self._object_path(uri))

    def put_tree(self, folder: Path, prefix_uri: str) -> list[str]:
        """Upload every file under `folder` to `<prefix_uri>/<relative path>`; returns the URIs."""
        prefix = S3Uri.parse(prefix_uri)
        written = []
        for path in walk_files(Path(folder)):
            target = prefix.child(path.relative_to(folder).as_posix())
            self.put_file(path, str(target))
            written.append(str(target))
        return written

    def put_objects(self, objects: Mapping[str, bytes]) -> None:
        """Store several objects given as {s3 URI: bytes} (e.g. the code the SDK uploaded)."""
        for uri, data in objects.items():
            self.put_bytes(uri, data)

    def put_tree_versioned(self, folder: Path, base_uri: str) -> str:
        """Upload `folder` under `<base_uri>/<content hash>/` and return that prefix URI.

        The same content always lands at the same URI and different content never does, so a
        cached step that reads it is reused exactly when the data is unchanged.
        """
        digest = tree_digest(Path(folder))[:16]
        prefix = str(S3Uri.parse(base_uri).child(digest))
        if not self.list_prefix(prefix + "/"):
            self.put_tree(Path(folder), prefix)
        return prefix

    def delete_prefix(self, prefix_uri: str) -> None:
        for stored in self.list_prefix(prefix_uri):
            stored.path.unlink(missing_ok=True)

    # --- reading -------------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        return self.path_for(uri).is_file()

    def read_bytes(self, uri: str) -> bytes:
        path = self.path_for(uri)
        if not path.is_file():
            raise StoreError(f"{uri} is not in the local object store (looked for {path})")
        return path.read_bytes()

    def list_prefix(self, prefix_uri: str | S3Uri) -> list[StoredObject]:
        """Objects whose key starts with the prefix, sorted by key (S3 ListObjects semantics)."""
        prefix = prefix_uri if isinstance(prefix_uri, S3Uri) else S3Uri.parse(prefix_uri)
        bucket_root = self.root / prefix.bucket
        if not bucket_root.is_dir():
            return []
        folder_key, _, name_start = prefix.key.rpartition("/")
        folder = self.path_for(S3Uri(prefix.bucket, folder_key)) if folder_key else bucket_root
        if not folder.is_dir():
            return []
        found = []
        for entry in sorted(folder.iterdir()):
            if not entry.name.startswith(name_start) or is_partial(entry.name):
                continue
            paths: Iterator[Path] = walk_files(entry) if entry.is_dir() else iter([entry])
            for path in paths:
                key = path.relative_to(bucket_root).as_posix()
                found.append(StoredObject(S3Uri(prefix.bucket, key), path))
        return sorted(found, key=lambda stored: stored.uri.key)

    def get(self, uri: str, target_folder: Path) -> list[Path]:
        """Copy the objects under `uri` into `target_folder`, as SageMaker fills an input.

        Keys are placed relative to the prefix; a URI naming one object exactly puts that object
        in the folder under its own name (how `.../model.tar.gz` reaches /opt/ml/processing/model).
        Raises StoreError when nothing matches, as SageMaker does for an empty S3 input.
        """
        parsed = S3Uri.parse(uri)
        objects = self.list_prefix(parsed)
        if not objects:
            raise StoreError(
                f"no objects under {uri} in the local object store (looked in {self.path_for(parsed)})"
            )
        target_folder = Path(target_folder)
        target_folder.mkdir(parents=True, exist_ok=True)
        copied = []
        for stored in objects:
            relative = stored.uri.key[len(parsed.key) :].lstrip("/")
            if not relative:
                relative = stored.path.name
            destination = target_folder / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(stored.path, destination)
            copied.append(destination)
        return copied

    def digest(self, uri: str) -> str:
        """A content hash of every object under `uri` (keys relative to it, and their bytes)."""
        parsed = S3Uri.parse(uri)
        digest = hashlib.sha256()
        for stored in self.list_prefix(parsed):
            digest.update(stored.uri.key[len(parsed.key) :].encode("utf-8") + b"\0")
            digest.update(bytes.fromhex(sha256_file(stored.path)))
        return digest.hexdigest()

    # --- internals -----------------------------------------------------------------------
    def _object_path(self, uri: str) -> Path:
        parsed = S3Uri.parse(uri)
        if not parsed.key or parsed.key.endswith("/"):
            raise StoreError(f"{uri!r} names a prefix, not an object (add a file name)")
        path = self.path_for(parsed)
        for parent in path.relative_to(self.root).parents:
            candidate = self.root / parent
            if candidate != self.root and candidate.is_file():
                raise StoreError(f"cannot store {uri}: {candidate} is already an object, not a prefix")
        if path.is_dir():
            raise StoreError(f"cannot store {uri}: objects already exist under it as a prefix")
        return path


def tree_digest(folder: Path) -> str:
    """A content hash of a local folder (relative paths and bytes of every file)."""
    digest = hashlib.sha256()
    for path in walk_files(folder):
        digest.update(path.relative_to(folder).as_posix().encode("utf-8") + b"\0")
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def import_objects(home: Path, objects: Mapping[str, bytes], bucket: str | None = None) -> list[str]:
    """Put the code bundles the SDK uploaded while building a definition into the store under
    `home`, so a run uses the code as it was then. Keys are s3:// URIs, or object keys in
    `bucket` when it is given. Returns the URIs written."""
    from local.home import store_root

    uris = {(f"{SCHEME}{bucket}/{key.lstrip('/')}" if bucket else key): data for key, data in objects.items()}
    ObjectStore(store_root(Path(home))).put_objects(uris)
    return list(uris)
