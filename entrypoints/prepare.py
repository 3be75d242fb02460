"""Clean and split an ImageFolder dataset: the pipeline's PrepareData processing step.

Reads either `<input>/{train,valid,test}/<class>/...` (used as is) or `<input>/<class>/...` (split
here, stratified per class and seeded), decodes every file with `images.decode_rgb`, and writes
the usable images to `<output>/{train,valid,test}/<class>/` plus `<output>/report/` (manifest and
data report). RGB JPEGs are copied byte for byte; everything else is written as an RGB PNG.

Runs unchanged in a SageMaker processing container (`/opt/ml/processing/...`) and locally with
the container layout re-rooted by $SAGEMAKER_BASE_DIR:

    python prepare.py --input data/raw --output data/prepared --workers 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import contract
from images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE, ImageRejected, decode_rgb

LAYOUT_SPLITS = "splits"
LAYOUT_SPLIT_BY_PREPARE = "split_by_prepare"
REPORT_OUTPUT = "report"
EXPECTED_LAYOUTS = (
    "expected either <input>/train/<class>/<images>, <input>/valid/<class>/<images> and "
    "<input>/test/<class>/<images>, or one folder per class: <input>/<class>/<images>"
)
JPEG_FORMATS = ("JPEG", "MPO")  # Pillow names many camera JPEGs MPO; the bytes are still a JPEG
JPEG_SUFFIXES = (".jpg", ".jpeg")
FILES_PER_TASK = 32  # files decoded per pool task: amortizes the pickling round trip
PROGRESS_EVERY = 10_000

T = TypeVar("T")


class DatasetError(Exception):
    """A problem the user can fix (bad layout, too few images, bad arguments): one line."""


@dataclass(frozen=True)
class DecodeLimits:
    min_size: int
    max_pixels: int


@dataclass(frozen=True)
class FileJob:
    source: Path
    rel: str  # path relative to the input folder, as the report names it
    split: str
    label: str
    dest_stem: Path  # staging/<split>/<class>/<stem>; the worker picks the suffix


@dataclass(frozen=True)
class FileOutcome:
    rel: str
    split: str
    label: str
    kept: bool
    reason: str = ""  # why it was rejected
    detail: str = ""
    source_mode: str = ""
    copied: bool = False  # byte-for-byte copy of an RGB JPEG


@dataclass
class Scan:
    layout: str
    # split -> class -> files for the splits layout; "" -> class -> files before prepare splits
    files: dict[str, dict[str, list[Path]]]
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Tally:
    counts: dict[str, Counter[str]] = field(default_factory=lambda: {s: Counter() for s in contract.SPLITS})
    rejected: list[dict[str, str]] = field(default_factory=list)
    converted: Counter[str] = field(default_factory=Counter)
    copied: int = 0

    def add(self, outcome: FileOutcome) -> None:
        if not outcome.kept:
            self.rejected.append(
                {"path": outcome.rel, "split": outcome.split, "class": outcome.label,
                 "reason": outcome.reason, "detail": outcome.detail}
            )
            return
        self.counts[outcome.split][outcome.label] += 1
        if outcome.copied:
            self.copied += 1
        else:
            self.converted[outcome.source_mode] += 1

    @property
    def kept(self) -> int:
        return sum(sum(per_class.values()) for per_class in self.counts.values())


# --- arguments ---------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", default=contract.opt_ml("processing", "input", "data"),
                        help="dataset folder (default: %(default)s)")
    parser.add_argument("--output", default=contract.opt_ml("processing", "output"),
                        help="writes train/, valid/, test/ and report/ here (default: %(default)s)")
    parser.add_argument("--valid-fraction", type=float, default=0.1,
                        help="share of each class put in valid when prepare splits (default: %(default)s)")
    parser.add_argument("--test-fraction", type=float, default=0.1,
                        help="share of each class put in test when prepare splits (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the split (default: %(default)s)")
    parser.add_argument("--min-size", type=int, default=DEFAULT_MIN_SIZE,
                        help="reject images whose shorter side is under this many pixels")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="reject images with more pixels than this (decompression bombs), from "
                             "their header, before decoding; also governs Pillow's own limit, so it "
                             "may be set above Pillow's default (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="decoding processes (default: %(default)s)")
    parser.add_argument("--message-file", default=contract.opt_ml("output", "message"),
                        help="on a dataset error the reason is also written here, where SageMaker "
                             "reads the job's failure message (default: %(default)s)")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("valid_fraction", "test_fraction"):
        value = getattr(args, name)
        if not 0 < value < 1:
            raise DatasetError(f"--{name.replace('_', '-')} is {value}; give a number between 0 and 1")
    if args.valid_fraction + args.test_fraction >= 1:
        raise DatasetError(
            f"--valid-fraction {args.valid_fraction} plus --test-fraction {args.test_fraction} leaves "
            "nothing for train; make their sum smaller than 1"
        )
    for name in ("workers", "min_size", "max_pixels"):
        if getattr(args, name) < 1:
            raise DatasetError(f"--{name.replace('_', '-')} must be at least 1")


# --- finding the files -------------------------------------------------------------------------


def is_hidden(name: str) -> bool:
    """.DS_Store, .ipynb_checkpoints, editor swap files: never data."""
    return name.startswith(".")


def skip_entry(path: Path, root: Path, reason: str) -> dict[str, str]:
    return {"path": path.relative_to(root).as_posix(), "reason": reason}


def visible_folders(folder: Path, root: Path, skipped: list[dict[str, str]]) -> list[Path]:
    """Sub-folders of `folder` in name order; hidden entries and loose files go to `skipped`."""
    folders = []
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        path = Path(entry.path)
        if is_hidden(entry.name):
            skipped.append(skip_entry(path, root, "hidden"))
        elif entry.is_dir():
            folders.append(path)
        else:
            skipped.append(skip_entry(path, root, "outside_class_folder"))
    return folders


def class_files(class_dir: Path, root: Path, skipped: list[dict[str, str]]) -> list[Path]:
    """Every visible regular file under `class_dir`, at any depth, in a stable order."""
    found = []
    for entry in sorted(os.scandir(class_dir), key=lambda entry: entry.name):
        path = Path(entry.path)
        if is_hidden(entry.name):
            skipped.append(skip_entry(path, root, "hidden"))
        elif entry.is_dir(follow_symlinks=False):
            found.extend(class_files(path, root, skipped))
        elif entry.is_file():
            found.append(path)
        else:  # a FIFO or socket would block or fail on read; a dangling link has nothing to read
            skipped.append(skip_entry(path, root, "not_a_regular_file"))
    return found


def detect_layout(folder_names: Sequence[str]) -> str:
    """Which input layout the top-level folder names describe, or why neither."""
    if not folder_names:
        raise DatasetError(f"the input holds no folders; {EXPECTED_LAYOUTS}")
    split_names = [name for name in folder_names if name in contract.SPLITS]
    if not split_names:
        return LAYOUT_SPLIT_BY_PREPARE
    missing = [name for name in contract.SPLITS if name not in split_names]
    if missing:
        raise DatasetError(
            f"the input has {', '.join(split_names)}/ but no {', '.join(missing)}/ folder; "
            f"{EXPECTED_LAYOUTS}"
        )
    others = sorted(set(folder_names) - set(contract.SPLITS))
    if others:
        raise DatasetError(
            f"the input mixes split folders with other folders ({', '.join(others)}); {EXPECTED_LAYOUTS}"
        )
    return LAYOUT_SPLITS


def scan_input(root: Path) -> Scan:
    skipped: list[dict[str, str]] = []
    top = visible_folders(root, root, skipped)
    layout = detect_layout([folder.name for folder in top])
    if layout == LAYOUT_SPLIT_BY_PREPARE:
        by_class = {folder.name: class_files(folder, root, skipped) for folder in top}
        return Scan(layout, {"": by_class}, skipped)
    files = {
        split: {folder.name: class_files(folder, root, skipped)
                for folder in visible_folders(root / split, root, skipped)}
        for split in contract.SPLITS
    }
    return Scan(layout, files, skipped)


# --- checks that run before anything is written -----------------------------------------------


def check_class_count(classes: Iterable[str]) -> None:
    names = sorted(classes)
    if len(names) < 2:
        found = f"only {names[0]!r}" if names else "none"
        raise DatasetError(
            f"a classifier needs at least 2 classes, found {found}; {EXPECTED_LAYOUTS}"
        )


def check_splits_agree(classes_by_split: Mapping[str, Iterable[str]]) -> None:
    """Every split must hold the same class folders, or class indices would differ between them."""
    sets = {split: set(classes) for split, classes in classes_by_split.items()}
    union = set().union(*sets.values())
    gaps = [
        f"{split}/ lacks {', '.join(sorted(union - classes))}"
        for split, classes in sets.items() if union - classes
    ]
    if gaps:
        raise DatasetError(
            f"the splits disagree on the classes: {'; '.join(gaps)}; give every split the same class "
            "folders (with images) or remove the class from all of them"
        )


def check_no_empty_classes(files: Mapping[str, Mapping[str, Sequence[Path]]]) -> None:
    empty = [f"{split}/{label}" for split, by_class in files.items()
             for label, paths in by_class.items() if not paths]
    if empty:
        raise DatasetError(f"no files in {', '.join(empty)}; add images there or remove the class everywhere")


def check_output_free(output: Path, input_dir: Path) -> None:
    if output.is_relative_to(input_dir):
        raise DatasetError(f"--output {output} is inside --input {input_dir}; write the output elsewhere")
    for name in (*contract.SPLITS, REPORT_OUTPUT):
        folder = output / name
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise DatasetError(
                f"the output folder {folder} is not empty; prepare writes only into empty folders, "
                "so remove it or choose another --output"
            )


# --- the split ---------------------------------------------------------------------------------


def round_half_up(value: float) -> int:
    # round() rounds half to even (round(0.5) == 0), which would surprise anyone checking counts.
    return math.floor(value + 0.5 + 1e-9)


def split_counts(n: int, valid_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, valid, test) sizes for a class of `n` images."""
    n_valid = round_half_up(n * valid_fraction)
    n_test = round_half_up(n * test_fraction)
    return n - n_valid - n_test, n_valid, n_test


def can_split(n: int, valid_fraction: float, test_fraction: float) -> bool:
    return min(split_counts(n, valid_fraction, test_fraction)) >= 1


def min_images_to_split(valid_fraction: float, test_fraction: float) -> int:
    """The size from which every class gives train, valid and test at least one image each.

    Not simply the first size that works: with large fractions both held-out splits can round up
    together (0.45/0.45: 3 images split 1/1/1, 4 images 0/2/2), so walk down from a size that
    provably works (valid and test round to >= 1 above 0.5 / fraction, and train keeps at least
    n * (1 - fractions) - 1 > 0) to the last size that fails.
    """
    n = math.ceil(max(0.5 / valid_fraction, 0.5 / test_fraction, 1.01 / (1 - valid_fraction - test_fraction)))
    n += 1
    while n > 3 and can_split(n - 1, valid_fraction, test_fraction):
        n -= 1
    return n


def check_splittable(sizes: Mapping[str, int], valid_fraction: float, test_fraction: float) -> None:
    needed = min_images_to_split(valid_fraction, test_fraction)
    small = [
        f"{label!r} has {n}" for label, n in sorted(sizes.items())
        if not can_split(n, valid_fraction, test_fraction)
    ]
    if small:
        raise DatasetError(
            f"too few images to split: {', '.join(small)}; with --valid-fraction {valid_fraction} and "
            f"--test-fraction {test_fraction} every class needs at least {needed} so that train, valid and "
            "test each get one; add images or raise the fractions"
        )


def split_stratified(
    by_class: Mapping[str, Sequence[T]], valid_fraction: float, test_fraction: float, seed: int
) -> dict[str, dict[str, list[T]]]:
    """Shuffle each class with its own seeded generator and cut it into train/valid/test.

    Seeding per class keeps a class's split unchanged when another class gains or loses images.
    """
    splits: dict[str, dict[str, list[T]]] = {split: {} for split in contract.SPLITS}
    for label in sorted(by_class):
        items = sorted(by_class[label])  # listing order differs between filesystems; sort first
        random.Random(f"{seed}/{label}").shuffle(items)
        _, n_valid, n_test = split_counts(len(items), valid_fraction, test_fraction)
        splits["valid"][label] = items[:n_valid]
        splits["test"][label] = items[n_valid:n_valid + n_test]
        splits["train"][label] = items[n_valid + n_test:]
    return splits


def plan_splits(scan: Scan, args: argparse.Namespace) -> dict[str, dict[str, list[Path]]]:
    """Check the classes and return split -> class -> source files; raises before any write."""
    if scan.layout == LAYOUT_SPLIT_BY_PREPARE:
        by_class = scan.files[""]
        check_class_count(by_class)
        check_splittable({label: len(paths) for label, paths in by_class.items()},
                         args.valid_fraction, args.test_fraction)
        return split_stratified(by_class, args.valid_fraction, args.test_fraction, args.seed)
    check_splits_agree(scan.files)
    check_class_count(scan.files["train"])
    check_no_empty_classes(scan.files)
    return scan.files


# --- decoding and writing (runs in the worker processes) --------------------------------------


def output_stems(paths: Sequence[Path]) -> list[str]:
    """One unique output stem per source file of a class folder, deterministic for sorted input.

    Sources in nested folders, or `a.png` next to `a.jpg`, would otherwise land on one name. The
    comparison ignores case because macOS and Windows filesystems do.
    """
    used: set[str] = set()
    stems = []
    for path in paths:
        stem, n = path.stem or "image", 0
        candidate = stem
        while candidate.lower() in used:
            n += 1
            candidate = f"{stem}_{n}"
        used.add(candidate.lower())
        stems.append(candidate)
    return stems


def write_atomically(dest: Path, write: Callable[[Path], None]) -> None:
    temporary = dest.with_name(f".{dest.name}.part")
    try:
        write(temporary)
        os.replace(temporary, dest)
    finally:
        temporary.unlink(missing_ok=True)


def process_file(job: FileJob, limits: DecodeLimits) -> FileOutcome:
    """Decode one file and write its RGB version; only this small outcome goes back to the parent."""
    try:
        raw = job.source.read_bytes()
    except OSError as error:
        return FileOutcome(job.rel, job.split, job.label, kept=False, reason="unreadable", detail=str(error))
    try:
        decoded = decode_rgb(raw, min_size=limits.min_size, max_pixels=limits.max_pixels)
    except ImageRejected as error:
        return FileOutcome(
            job.rel, job.split, job.label, kept=False, reason=error.reason, detail=error.detail
        )
    # A copy keeps the original bytes, so only when they already read as upright RGB.
    copy = decoded.source_format in JPEG_FORMATS and decoded.source_mode == "RGB" and not decoded.rotated
    if copy:
        suffix = job.source.suffix.lower() if job.source.suffix.lower() in JPEG_SUFFIXES else ".jpg"
        write_atomically(job.dest_stem.with_suffix(suffix), lambda path: path.write_bytes(raw))
    else:
        dest = job.dest_stem.with_suffix(".png")
        write_atomically(dest, lambda path: decoded.image.save(path, format="PNG"))
    decoded.image.close()
    return FileOutcome(job.rel, job.split, job.label, kept=True, source_mode=decoded.source_mode, copied=copy)


def process_batch(jobs: Sequence[FileJob], limits: DecodeLimits) -> list[FileOutcome]:
    return [process_file(job, limits) for job in jobs]


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_jobs(jobs: Iterable[FileJob], limits: DecodeLimits, workers: int) -> Iterator[FileOutcome]:
    """Decode in a process pool with a bounded number of tasks in flight, so memory stays flat."""
    if workers == 1:
        for job in jobs:
            yield process_file(job, limits)
        return
    pool = ProcessPoolExecutor(max_workers=workers)
    pending: set[Future[list[FileOutcome]]] = set()
    try:
        for batch in batched(jobs, FILES_PER_TASK):
            if len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield from future.result()
            pending.add(pool.submit(process_batch, batch, limits))
        for future in pending:
            yield from future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def make_jobs(
    plan: Mapping[str, Mapping[str, Sequence[Path]]], root: Path, staging: Path
) -> Iterator[FileJob]:
    for split, by_class in plan.items():
        for label, paths in by_class.items():
            folder = staging / split / label
            folder.mkdir(parents=True)
            ordered = sorted(paths)
            for path, stem in zip(ordered, output_stems(ordered), strict=True):
                yield FileJob(path, path.relative_to(root).as_posix(), split, label, folder / stem)


def decode_all(jobs: Iterable[FileJob], limits: DecodeLimits, workers: int, total: int) -> Tally:
    tally = Tally()
    for done, outcome in enumerate(run_jobs(jobs, limits, workers), start=1):
        tally.add(outcome)
        if done % PROGRESS_EVERY == 0:
            print(f"decoded {done}/{total} files, {len(tally.rejected)} rejected", flush=True)
    tally.rejected.sort(key=lambda entry: entry["path"])
    return tally


# --- checks after decoding, reports, publishing ------------------------------------------------


def check_classes_survived(tally: Tally, plan: Mapping[str, Mapping[str, Sequence[Path]]]) -> None:
    """A class whose every image in some split was rejected would silently vanish from that split."""
    lost = []
    for split, by_class in plan.items():
        for label in sorted(by_class):
            if tally.counts[split][label] == 0:
                reasons = Counter(
                    entry["reason"] for entry in tally.rejected
                    if entry["split"] == split and entry["class"] == label
                )
                why = ", ".join(f"{reason}: {n}" for reason, n in sorted(reasons.items()))
                lost.append(f"{split}/{label} (all {sum(reasons.values())} rejected: {why})")
    if lost:
        raise DatasetError(
            f"no usable images left in {'; '.join(lost)}; replace the rejected files with valid images"
        )


def build_manifest(tally: Tally, classes: Sequence[str], layout: str, args: argparse.Namespace) -> dict:
    split_here = layout == LAYOUT_SPLIT_BY_PREPARE
    totals = {split: sum(tally.counts[split].values()) for split in contract.SPLITS}
    return {
        "classes": list(classes),
        # ImageFolder's order (sorted folder names), so train and evaluate agree on indices.
        "class_to_idx": {label: index for index, label in enumerate(classes)},
        "counts": {
            split: {label: tally.counts[split][label] for label in classes} for split in contract.SPLITS
        },
        "totals": {**totals, "all": sum(totals.values())},
        "layout": layout,
        # Seed and fractions only shaped the data when prepare did the split.
        "seed": args.seed if split_here else None,
        "fractions": {"valid": args.valid_fraction, "test": args.test_fraction} if split_here else None,
    }


def build_data_report(tally: Tally, skipped: list[dict[str, str]]) -> dict:
    return {
        "rejected": tally.rejected,
        "converted": dict(sorted(tally.converted.items())),
        "copied": tally.copied,
        "kept": tally.kept,
        "rejected_count": len(tally.rejected),
        "skipped": skipped,
    }


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(payload, indent=2) + "\n"))


def publish(staging: Path, output: Path) -> None:
    """Move the staged content into place; split folders may be pre-made mount points, so move
    their contents rather than the folders. The report goes last: its presence marks completion."""
    for name in (*contract.SPLITS, REPORT_OUTPUT):
        target = output / name
        target.mkdir(exist_ok=True)
        for entry in sorted((staging / name).iterdir()):
            shutil.move(entry, target / entry.name)  # a rename; copies only across mount points


def summary_lines(manifest: dict, report: dict) -> list[str]:
    lines = [
        f"prepare: layout={manifest['layout']} classes={len(manifest['classes'])} kept={report['kept']} "
        f"rejected={report['rejected_count']} skipped={len(report['skipped'])}"
    ]
    lines += [f"  {split}: {manifest['totals'][split]} images" for split in contract.SPLITS]
    reasons = Counter(entry["reason"] for entry in report["rejected"])
    if reasons:
        lines.append("  rejected: " + ", ".join(f"{reason}={n}" for reason, n in sorted(reasons.items())))
    return lines


# --- main --------------------------------------------------------------------------------------


def resolve_folders(args: argparse.Namespace) -> tuple[Path, Path]:
    input_dir, output = Path(args.input).resolve(), Path(args.output).resolve()
    if not input_dir.is_dir():
        raise DatasetError(
            f"the input folder {input_dir} does not exist; pass --input DIR ({EXPECTED_LAYOUTS})"
        )
    check_output_free(output, input_dir)
    return input_dir, output


def prepare(args: argparse.Namespace) -> list[str]:
    """Everything the step does; returns the summary lines. Raises DatasetError for user errors."""
    check_arguments(args)
    input_dir, output = resolve_folders(args)
    scan = scan_input(input_dir)
    plan = plan_splits(scan, args)
    classes = sorted(plan["train"])
    created_output = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".prepare-staging-", dir=output))
    except OSError as error:
        raise DatasetError(
            f"--output {output}: cannot write there ({error.strerror or error}); choose a writable folder"
        ) from None
    published = False
    try:
        total = sum(len(paths) for by_class in plan.values() for paths in by_class.values())
        limits = DecodeLimits(args.min_size, args.max_pixels)
        tally = decode_all(make_jobs(plan, input_dir, staging), limits, args.workers, total)
        check_classes_survived(tally, plan)
        manifest = build_manifest(tally, classes, scan.layout, args)
        report = build_data_report(tally, scan.skipped)
        write_json(staging / REPORT_OUTPUT / contract.MANIFEST_FILE, manifest)
        write_json(staging / REPORT_OUTPUT / contract.DATA_REPORT_FILE, report)
        publish(staging, output)
        published = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not published and created_output and not any(output.iterdir()):
            output.rmdir()
    return summary_lines(manifest, report)


def write_message(message: str, message_file: Path) -> None:
    """Best effort: outside a container the default /opt/ml path is usually not writable."""
    try:
        message_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(message_file, lambda path: path.write_text(message + "\n"))
    except OSError:
        pass


def main(args: argparse.Namespace) -> int:
    try:
        lines = prepare(args)
    except DatasetError as error:
        message = f"prepare: {error}"
        print(message, file=sys.stderr)
        write_message(message, Path(args.message_file))
        return 2
    except Exception as error:  # a bug or a full disk: keep the traceback, but tell SageMaker too
        write_message(f"prepare: unexpected {type(error).__name__}: {error}", Path(args.message_file))
        raise
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
