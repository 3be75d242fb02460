"""pipeline.local_target without running a pipeline: data staging and the state it reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from kennel_support import repo_config

from pipeline.errors import KennelError
from pipeline.local_target import LocalTarget

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
    uri = target.stage_data(str(tree))
    assert uri.startswith(target.config.data_uri + "/")
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
    folder = target.store.path_for(uri)
    assert len(list(folder.rglob("*.png"))) == 1400
    marker = next(folder.rglob("*.png"))
    marker.unlink()
    target._default_data()  # data is there already: left alone, not restaged
    assert not marker.exists()


def test_status_without_executions_says_how_to_start(target: LocalTarget) -> None:
    assert target.executions() == []
    with pytest.raises(KennelError, match="start one with `kennel run`"):
        target.status(None)
    with pytest.raises(KennelError, match="nope"):
        target.status("nope")
    assert target.models() == [] and target.endpoints() == []
