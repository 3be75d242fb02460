"""evaluate.py: the report on the sample's test split, and every input a user can get wrong."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import contract
import evaluate
import nets
from images import decode_rgb
from presets import EvalPreset

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "entrypoints" / "evaluate.py"
SAMPLE_TEST = REPO_ROOT / "data" / "sample" / "test"


# --- helpers ---------------------------------------------------------------------------------


def pack_model(model_dir: Path, tarball: Path) -> Path:
    """model.tar.gz as SageMaker packs SM_MODEL_DIR: the folder's files at the archive's root."""
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "w:gz") as archive:
        for path in sorted(model_dir.iterdir()):
            archive.add(path, arcname=path.name)
        code = b"# inference code would live here\n"
        info = tarfile.TarInfo("code/requirements.txt")
        info.size = len(code)
        archive.addfile(info, io.BytesIO(code))
    return tarball


def tarball_with(tarball: Path, model_dir: Path, extra: tarfile.TarInfo, data: bytes = b"") -> Path:
    """A model archive with the real model files plus one hand-made member."""
    pack_model(model_dir, tarball.with_suffix(".tmp"))
    with tarfile.open(tarball.with_suffix(".tmp")) as source, tarfile.open(tarball, "w:gz") as archive:
        for member in source.getmembers():
            archive.addfile(member, source.extractfile(member) if member.isfile() else None)
        extra.size = len(data)
        archive.addfile(extra, io.BytesIO(data) if extra.isfile() else None)
    tarball.with_suffix(".tmp").unlink()
    return tarball


def run_main(base: Path, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    """evaluate.main in this process, with the /opt/ml layout under `base`."""
    monkeypatch.setenv(contract.BASE_DIR_VARIABLE, str(base))
    return evaluate.main(evaluate.get_args_parser().parse_args(["--workers", "0", *argv]))


def json_get(document: dict, dotted: str):
    """What the pipeline's JsonGet does with a PropertyFile path."""
    for key in dotted.split("."):
        document = document[key]
    return document


def reference_scores(model_dir: Path, test_dir: Path) -> tuple[float, Counter]:
    """Mean cross-entropy and (actual, predicted) counts, computed independently of evaluate.py."""
    model, meta = nets.load_artifacts(model_dir)
    preset = EvalPreset(meta.image_size, meta.mean, meta.std)
    images, actual = [], []
    for class_dir in sorted(test_dir.iterdir()):
        for path in sorted(class_dir.glob("*.png")):
            images.append(preset(decode_rgb(path).image))
            actual.append(class_dir.name)
    targets = torch.tensor([meta.class_names.index(name) for name in actual])
    with torch.no_grad():
        logits = model(torch.stack(images))
    loss = F.cross_entropy(logits, targets).item()
    predicted = [meta.class_names[index] for index in logits.argmax(dim=1).tolist()]
    return loss, Counter(zip(actual, predicted, strict=True))


def assert_clean_failure(base: Path, output: Path, *fragments: str) -> str:
    """The failure left its one-line message for SageMaker and no evaluation.json."""
    message = (base / "output" / "message").read_text()
    assert "\n" not in message.strip()
    for fragment in fragments:
        assert fragment in message
    assert not output.exists() or list(output.iterdir()) == []  # not even a temp file
    return message


# --- the real thing: a subprocess on the re-rooted container layout --------------------------


@pytest.fixture(scope="module")
def container_run(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """evaluate.py run with only its defaults, as the processing job runs it."""
    base = tmp_path_factory.mktemp("opt-ml")
    pack_model(trained_model_dir, base / "processing" / "input" / "model" / "model.tar.gz")
    (base / "processing" / "input" / "test").symlink_to(SAMPLE_TEST)  # read only: no copy needed
    completed = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env={**os.environ, contract.BASE_DIR_VARIABLE: str(base)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = base / "processing" / "output" / contract.EVALUATION_OUTPUT
    assert completed.returncode == 0, completed.stderr
    return {
        "completed": completed,
        "output": output,
        "report": json.loads((output / "evaluation.json").read_text()),
    }


def test_report_loss_and_matrix_match_an_independent_computation(
    container_run: dict, trained_model_dir: Path
):
    report = container_run["report"]
    loss, counts = reference_scores(trained_model_dir, SAMPLE_TEST)
    assert json_get(report, contract.TEST_LOSS_JSON_PATH) == pytest.approx(loss, rel=1e-4)
    matrix = report[contract.EVALUATION_METRICS_KEY]["confusion_matrix"]
    assert {
        (actual, predicted): n for actual, row in matrix.items() for predicted, n in row.items() if n
    } == dict(counts)


def test_report_is_internally_consistent(container_run: dict):
    report = container_run["report"]
    metrics = report[contract.EVALUATION_METRICS_KEY]
    names = report["class_names"]
    matrix = metrics["confusion_matrix"]
    n_images = sum(1 for _ in SAMPLE_TEST.glob("*/*.png"))
    assert report["test_samples"] == n_images == sum(sum(row.values()) for row in matrix.values())
    trace = sum(matrix[name][name] for name in names)
    assert metrics["accuracy"]["value"] == pytest.approx(trace / n_images)
    assert json_get(report, contract.TEST_ACCURACY_JSON_PATH) == metrics["accuracy"]["value"]
    assert metrics["weighted_recall"]["value"] == pytest.approx(metrics["accuracy"]["value"])
    assert metrics["accuracy"]["value"] <= metrics["top_5_accuracy"]["value"] <= 1
    # Far above chance (0.1): classes are matched by name although the model stores them shuffled.
    assert metrics["accuracy"]["value"] > 0.4
    for name in names:
        per_class = metrics["per_class"][name]
        column = sum(matrix[actual][name] for actual in names)
        assert per_class["support"] == sum(matrix[name].values())
        assert per_class["recall"] == pytest.approx(matrix[name][name] / per_class["support"])
        assert per_class["precision"] == pytest.approx(matrix[name][name] / column if column else 0.0)
        p, r = per_class["precision"], per_class["recall"]
        assert per_class["f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)
    f1s = [metrics["per_class"][name]["f1"] for name in names]
    assert metrics["macro_f1"]["value"] == pytest.approx(sum(f1s) / len(f1s))
    assert report["model"] == {"arch": "efficientnet_lite0", "image_size": 32}


def test_report_follows_model_monitor_layout(container_run: dict):
    metrics = container_run["report"][contract.EVALUATION_METRICS_KEY]
    scalar = {name: entry for name, entry in metrics.items() if name not in ("confusion_matrix", "per_class")}
    assert {
        "loss",
        "accuracy",
        "top_5_accuracy",
        "weighted_precision",
        "weighted_recall",
        "weighted_f1",
    } <= set(scalar)
    for entry in scalar.values():
        assert isinstance(entry["value"], float)
        # 200 test images: enough for Model Monitor's standard deviation (80% subsamples).
        assert isinstance(entry["standard_deviation"], float) and entry["standard_deviation"] >= 0
    # The baseline always predicts one class: balanced sample, so its accuracy is 1 / classes.
    assert metrics["accuracy_best_constant_classifier"]["value"] == pytest.approx(1 / 10)


def test_log_line_and_output_folder(container_run: dict):
    metrics = container_run["report"][contract.EVALUATION_METRICS_KEY]
    expected = contract.TEST_METRIC_LINE.format(
        test_loss=metrics["loss"]["value"], test_accuracy=metrics["accuracy"]["value"]
    )
    assert expected in container_run["completed"].stdout.splitlines()
    assert [path.name for path in container_run["output"].iterdir()] == [contract.EVALUATION_FILE]


# --- other valid inputs ------------------------------------------------------------------------


def test_unpacked_model_and_a_subset_of_classes(trained_model_dir: Path, tmp_path: Path, monkeypatch):
    test_dir = tmp_path / "test"
    kept = ["bag", "sneaker", "trouser"]
    for name in kept:
        shutil.copytree(SAMPLE_TEST / name, test_dir / name)
    output = tmp_path / "out"
    code = run_main(
        tmp_path,
        monkeypatch,
        "--model",
        str(trained_model_dir),
        "--test",
        str(test_dir),
        "--output",
        str(output),
    )
    assert code == 0
    report = json.loads((output / contract.EVALUATION_FILE).read_text())
    metrics = report[contract.EVALUATION_METRICS_KEY]
    assert report["test_samples"] == 60
    supports = {name: entry["support"] for name, entry in metrics["per_class"].items()}
    assert supports == {name: (20 if name in kept else 0) for name in report["class_names"]}
    # Under 200 samples Model Monitor writes no standard deviation: the string "NaN".
    assert metrics["loss"]["standard_deviation"] == "NaN"


# --- inputs a user can get wrong -------------------------------------------------------------


@pytest.mark.parametrize(
    ("member", "kind"),
    [
        ("../escaped.txt", "file"),
        ("code/../../escaped.txt", "file"),
        ("{tmp_path}/escaped.txt", "file"),
        ("innocent-link", "symlink"),
    ],
)
def test_tarball_members_outside_the_model_folder_are_refused(
    trained_model_dir: Path, tmp_path: Path, monkeypatch, member: str, kind: str
):
    # The archive is unpacked into a scratch folder under tmp_path/tmp, so that anything escaping
    # it would still land inside tmp_path, where the test can look for it.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    info = tarfile.TarInfo(member.format(tmp_path=tmp_path))
    if kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = str(tmp_path / "escaped.txt")  # an absolute target outside the folder
    model_input = tmp_path / "model"
    tarball_with(model_input / "model.tar.gz", trained_model_dir, info, b"not part of a model")
    output = tmp_path / "out"
    code = run_main(
        tmp_path,
        monkeypatch,
        "--model",
        str(model_input),
        "--test",
        str(SAMPLE_TEST),
        "--output",
        str(output),
    )
    assert code == 2
    assert_clean_failure(tmp_path, output, "model.tar.gz", "refus")
    assert not list(tmp_path.rglob("escaped.txt"))
    assert list((tmp_path / "tmp").iterdir()) == []  # the scratch folder is gone too


def test_unknown_class_folder_is_one_clear_error(
    trained_model_dir: Path, tmp_path: Path, monkeypatch, capsys
):
    test_dir = tmp_path / "test"
    shutil.copytree(SAMPLE_TEST, test_dir)
    (test_dir / "unicorn").mkdir()
    shutil.copy(next((SAMPLE_TEST / "bag").glob("*.png")), test_dir / "unicorn" / "u.png")
    output = tmp_path / "out"
    code = run_main(
        tmp_path,
        monkeypatch,
        "--model",
        str(trained_model_dir),
        "--test",
        str(test_dir),
        "--output",
        str(output),
    )
    assert code == 2
    message = assert_clean_failure(tmp_path, output, "unicorn", str(test_dir), "not classes of the model")
    assert capsys.readouterr().err.strip() == f"evaluate: error: {message}"


@pytest.mark.parametrize("layout", ["empty", "empty class folders", "no such folder"])
def test_empty_test_folder_is_one_clear_error(
    trained_model_dir: Path, tmp_path: Path, monkeypatch, layout: str
):
    test_dir = tmp_path / "test"
    if layout != "no such folder":
        test_dir.mkdir()
    if layout == "empty class folders":
        (test_dir / "bag").mkdir()
        (test_dir / "bag" / "notes.txt").write_text("not an image")
    output = tmp_path / "out"
    code = run_main(
        tmp_path,
        monkeypatch,
        "--model",
        str(trained_model_dir),
        "--test",
        str(test_dir),
        "--output",
        str(output),
    )
    assert code == 2
    assert_clean_failure(tmp_path, output, f"--test {test_dir}")


def test_unreadable_test_image_is_named(trained_model_dir: Path, tmp_path: Path, monkeypatch):
    test_dir = tmp_path / "test"
    shutil.copytree(SAMPLE_TEST, test_dir)
    broken = test_dir / "coat" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing useful")
    output = tmp_path / "out"
    # One worker process: the problem must survive the trip from a DataLoader worker.
    code = run_main(
        tmp_path,
        monkeypatch,
        "--model",
        str(trained_model_dir),
        "--test",
        str(test_dir),
        "--output",
        str(output),
        "--workers",
        "1",
    )
    assert code == 2
    assert_clean_failure(tmp_path, output, str(broken))


def test_diverged_model_is_reported_not_written(trained_model_dir: Path, tmp_path: Path, monkeypatch):
    model, meta = nets.load_artifacts(trained_model_dir)
    with torch.no_grad():
        model.head[1].weight.fill_(float("nan"))
    nets.save_artifacts(tmp_path / "nan-model", model, meta)
    output = tmp_path / "out"
    model_input = tmp_path / "nan-model"
    code = run_main(
        tmp_path,
        monkeypatch,
        "--model",
        str(model_input),
        "--test",
        str(SAMPLE_TEST),
        "--output",
        str(output),
    )
    assert code == 2
    assert_clean_failure(tmp_path, output, "NaN", "training diverged")


def _tarball_without_meta_at_root(model_dir: Path, folder: Path) -> None:
    with tarfile.open(folder / "model.tar.gz", "w:gz") as archive:
        archive.add(model_dir, arcname="nested")


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("empty folder", "holds neither model.tar.gz"),
        ("no such path", "no such file or folder"),
        ("not a tar.gz", "not a readable tar.gz"),
        ("meta not at root", "at the archive's root"),
        ("corrupt weights", "cannot load the model"),
    ],
)
def test_bad_model_input_is_one_clear_error(
    trained_model_dir: Path, tmp_path: Path, monkeypatch, case, fragment
):
    model_input = tmp_path / "model"
    if case != "no such path":
        model_input.mkdir()
    if case == "not a tar.gz":
        (model_input / "model.tar.gz").write_bytes(b"this is not gzip data")
    elif case == "meta not at root":
        _tarball_without_meta_at_root(trained_model_dir, model_input)
    elif case == "corrupt weights":
        shutil.copy(trained_model_dir / contract.MODEL_META_FILE, model_input)
        (model_input / contract.MODEL_WEIGHTS_FILE).write_bytes(b"truncated")
    output = tmp_path / "out"
    code = run_main(
        tmp_path,
        monkeypatch,
        "--model",
        str(model_input),
        "--test",
        str(SAMPLE_TEST),
        "--output",
        str(output),
    )
    assert code == 2
    assert_clean_failure(tmp_path, output, fragment)


def test_missing_model_in_a_subprocess_exits_2_without_traceback(tmp_path: Path):
    base = tmp_path / "opt-ml"
    (base / "processing" / "input" / "model").mkdir(parents=True)
    (base / "processing" / "input" / "test").symlink_to(SAMPLE_TEST)
    completed = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env={**os.environ, contract.BASE_DIR_VARIABLE: str(base)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.tar.gz" in lines[0]
    message = (base / "output" / "message").read_text()
    assert lines[0] == f"evaluate: error: {message}"
    assert not (
        base / "processing" / "output" / contract.EVALUATION_OUTPUT / contract.EVALUATION_FILE
    ).exists()
