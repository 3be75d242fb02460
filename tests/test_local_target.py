"""pipeline.local_target without running a pipeline: data staging and the state it reads."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from kennel_support import repo_config
from serving_support import EXECUTION_ARN, Tarballs, evaluation, register
from test_local_support import BUCKET, definition, get, processing_step

from local.files import PARTIAL_MARKER
from local.runner import RunOptions, run_pipeline
from local.state import load_execution
from pipeline import cli
from pipeline.errors import KennelError
from pipeline.local_target import LocalTarget
from pipeline.targets import dataset_files, dataset_name

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


@pytest.fixture
def target(tmp_path: Path) -> LocalTarget:
    return LocalTarget(repo_config().for_target("local"), home=tmp_path / ".kennel")


def small_tree(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    for label in sorted(p.name for p in (SAMPLE / "train").iterdir())[:classes]:
        (root / label).mkdir(parents=True)
        for image in sorted((SAMPLE / "train" / label).iterdir())[:per_class]:
            shutil.copyfile(image, root / label / image.name)
    return root


def test_a_folder_is_staged_by_content(target: LocalTarget, tmp_path: Path) -> None:
    tree = small_tree(tmp_path / "photos")
    (tree / ".DS_Store").write_bytes(b"finder's")  # not part of the dataset
    uri = target.stage_data(str(tree))
    assert uri.startswith("s3://kennel-local/kennel/uploads/photos-")
    assert not uri.startswith(target.config.data_uri)  # never inside the prefix the sample lives in
    assert not (target.store.path_for(uri) / ".DS_Store").exists()
    staged = sorted(p.relative_to(target.store.path_for(uri)) for p in target.store.path_for(uri).rglob("*.png"))
    assert staged == sorted(p.relative_to(tree) for p in tree.rglob("*.png"))
    assert target.stage_data(str(tree)) == uri  # same content, same place: a cached step is reused
    next(tree.rglob("*.png")).unlink()
    assert target.stage_data(str(tree)) != uri  # changed content never overwrites the old data
    assert target.stage_data(uri) == uri  # an s3:// URI of the local store is taken as is


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ("/no/such/folder", "not a folder"),
        ("s3://kennel-local/nothing/here", "nothing stored there"),
    ],
)
def test_bad_data_is_one_clear_error(target: LocalTarget, data: str, words: str) -> None:
    with pytest.raises(KennelError, match=words):
        target.stage_data(data)


def test_an_empty_folder_is_refused(target: LocalTarget, tmp_path: Path) -> None:
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(KennelError, match="holds no files"):
        target.stage_data(str(tmp_path / "empty"))


def test_the_sample_is_staged_once_when_the_default_data_is_missing(target: LocalTarget) -> None:
    uri = target._default_data()
    assert uri == target.config.data_uri + "/sample"
    folder = target.store.path_for(uri)
    assert len(list(folder.rglob("*.png"))) == 1400
    marker = next(folder.rglob("*.png"))
    marker.unlink()
    target._default_data()  # data is there already: left alone, not restaged
    assert not marker.exists()


def test_a_configured_input_data_uri_is_used_as_is(tmp_path: Path) -> None:
    config = repo_config(input_data_uri="s3://kennel-local/my/images").for_target("local")
    target = LocalTarget(config, home=tmp_path / ".kennel")
    with pytest.raises(KennelError, match="input_data_uri s3://kennel-local/my/images: nothing stored there"):
        target._default_data()  # the user named their data: never filled with the sample
    target.store.put_tree(small_tree(tmp_path / "mine"), "s3://kennel-local/my/images")
    assert target._default_data() == "s3://kennel-local/my/images"


def test_state_of_the_older_layout_does_not_reach_prepare(target: LocalTarget, tmp_path: Path) -> None:
    # Older versions put the sample straight under <data_uri>/ and uploads beside it, <data_uri>/<hash>/.
    old = target.config.data_uri
    target.store.put_tree(small_tree(tmp_path / "old-sample" / "train"), f"{old}/train")
    target.store.put_tree(small_tree(tmp_path / "old-upload"), f"{old}/0123456789abcdef")
    uri = target._default_data()
    assert uri == f"{old}/sample" and len(target.store.list_prefix(uri + "/")) == 1400
    key_prefix = uri.removeprefix("s3://kennel-local/") + "/"
    splits = {stored.uri.key.removeprefix(key_prefix).split("/")[0] for stored in target.store.list_prefix(uri + "/")}
    assert splits == {"train", "valid", "test"}  # prepare gets the sample alone


def test_a_partly_staged_folder_is_never_taken_for_the_whole(target: LocalTarget, tmp_path: Path) -> None:
    tree = small_tree(tmp_path / "photos")
    uri = f"s3://kennel-local/kennel/uploads/{dataset_name(tree, dataset_files(tree))}"
    final = target.store.path_for(uri)
    leftover = final.with_name(f".{final.name}{PARTIAL_MARKER}4242") / "bag" / "x.png"  # a killed copy
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    assert target.store.list_prefix(uri + "/") == []  # listings skip it
    assert target.stage_data(str(tree)) == uri
    assert len(target.store.list_prefix(uri + "/")) == len(dataset_files(tree))


def test_status_without_executions_says_how_to_start(target: LocalTarget) -> None:
    assert target.executions() == []
    with pytest.raises(KennelError, match="start one with `kennel run`"):
        target.status(None)
    with pytest.raises(KennelError, match="nope"):
        target.status("nope")
    assert target.models() == [] and target.endpoints() == []


def evaluate_then_check(home: Path) -> dict:
    """Evaluate (writes evaluation.json) -> CheckTestLoss: Register-like step if loss <= Threshold, else Fail."""
    evaluate = processing_step(
        home,
        "Evaluate",
        """
        import json, os, pathlib
        out = pathlib.Path(os.environ["SAGEMAKER_BASE_DIR"]) / "processing" / "evaluation"
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps({"loss": 0.75}))
        """,
        outputs=[("evaluation", "/opt/ml/processing/evaluation", f"{BUCKET}/evaluation")],
        PropertyFiles=[{"PropertyFileName": "Evaluation", "OutputName": "evaluation", "FilePath": "evaluation.json"}],
    )
    loss = {"Std:JsonGet": {"PropertyFile": get("Steps.Evaluate.PropertyFiles.Evaluation"), "Path": "loss"}}
    register = processing_step(home, "Register", "print('registered')")
    fail = {"Name": "Fail", "Type": "Fail", "Arguments": {"ErrorMessage": "test loss is above the threshold"}}
    check = {
        "Name": "CheckTestLoss",
        "Type": "Condition",
        "Arguments": {
            "Conditions": [{"Type": "LessThanOrEqualTo", "LeftValue": loss, "RightValue": get("Parameters.Threshold")}],
            "IfSteps": [register],
            "ElseSteps": [fail],
        },
    }
    return definition(evaluate, check, parameters=[{"Name": "Threshold", "Type": "Float", "DefaultValue": 1.0}])


def test_a_run_ends_by_saying_where_the_results_are_and_what_to_do_next(
    target: LocalTarget, capsys: pytest.CaptureFixture
) -> None:
    pipeline = evaluate_then_check(target.home)
    options = RunOptions(stop_grace_seconds=1.0)
    evaluation = target.store.path_for(f"{BUCKET}/evaluation/evaluation.json")

    passed = target.to_status(run_pipeline(pipeline, {}, target.home, options=options))
    assert passed.status == "Succeeded"
    assert passed.notes == [
        "skipped (branch not taken): Fail",
        f"evaluation: {evaluation}",
        "next: `kennel models` to see the registered package, `kennel approve --latest` to approve and deploy it",
    ]
    assert evaluation.is_file()

    # `kennel status` names every step's log, a succeeded step's too: where to look for what it did.
    cli._print_execution(target.status(passed.execution_id))
    shown = capsys.readouterr().out
    logs = {record.name: record.log_path for record in load_execution(target.home, passed.execution_id).steps.values()
            if record.log_path}
    assert "Evaluate" in logs and Path(logs["Evaluate"]).is_file()
    for name, log in logs.items():
        assert f"  {name} log: {log}" in shown

    # The Fail step ended it: resuming would fail the same way, so no resume hint and no approval hint.
    failed = target.to_status(run_pipeline(pipeline, {"Threshold": "0.5"}, target.home, options=options))
    assert failed.status == "Failed" and failed.failure_reason == "test loss is above the threshold"
    assert failed.notes == ["skipped (branch not taken): Register", f"evaluation: {evaluation}"]


def test_models_show_metrics_the_execution_the_history_and_the_reasons_given(
    kennel_home: Path, tarballs: Tarballs, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for name in [name for name in os.environ if name.startswith("KENNEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KENNEL_HOME", str(kennel_home))
    register(kennel_home, tarballs.original, metrics=evaluation(loss=0.4321, accuracy=0.875))
    register(kennel_home, tarballs.reversed, metrics=evaluation(loss=0.5, accuracy=0.8))
    assert cli.main(["approve", "--version", "1", "--reason", "reviewed the metrics"]) == 0
    assert cli.main(["reject", "--version", "2", "--reason", "regression on sneakers"]) == 0
    capsys.readouterr()

    assert cli.main(["models", "--json"]) == 0
    listed = {package["version"]: package for package in json.loads(capsys.readouterr().out)}
    first, second = listed[1], listed[2]
    assert (first["approval_status"], first["approval_description"]) == ("Approved", "reviewed the metrics")
    assert first["metrics"] == {"test_loss": 0.4321, "test_accuracy": 0.875}
    assert first["metrics_uri"].endswith("/evaluation/evaluation.json") and first["execution_arn"] == EXECUTION_ARN
    assert [(c["from_status"], c["to_status"], c["reason"]) for c in first["history"]] == [
        (None, "PendingManualApproval", "registered"), ("PendingManualApproval", "Approved", "reviewed the metrics")]
    assert second["approval_description"] == "regression on sneakers"
    assert second["history"][-1]["to_status"] == "Rejected" and second["history"][-1]["reason"] == "regression on sneakers"

    assert cli.main(["models"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["VERSION", "STATUS", "TEST", "LOSS", "TEST", "ACCURACY", "CREATED", "EXECUTION",
                                "DESCRIPTION"]
    row = next(line for line in table if line.startswith("1 "))
    execution_id = EXECUTION_ARN.rsplit("/", 1)[-1]
    for shown in ("Approved", "0.4321", "87.5%", execution_id, "reviewed the metrics"):
        assert shown in row, row
