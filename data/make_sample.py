"""Regenerate the bundled sample dataset (data/sample) from Fashion-MNIST.

Fashion-MNIST (Zalando SE, MIT licence, see data/LICENSE-fashion-mnist) ships in Debian's
`dataset-fashion-mnist` package as IDX files. This script picks the first N images of each class
(train/valid from the training file, disjoint; test from the t10k file), so the sample is
deterministic and regenerating it reproduces the committed files byte for byte.

    apt-get install dataset-fashion-mnist
    make sample            # or: .venv/bin/python data/make_sample.py
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import struct
import tempfile
from pathlib import Path

from PIL import Image

CLASSES = [
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> tuple[tuple[int, ...], bytes]:
    """Read an IDX file (the MNIST container format): big-endian dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        magic = f.read(4)
        if magic[:2] != b"\x00\x00" or magic[2] != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        dims = struct.unpack(">" + "I" * magic[3], f.read(4 * magic[3]))
        return dims, f.read()


def load(source: Path, prefix: str) -> list[tuple[int, bytes]]:
    (n, rows, cols), pixels = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
    (n_labels,), labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
    if n != n_labels:
        raise ValueError(f"{source}: {n} images but {n_labels} labels")
    size = rows * cols
    return [(labels[i], pixels[i * size:(i + 1) * size]) for i in range(n)]


def pick(samples: list[tuple[int, bytes]], per_class: int, skip: int = 0) -> list[tuple[int, int, bytes]]:
    """First `per_class` images of each class after skipping the first `skip` of that class."""
    seen = [0] * len(CLASSES)
    chosen = []
    for index, (label, pixels) in enumerate(samples):
        seen[label] += 1
        if skip < seen[label] <= skip + per_class:
            chosen.append((index, label, pixels))
    return chosen


def write_split(root: Path, split: str, chosen: list[tuple[int, int, bytes]], prefix: str) -> None:
    for index, label, pixels in chosen:
        folder = root / split / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.frombytes("L", (28, 28), pixels).save(folder / f"{prefix}-{index:05d}.png", optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "sample")
    parser.add_argument("--train", type=int, default=100, help="train images per class")
    parser.add_argument("--valid", type=int, default=20, help="valid images per class")
    parser.add_argument("--test", type=int, default=20, help="test images per class")
    args = parser.parse_args(argv)
    if not (args.source / "train-images-idx3-ubyte.gz").exists():
        parser.error(f"no Fashion-MNIST files in {args.source}: apt-get install dataset-fashion-mnist, or pass --source")

    train_file = load(args.source, "train")
    test_file = load(args.source, "t10k")
    # Build next to the target and swap in at the end, so a failure never leaves half a sample.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sample-", dir=args.out.parent))
    try:
        write_split(staging, "train", pick(train_file, args.train), "train")
        write_split(staging, "valid", pick(train_file, args.valid, skip=args.train), "train")
        write_split(staging, "test", pick(test_file, args.test), "t10k")
        if args.out.exists():
            shutil.rmtree(args.out)
        staging.rename(args.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    total = sum(1 for _ in args.out.rglob("*.png"))
    print(f"wrote {total} images in {len(CLASSES)} classes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
