"""prepare.py: run as the processing step runs it (a subprocess), plus table tests of its pure parts."""

from __future__ import annotations

import io
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import contract
import prepare
from images import ImageRejected, decode_rgb

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "data" / "sample"
SAMPLE_CLASSES = sorted(folder.name for folder in (SAMPLE / "train").iterdir())


def run_prepare(
    base: Path, *args: str | Path, env: dict[str, str] | None = None, memory_limit: int | None = None
) -> subprocess.CompletedProcess[str]:
    """prepare.py in a child process with /opt/ml re-rooted at `base` (so the message file lands there).

    `memory_limit` caps the child's address space (bytes): an allocation beyond it fails, so a test
    can tell that a file was judged without being decoded.
    """
    child_env = {**os.environ, contract.BASE_DIR_VARIABLE: str(base), **(env or {})}
    limit = None
    if memory_limit is not None:
        child_env["OPENBLAS_NUM_THREADS"] = "1"  # numpy's per-thread buffers would eat the budget

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return subprocess.run(
        [sys.executable, "entrypoints/prepare.py", *map(str, args)],
        cwd=REPO_ROOT, env=child_env, capture_output=True, text=True, timeout=120, check=False,
        preexec_fn=limit,
    )


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def files_by_split(output: Path) -> dict[str, dict[str, set[str]]]:
    return {
        split: {folder.name: {f.name for f in folder.iterdir()} for folder in (output / split).iterdir()}
        for split in contract.SPLITS
    }


def copy_sample(dest: Path, classes: list[str], per_split: int) -> None:
    """A splits-layout copy of the sample: `per_split` images of each class in each split."""
    for split in contract.SPLITS:
        for label in classes:
            target = dest / split / label
            target.mkdir(parents=True)
            for source in sorted((SAMPLE / split / label).iterdir())[:per_split]:
                shutil.copyfile(source, target / source.name)


def class_tree(dest: Path, sizes: dict[str, int]) -> Path:
    """A class-per-folder tree from the sample (all its splits pooled), `sizes[label]` images each."""
    for label, size in sizes.items():
        target = dest / label
        target.mkdir(parents=True)
        pooled = sorted(path for split in contract.SPLITS for path in (SAMPLE / split / label).iterdir())
        for source in pooled[:size]:
            shutil.copyfile(source, target / source.name)
    return dest


def encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def noise(mode: str, size: int = 32) -> Image.Image:
    return Image.effect_noise((size, size), 60).convert(mode)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with almost no pixel data: a bomb's
    header, a few bytes on disk. Decoding it would allocate 4 bytes per declared pixel first."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


# Grey ramps whose stretch over 0-255 is exact: pixel k (row-major, 16x16) must come out as k.
RAMP = np.arange(256).reshape(16, 16)


def ramp_image(mode: str) -> Image.Image:
    """RAMP in a high-depth mode, on an offset and scale that the conversion must undo."""
    if mode == "F":
        return Image.fromarray((RAMP / 127.5 - 1).astype(np.float32))  # -1.0 ... 1.0
    if mode == "I":
        return Image.fromarray((RAMP * 1000 - 70_000).astype(np.int32))  # signed 32-bit
    big_endian = mode == "I;16B"
    values = (RAMP * 256 + 100).astype(">u2" if big_endian else "<u2")  # 100 ... 65380
    return Image.frombytes(mode, (16, 16), values.tobytes())


def premultiplied_grey_tiff(grey: int, alpha: int) -> bytes:
    """A grey + associated (premultiplied) alpha TIFF, which Pillow opens in mode La.

    Pillow writes LA with unassociated alpha (ExtraSamples = 2); scanners and image editors also
    write associated alpha (ExtraSamples = 1): patch that one tag value."""
    data = encoded(Image.new("LA", (16, 16), (grey, alpha)), "TIFF")
    extra_samples = struct.pack("<HHIH", 338, 3, 1, 2)  # tag, SHORT, count 1, value 2
    assert data.count(extra_samples) == 1
    return data.replace(extra_samples, struct.pack("<HHIH", 338, 3, 1, 1))


# A Pillow plugin, loaded into the prepare child through sitecustomize, whose decoder fails the way
# decoder bugs do: with an exception type that Pillow never documents for a bad file.
BROKEN_DECODER_PLUGIN = """
from PIL import Image, ImageFile

class BrokenDecoderFile(ImageFile.ImageFile):
    format = "KENNELBROKEN"
    format_description = "a format whose decoder has a bug"

    def _open(self):
        self._size, self._mode = (32, 32), "L"

    def load(self):
        raise KeyError("decoder state")

Image.register_open(BrokenDecoderFile.format, BrokenDecoderFile, lambda prefix: prefix[:12] == b"KENNELBROKEN")
"""


# --- end to end --------------------------------------------------------------------------------


def test_bundled_sample_passes_through(tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = run_prepare(tmp_path / "base", "--input", SAMPLE, "--output", output, "--workers", "2")

    assert result.returncode == 0, result.stderr
    manifest = read_json(output / "report" / contract.MANIFEST_FILE)
    report = read_json(output / "report" / contract.DATA_REPORT_FILE)
    assert manifest["classes"] == SAMPLE_CLASSES and len(SAMPLE_CLASSES) == 10
    assert manifest["class_to_idx"] == {label: i for i, label in enumerate(SAMPLE_CLASSES)}
    assert manifest["layout"] == "splits"
    written = files_by_split(output)
    for split in contract.SPLITS:
        for label in SAMPLE_CLASSES:
            sources = {p.name for p in (SAMPLE / split / label).iterdir()}
            assert written[split][label] == sources  # same stems, PNG in, PNG out
            assert manifest["counts"][split][label] == len(sources)
    assert report["kept"] == manifest["totals"]["all"] == 1400
    assert report["rejected"] == [] and report["converted"] == {"L": 1400}
    first_class = SAMPLE_CLASSES[0]
    with Image.open(output / "train" / first_class / min(written["train"][first_class])) as img:
        assert img.mode == "RGB"
    assert "kept=1400" in result.stdout
    assert not [p for p in output.iterdir() if p.name.startswith(".")]  # staging removed


def test_class_tree_is_split_stratified_and_reproducibly(tmp_path: Path) -> None:
    sizes = {"bag": 60, "coat": 41, "dress": 25}
    tree = class_tree(tmp_path / "tree", sizes)
    fractions = ["--valid-fraction", "0.2", "--test-fraction", "0.15"]

    def split_with(seed: int, name: str) -> dict[str, dict[str, set[str]]]:
        output = tmp_path / name
        result = run_prepare(
            tmp_path / "base", "--input", tree, "--output", output, "--seed", seed, *fractions
        )
        assert result.returncode == 0, result.stderr
        manifest = read_json(output / "report" / contract.MANIFEST_FILE)
        assert manifest["layout"] == "split_by_prepare" and manifest["seed"] == seed
        assert manifest["fractions"] == {"valid": 0.2, "test": 0.15}
        return files_by_split(output)

    first, again, other = split_with(7, "a"), split_with(7, "b"), split_with(8, "c")

    assert first == again
    assert first != other
    for label, size in sizes.items():
        parts = [first[split][label] for split in contract.SPLITS]
        assert set().union(*parts) == {p.name for p in (tree / label).iterdir()}  # nothing lost
        assert sum(len(part) for part in parts) == size  # no file in two splits
        assert len(first["valid"][label]) == round(size * 0.2 + 1e-9)
        assert len(first["test"][label]) == round(size * 0.15 + 1e-9)


def make_messy_dataset(root: Path) -> dict[str, str]:
    """Two sample classes plus every kind of bad and odd file in train/bag; returns bad file -> reason."""
    copy_sample(root, ["bag", "coat"], per_split=3)
    bag = root / "train" / "bag"
    jpeg = encoded(noise("RGB"), "JPEG")
    bad = {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "corrupt"),
        "empty.png": (b"", "empty"),
        "notes.jpg": (b"shopping list: kibble, leash\n", "not_an_image"),
        "tiny.png": (encoded(noise("L", 8), "PNG"), "too_small"),
        "bomb.png": (encoded(Image.new("L", (200, 200)), "PNG"), "decompression_bomb"),
    }
    for name, (data, _) in bad.items():
        (bag / name).write_bytes(data)
    rgba = noise("RGBA")
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent: composited on white
    (bag / "cmyk.jpg").write_bytes(encoded(noise("CMYK"), "JPEG"))
    (bag / "rgba.png").write_bytes(encoded(rgba, "PNG"))
    grey16 = Image.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 50)
    (bag / "grey16.png").write_bytes(encoded(grey16, "PNG"))
    (bag / "palette.png").write_bytes(encoded(noise("RGB").convert("P"), "PNG"))
    (bag / "photo.jpg").write_bytes(jpeg)
    (bag / "sub").mkdir()
    (bag / "sub" / "photo.png").write_bytes(encoded(noise("L"), "PNG"))  # same stem as photo.jpg
    (bag / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (bag / ".ipynb_checkpoints").mkdir()
    (bag / ".ipynb_checkpoints" / "photo-checkpoint.png").write_bytes(encoded(noise("L"), "PNG"))
    return {f"train/bag/{name}": reason for name, (_, reason) in bad.items()}


def test_bad_files_are_rejected_and_the_rest_converted(tmp_path: Path) -> None:
    source, output = tmp_path / "in", tmp_path / "out"
    expected_rejections = make_messy_dataset(source)

    result = run_prepare(
        tmp_path / "base", "--input", source, "--output", output, "--max-pixels", "10000", "--workers", "2"
    )

    assert result.returncode == 0, result.stderr
    report = read_json(output / "report" / contract.DATA_REPORT_FILE)
    assert {entry["path"]: entry["reason"] for entry in report["rejected"]} == expected_rejections
    assert all(entry["split"] == "train" and entry["class"] == "bag" and entry["detail"]
               for entry in report["rejected"])
    assert report["rejected_count"] == len(expected_rejections)
    assert {entry["path"]: entry["reason"] for entry in report["skipped"]} == {
        "train/bag/.DS_Store": "hidden", "train/bag/.ipynb_checkpoints": "hidden"
    }
    sample_copies = 2 * 3 * len(contract.SPLITS)
    assert report["converted"] == {"CMYK": 1, "I;16": 1, "L": sample_copies + 1, "P": 1, "RGBA": 1}
    assert report["copied"] == 1 and report["kept"] == sample_copies + 6

    bag = output / "train" / "bag"
    new_names = {p.name for p in bag.iterdir()} - {p.name for p in (SAMPLE / "train" / "bag").iterdir()}
    assert new_names == {"cmyk.png", "rgba.png", "grey16.png", "palette.png", "photo.jpg", "photo_1.png"}
    assert (bag / "photo.jpg").read_bytes() == (source / "train" / "bag" / "photo.jpg").read_bytes()
    for path in bag.iterdir():
        with Image.open(path) as img:
            assert img.mode == "RGB", path
    with Image.open(bag / "rgba.png") as img:
        assert img.getpixel((0, 0)) == (255, 255, 255)
    with Image.open(bag / "grey16.png") as img:
        assert img.getextrema() == ((0, 255), (0, 255), (0, 255))  # 16-bit range scaled, not clipped
    manifest = read_json(output / "report" / contract.MANIFEST_FILE)
    assert manifest["counts"]["train"]["bag"] == len(list(bag.iterdir()))
    assert "rejected=5" in result.stdout and "corrupt=1" in result.stdout


def test_high_bit_depths_convert_and_bombs_and_decoder_failures_are_reported(tmp_path: Path) -> None:
    source, output, plugins = tmp_path / "in", tmp_path / "out", tmp_path / "plugins"
    copy_sample(source, ["bag", "coat"], per_split=2)
    bag = source / "train" / "bag"
    (bag / "grey16be.tif").write_bytes(encoded(ramp_image("I;16B"), "TIFF"))
    assert (bag / "grey16be.tif").read_bytes()[:2] == b"MM"  # big-endian: Motorola byte order
    (bag / "float.tif").write_bytes(encoded(ramp_image("F"), "TIFF"))
    (bag / "bomb.png").write_bytes(png_header_only(30_000, 30_000))  # 900M pixels, 3.6 GB decoded
    (bag / "strip.png").write_bytes(png_header_only(200_000_000, 1))  # over Pillow's default limit
    (bag / "scan.img").write_bytes(b"KENNELBROKEN" + bytes(100))
    plugins.mkdir()
    (plugins / "sitecustomize.py").write_text(BROKEN_DECODER_PLUGIN)

    # --max-pixels above Pillow's own limit (~179M); 2 GiB of address space could not hold the bomb.
    result = run_prepare(
        tmp_path / "base", "--input", source, "--output", output, "--max-pixels", "500000000",
        "--workers", "2", env={"PYTHONPATH": str(plugins)}, memory_limit=2 << 30,
    )

    assert result.returncode == 0, result.stderr
    report = read_json(output / "report" / contract.DATA_REPORT_FILE)
    rejected = {entry["path"].removeprefix("train/bag/"): entry for entry in report["rejected"]}
    assert {name: entry["reason"] for name, entry in rejected.items()} == {
        "bomb.png": "decompression_bomb", "strip.png": "too_small", "scan.img": "undecodable"
    }
    # Kennel's limit judged the bomb (Pillow's own would have said 178956970), from its header.
    assert rejected["bomb.png"]["detail"] == "30000x30000 = 900000000 pixels, limit 500000000"
    assert rejected["strip.png"]["detail"].startswith("200000000x1")  # Pillow let it through to be judged
    assert "KeyError" in rejected["scan.img"]["detail"] and "re-save" in rejected["scan.img"]["detail"]
    assert report["converted"] == {"F": 1, "I;16B": 1, "L": 2 * 2 * len(contract.SPLITS)}
    for name in ("grey16be.png", "float.png"):
        with Image.open(output / "train" / "bag" / name) as img:
            assert img.mode == "RGB"
            assert (np.asarray(img) == RAMP[:, :, None]).all(), name
    assert "rejected=3" in result.stdout and "undecodable=1" in result.stdout


def test_sagemaker_base_dir_reroots_input_output_and_keeps_mount_points(tmp_path: Path) -> None:
    base = tmp_path / "base"
    copy_sample(base / "processing" / "input" / "data", ["bag", "coat", "dress"], per_split=2)
    (base / "processing" / "output" / "train").mkdir(parents=True)  # as SageMaker pre-creates outputs

    result = run_prepare(base, "--workers", "1")

    assert result.returncode == 0, result.stderr
    output = base / "processing" / "output"
    manifest = read_json(output / "report" / contract.MANIFEST_FILE)
    assert manifest["classes"] == ["bag", "coat", "dress"]
    assert {label: len(names) for label, names in files_by_split(output)["train"].items()} == {
        "bag": 2, "coat": 2, "dress": 2
    }
    assert not (base / "output" / "message").exists()


# --- stop conditions ---------------------------------------------------------------------------


def one_class(root: Path) -> None:
    class_tree(root, {"bag": 20})


def splits_disagree(root: Path) -> None:
    copy_sample(root, ["bag", "coat", "dress"], per_split=2)
    shutil.rmtree(root / "valid" / "coat")


def split_loses_class(root: Path) -> None:
    copy_sample(root, ["bag", "coat"], per_split=2)
    for path in (root / "test" / "coat").iterdir():
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # cut off inside the pixel data
    (root / "test" / "coat" / "empty.png").write_bytes(b"")


def class_too_small(root: Path) -> None:
    class_tree(root, {"bag": 30, "coat": 3})


def loose_files_only(root: Path) -> None:
    root.mkdir()
    for source in sorted((SAMPLE / "train" / "bag").iterdir())[:3]:
        shutil.copyfile(source, root / source.name)


def missing_test_split(root: Path) -> None:
    copy_sample(root, ["bag", "coat"], per_split=2)
    shutil.rmtree(root / "test")


def class_folder_empty(root: Path) -> None:
    copy_sample(root, ["bag", "coat", "dress"], per_split=2)
    shutil.rmtree(root / "valid" / "dress")
    (root / "valid" / "dress").mkdir()
    (root / "valid" / "dress" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # hidden: not data


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (one_class, ["at least 2 classes", "'bag'"]),
        (splits_disagree, ["disagree", "valid/ lacks coat"]),
        (split_loses_class, ["test/coat", "corrupt: 2", "empty: 1"]),
        (class_too_small, ["'coat' has 3", "at least 5"]),
        (loose_files_only, ["no folders", "<input>/<class>/<images>"]),
        (missing_test_split, ["no test/", "<input>/train/<class>/<images>"]),
        (class_folder_empty, ["no files in valid/dress;", "add images there or remove the class everywhere"]),
    ],
)
def test_stop_conditions_fail_with_one_line_and_write_nothing(
    tmp_path: Path, build: Callable[[Path], None], words: list[str]
) -> None:
    source, output, base = tmp_path / "in", tmp_path / "out", tmp_path / "base"
    build(source)

    result = run_prepare(base, "--input", source, "--output", output, "--workers", "2")

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0]
    assert (base / "output" / "message").read_text().strip() == lines[0]
    assert not output.exists()


def test_an_output_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    source, blocker = tmp_path / "in", tmp_path / "a-file"
    copy_sample(source, ["bag", "coat"], per_split=1)
    blocker.write_text("not a folder")

    result = run_prepare(tmp_path / "base", "--input", source, "--output", blocker / "out")

    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line == f"prepare: --output {blocker / 'out'}: cannot write there (Not a directory); choose a writable folder"
    assert blocker.read_text() == "not a folder"


def test_refuses_a_non_empty_output_and_leaves_it_alone(tmp_path: Path) -> None:
    source, output = tmp_path / "in", tmp_path / "out"
    copy_sample(source, ["bag", "coat"], per_split=1)
    (output / "train" / "old").mkdir(parents=True)
    (output / "train" / "old" / "keep.png").write_bytes(b"previous run")

    result = run_prepare(tmp_path / "base", "--input", source, "--output", output)

    assert result.returncode == 2 and "not empty" in result.stderr
    assert [p.relative_to(output).as_posix() for p in sorted(output.rglob("*"))] == [
        "train", "train/old", "train/old/keep.png"
    ]


# --- pure functions ----------------------------------------------------------------------------


@pytest.mark.parametrize(("valid", "test"), [(0.1, 0.1), (0.2, 0.15), (0.45, 0.45), (0.01, 0.3), (0.49, 0.5)])
def test_min_images_to_split_is_the_size_from_which_every_split_gets_one(valid: float, test: float) -> None:
    needed = prepare.min_images_to_split(valid, test)

    assert all(prepare.can_split(n, valid, test) for n in range(needed, needed + 1000))
    assert needed == 3 or not prepare.can_split(needed - 1, valid, test)
    assert all(sum(prepare.split_counts(n, valid, test)) == n for n in range(200))


def test_split_stratified_partitions_each_class_and_is_seeded_per_class() -> None:
    by_class = {"a": [f"a{i}" for i in range(50)], "b": [f"b{i}" for i in range(9)]}

    first = prepare.split_stratified(by_class, 0.2, 0.2, seed=1)
    grown = prepare.split_stratified({**by_class, "c": ["c1", "c2", "c3", "c4", "c5"]}, 0.2, 0.2, seed=1)
    reordered = prepare.split_stratified({k: v[::-1] for k, v in by_class.items()}, 0.2, 0.2, seed=1)

    for label, items in by_class.items():
        parts = [first[split][label] for split in ("train", "valid", "test")]
        assert sorted(item for part in parts for item in part) == sorted(items)
        assert tuple(map(len, parts)) == prepare.split_counts(len(items), 0.2, 0.2)
        assert all(grown[split][label] == first[split][label] for split in contract.SPLITS)
    assert reordered == first
    assert prepare.split_stratified(by_class, 0.2, 0.2, seed=2) != first


@pytest.mark.parametrize(
    ("names", "layout_or_error"),
    [
        (["bag", "coat"], "split_by_prepare"),
        (["test", "train", "valid"], "splits"),
        ([], "no folders"),
        (["train", "valid"], "no test/"),
        (["train", "valid", "test", "extras"], "(extras)"),
    ],
)
def test_detect_layout(names: list[str], layout_or_error: str) -> None:
    if layout_or_error in ("splits", "split_by_prepare"):
        assert prepare.detect_layout(names) == layout_or_error
    else:
        with pytest.raises(prepare.DatasetError, match=re.escape(layout_or_error)):
            prepare.detect_layout(names)


@pytest.mark.parametrize(
    ("paths", "stems"),
    [
        (["x/a.png", "x/b.png"], ["a", "b"]),
        (["x/a.jpg", "x/a.png", "x/sub/a.png"], ["a", "a_1", "a_2"]),
        (["x/A.png", "x/a.png"], ["A", "a_1"]),  # case-insensitive filesystems would merge them
        (["x/a.png", "x/a_1.png", "x/b/a.png"], ["a", "a_1", "a_2"]),
    ],
)
def test_output_stems_are_unique_and_deterministic(paths: list[str], stems: list[str]) -> None:
    assert prepare.output_stems([Path(p) for p in paths]) == stems


def test_check_splits_agree_names_what_each_split_lacks() -> None:
    with pytest.raises(prepare.DatasetError) as caught:
        prepare.check_splits_agree({"train": ["a", "b", "c"], "valid": ["a"], "test": ["a", "b", "c"]})
    assert "valid/ lacks b, c" in str(caught.value) and "train/" not in str(caught.value)
    prepare.check_splits_agree({"train": ["a", "b"], "valid": ["b", "a"], "test": ["a", "b"]})


def test_exif_rotated_jpeg_is_written_upright_and_plain_jpeg_copied(tmp_path: Path) -> None:
    """A phone photo stored sideways (EXIF Orientation 6) must reach training upright."""
    data = tmp_path / "in"
    copy_sample(data, SAMPLE_CLASSES[:2], per_split=2)
    wide = noise("RGB", size=64).resize((80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated_dir = data / "train" / SAMPLE_CLASSES[0]
    wide.save(rotated_dir / "sideways.jpg", format="JPEG", exif=exif)
    wide.save(rotated_dir / "plain.jpg", format="JPEG")

    result = run_prepare(tmp_path, "--input", data, "--output", tmp_path / "out", "--workers", "1")

    assert result.returncode == 0, result.stderr
    written = tmp_path / "out" / "train" / SAMPLE_CLASSES[0]
    with Image.open(written / "sideways.png") as upright:
        assert upright.size == (40, 80)
    assert (written / "plain.jpg").read_bytes() == (rotated_dir / "plain.jpg").read_bytes()


# --- decoding (images.py, shared with inference) -----------------------------------------------


@pytest.mark.parametrize(
    ("mode", "image_format"),
    [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF"), ("I", "TIFF"), ("F", "TIFF")],
)
def test_high_depth_greys_are_stretched_to_8_bits_in_every_byte_order(mode: str, image_format: str) -> None:
    decoded = decode_rgb(encoded(ramp_image(mode), image_format))

    assert decoded.source_mode == mode and decoded.image.mode == "RGB"
    assert (np.asarray(decoded.image) == RAMP[:, :, None]).all()


def test_native_and_little_endian_16_bit_modes_convert_like_the_png_mode() -> None:
    from images import to_rgb

    for mode in ("I;16L", "I;16N"):
        values = (RAMP * 256 + 100).astype("<u2" if mode == "I;16L" else "=u2")
        converted = to_rgb(Image.frombytes(mode, (16, 16), values.tobytes()))
        assert (np.asarray(converted) == RAMP[:, :, None]).all(), mode


def test_float_image_with_nan_and_infinity_keeps_its_finite_range() -> None:
    values = (RAMP / 255).astype(np.float32)  # 0.0 ... 1.0
    values[0, 1], values[0, 2] = np.nan, np.inf
    decoded = decode_rgb(encoded(Image.fromarray(values), "TIFF"))

    expected = RAMP.copy()
    expected[0, 1] = expected[0, 2] = 0  # non-finite: black, and the range is that of the rest
    assert (np.asarray(decoded.image) == expected[:, :, None]).all()


def test_premultiplied_grey_alpha_is_composited_on_white() -> None:
    decoded = decode_rgb(premultiplied_grey_tiff(grey=100, alpha=128))

    assert decoded.source_mode == "La"
    # Premultiplied 100 at alpha 128 over white: 100 + 255 * (1 - 128/255) = 227.
    assert all(abs(channel - 227) <= 1 for channel in decoded.image.getpixel((0, 0)))


def test_a_real_bomb_is_rejected_from_its_header_by_pillows_limit_or_ours() -> None:
    bomb = png_header_only(30_000, 30_000)
    assert len(bomb) < 100
    pillow_limit = Image.MAX_IMAGE_PIXELS

    with pytest.raises(ImageRejected) as by_pillow:  # 900M: over Pillow's default limit, refused on open
        decode_rgb(bomb)
    with pytest.raises(ImageRejected) as by_kennel:
        decode_rgb(bomb, max_pixels=500_000_000)

    assert by_pillow.value.reason == by_kennel.value.reason == "decompression_bomb"
    assert "exceeds limit" in by_pillow.value.detail and "limit 500000000" in by_kennel.value.detail
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # raised for the decode only


def test_max_pixels_above_pillows_limit_takes_effect() -> None:
    strip = png_header_only(200_000_000, 1)  # over Pillow's default limit, under the one we ask for

    with pytest.raises(ImageRejected) as default:
        decode_rgb(strip)
    with pytest.raises(ImageRejected) as lifted:
        decode_rgb(strip, max_pixels=300_000_000)

    assert default.value.reason == "decompression_bomb"
    assert lifted.value.reason == "too_small"  # Pillow opened it: the next check judged it
