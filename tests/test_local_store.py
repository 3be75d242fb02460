"""The local object store (s3:// <-> files), the step cache key and ISO 8601 expiry, and state files."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import tarfile
import time
from datetime import timedelta
from pathlib import Path

import pytest

from local.cache import CacheConfigError, StepCache, cache_key, parse_duration
from local.files import copy_file_atomic, tar_folder, write_json_atomic
from local.home import HOME_VARIABLE, resolve_home
from local.state import ExecutionStore, StateError, StepRecord, list_executions, load_execution
from local.store import ObjectStore, StoreError, import_objects, tree_digest


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "s3")


def test_uri_maps_to_a_file_under_the_bucket(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("s3://bucket/a/b/c.txt", b"data")
    assert (tmp_path / "s3" / "bucket" / "a" / "b" / "c.txt").read_bytes() == b"data"
    assert store.read_bytes("s3://bucket/a/b/c.txt") == b"data"
    assert store.exists("s3://bucket/a/b/c.txt") and not store.exists("s3://bucket/a/b")


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("/local/path", "not an s3:// URI"),
        ("s3://", "no valid bucket"),
        ("s3://bucket/../escape", "'..' are not allowed"),
        ("s3://bucket/a/./b", "'..' are not allowed"),
    ],
)
def test_bad_uris_are_refused(store: ObjectStore, uri: str, words: str) -> None:
    with pytest.raises(StoreError) as raised:
        store.put_bytes(uri, b"x")
    assert words in str(raised.value)


def test_prefix_listing_follows_s3(store: ObjectStore) -> None:
    for key in ("data/train/a.png", "data/train/sub/b.png", "data/train2/c.png", "data/valid/d.png"):
        store.put_bytes(f"s3://bucket/{key}", key.encode())

    def keys(prefix: str) -> list[str]:
        return [item.uri.key for item in store.list_prefix(prefix)]

    # A prefix is a string prefix of the key, as in S3 (train also matches train2)...
    assert keys("s3://bucket/data/train") == ["data/train/a.png", "data/train/sub/b.png", "data/train2/c.png"]
    # ...and a trailing slash keeps to the folder.
    assert keys("s3://bucket/data/train/") == ["data/train/a.png", "data/train/sub/b.png"]
    assert keys("s3://bucket/data/valid/d.png") == ["data/valid/d.png"]
    assert keys("s3://bucket/nothing") == [] and keys("s3://other/x") == []


def test_get_places_objects_relative_to_the_prefix(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("s3://bucket/run/train/x/1.png", b"1")
    store.put_bytes("s3://bucket/run/train/2.png", b"2")
    store.put_bytes("s3://bucket/models/job/output/model.tar.gz", b"model")
    store.get("s3://bucket/run/train", tmp_path / "in")
    assert sorted(p.relative_to(tmp_path / "in").as_posix() for p in (tmp_path / "in").rglob("*.png")) == [
        "2.png",
        "x/1.png",
    ]
    # An exact object lands in the folder under its own name (model.tar.gz into /opt/ml/processing/model).
    store.get("s3://bucket/models/job/output/model.tar.gz", tmp_path / "model")
    assert (tmp_path / "model" / "model.tar.gz").read_bytes() == b"model"


def test_get_of_nothing_is_an_error_naming_the_uri(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no objects under s3://bucket/missing"):
        store.get("s3://bucket/missing", tmp_path / "in")


def test_put_tree_uploads_relative_paths(store: ObjectStore, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.json").write_text("{}")
    (folder / "nested" / "b.txt").write_text("b")
    written = store.put_tree(folder, "s3://bucket/exec/out")
    assert written == ["s3://bucket/exec/out/a.json", "s3://bucket/exec/out/nested/b.txt"]
    assert store.read_bytes("s3://bucket/exec/out/nested/b.txt") == b"b"


def test_an_object_cannot_also_be_a_prefix(store: ObjectStore) -> None:
    store.put_bytes("s3://bucket/a", b"x")
    with pytest.raises(StoreError, match="already an object"):
        store.put_bytes("s3://bucket/a/b", b"y")
    with pytest.raises(StoreError, match="names a prefix"):
        store.put_bytes("s3://bucket/dir/", b"y")


def test_writes_are_atomic_and_leave_no_partial_files(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("s3://bucket/k.bin", b"old")
    source = tmp_path / "big.bin"
    source.write_bytes(b"new" * 1000)
    store.put_file(source, "s3://bucket/k.bin")
    assert store.read_bytes("s3://bucket/k.bin") == b"new" * 1000
    # A partial write (simulated: a temp file left by a killed writer) is never listed.
    (tmp_path / "s3" / "bucket" / ".k.bin.kennel-partial-abc").write_bytes(b"half")
    assert [item.uri.key for item in store.list_prefix("s3://bucket/")] == ["k.bin"]


def test_atomic_writes_give_files_the_mode_open_would(tmp_path: Path) -> None:

    previous = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "a.json", {"a": 1})
        copy_file_atomic(tmp_path / "a.json", tmp_path / "b.json")
        tar_folder(tmp_path, tmp_path / "out" / "c.tar.gz")
    finally:
        os.umask(previous)
    for name in ("a.json", "b.json", "out/c.tar.gz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name  # not mkstemp's 0600


def test_versioned_tree_is_content_addressed(store: ObjectStore, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"a")
    first = store.put_tree_versioned(folder, "s3://bucket/data")
    assert first == f"s3://bucket/data/{tree_digest(folder)[:16]}"
    assert store.put_tree_versioned(folder, "s3://bucket/data") == first
    (folder / "a.png").write_bytes(b"changed")
    second = store.put_tree_versioned(folder, "s3://bucket/data")
    assert second != first
    assert store.read_bytes(second + "/a.png") == b"changed"


def test_import_objects_puts_sdk_uploads_in_the_home_store(tmp_path: Path) -> None:
    import_objects(
        tmp_path / "home", {"s3://b/code/source/sourcedir.tar.gz": b"tar", "s3://b/P/runproc.sh": b"sh"}
    )
    assert (tmp_path / "home" / "s3" / "b" / "P" / "runproc.sh").read_bytes() == b"sh"
    written = import_objects(tmp_path / "home", {"P/code/abc/runproc.sh": b"sh2"}, bucket="b")
    assert written == ["s3://b/P/code/abc/runproc.sh"]
    assert (tmp_path / "home" / "s3" / "b" / "P" / "code" / "abc" / "runproc.sh").read_bytes() == b"sh2"


def test_home_defaults_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(HOME_VARIABLE, raising=False)
    assert resolve_home() == tmp_path.resolve() / ".kennel"
    monkeypatch.setenv(HOME_VARIABLE, str(tmp_path / "elsewhere"))
    assert resolve_home() == tmp_path.resolve() / "elsewhere"
    assert resolve_home(tmp_path / "explicit") == tmp_path.resolve() / "explicit"


# --- cache ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("P30D", timedelta(days=30)),
        ("PT1H", timedelta(hours=1)),
        ("PT16M", timedelta(minutes=16)),
        ("P1W", timedelta(days=7)),
        ("P1Y", timedelta(days=365)),
        ("P1DT2H3M4S", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ("30d", timedelta(days=30)),
        ("T16m", timedelta(minutes=16)),
        ("30dT5h", timedelta(days=30, hours=5)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "P", "PT", "30 days", "P1.5D", "1h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(CacheConfigError, match="not an ISO 8601 duration"):
        parse_duration(text)


def _processing(code_uri: str, data_uri: str = "s3://b/data", environment: dict | None = None) -> dict:
    return {
        "AppSpecification": {"ImageUri": "img", "ContainerArguments": ["--x", "1"]},
        "Environment": environment or {},
        "ProcessingInputs": [
            {"InputName": "raw", "S3Input": {"S3Uri": data_uri, "LocalPath": "/opt/ml/processing/input/raw"}},
            {
                "InputName": "code",
                "S3Input": {"S3Uri": code_uri, "LocalPath": "/opt/ml/processing/input/code/"},
            },
        ],
        "ProcessingOutputConfig": {
            "Outputs": [{"OutputName": "o", "S3Output": {"S3Uri": "s3://b/exec-1/o"}}]
        },
    }


def test_cache_key_tracks_code_content_not_its_location(store: ObjectStore) -> None:
    step = {"Name": "Prep", "Type": "Processing"}
    store.put_bytes("s3://b/upload-1/source/sourcedir.tar.gz", b"code v1")
    store.put_bytes("s3://b/upload-1/source/__pycache__/x.pyc", b"compiled at time 1")
    store.put_bytes("s3://b/upload-2/source/sourcedir.tar.gz", b"code v1")
    store.put_bytes("s3://b/upload-2/source/__pycache__/x.pyc", b"compiled at time 2")
    store.put_bytes("s3://b/upload-3/source/sourcedir.tar.gz", b"code v2")

    def key(arguments: dict) -> str:
        return cache_key("P", step, arguments, store)

    base = key(_processing("s3://b/upload-1/source/"))
    assert key(_processing("s3://b/upload-2/source/")) == base  # same code, new upload: hit
    assert key(_processing("s3://b/upload-3/source/")) != base  # changed code: miss
    assert key(_processing("s3://b/upload-1/source/", data_uri="s3://b/other")) != base  # other data: miss
    assert key(_processing("s3://b/upload-1/source/", environment={"A": "1"})) != base
    # Outputs are not part of SageMaker's key: a new execution's output location still hits.
    moved = _processing("s3://b/upload-1/source/")
    moved["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["S3Uri"] = "s3://b/exec-2/o"
    assert key(moved) == base
    assert cache_key("Other", step, _processing("s3://b/upload-1/source/"), store) != base


def test_training_code_keys_ignore_where_the_sdk_staged_it(store: ObjectStore) -> None:
    """sm_drivers/sourcecode.json names the build machine's temporary staging folder (new at each
    upsert); the job reads only the entry script from it."""
    step = {"Name": "Train", "Type": "Training"}

    def upload(name: str, staged_at: str, entry: str = "train.py") -> dict:
        store.put_bytes(f"s3://b/{name}/code/train.py", b"print('training')")
        settings = {"source_dir": staged_at, "requirements": None, "entry_script": entry, "command": None}
        store.put_bytes(f"s3://b/{name}/sm_drivers/sourcecode.json", json.dumps(settings).encode())
        channels = [
            {"ChannelName": channel, "DataSource": {"S3DataSource": {"S3Uri": f"s3://b/{name}/{channel}"}}}
            for channel in ("code", "sm_drivers")
        ]
        return {"AlgorithmSpecification": {"TrainingImage": "img"}, "InputDataConfig": channels}

    base = cache_key("P", step, upload("monday", "/tmp/kennel-code-abc/code"), store)
    assert cache_key("P", step, upload("tuesday", "/tmp/kennel-code-xyz/code"), store) == base
    assert cache_key("P", step, upload("wednesday", "/tmp/kennel-code-xyz/code", entry="other.py"), store) != base


def _tar(files: dict[str, bytes], mtime: float) -> bytes:
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=mtime) as zipped,
        tarfile.open(fileobj=zipped, mode="w") as archive,
    ):
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_cache_key_reads_code_archives_by_content(store: ObjectStore) -> None:
    """The SDK rebuilds sourcedir.tar.gz at every upsert: new timestamps, same code."""
    step = {"Name": "Prep", "Type": "Processing"}
    monday = _tar({"prepare.py": b"print(1)", "images.py": b"x = 1"}, mtime=1_700_000_000)
    tuesday = _tar({"prepare.py": b"print(1)", "images.py": b"x = 1"}, mtime=1_700_086_400)
    edited = _tar({"prepare.py": b"print(2)", "images.py": b"x = 1"}, mtime=1_700_086_400)
    assert monday != tuesday
    for key, data in (("monday", monday), ("tuesday", tuesday), ("edited", edited)):
        store.put_bytes(f"s3://b/{key}/source/sourcedir.tar.gz", data)

    def key(upload: str) -> str:
        return cache_key("P", step, _processing(f"s3://b/{upload}/source/"), store)

    assert key("monday") == key("tuesday")
    assert key("edited") != key("monday")


def test_cache_entries_expire(tmp_path: Path) -> None:
    cache = StepCache(tmp_path)
    cache.store("P", "Prep", "k1", "exec-1", "arn:exec-1", {"ProcessingJobName": "job"})
    assert cache.lookup("P", "Prep", "k1", timedelta(days=1))["PipelineExecutionId"] == "exec-1"
    assert cache.lookup("P", "Prep", "k1", None) is not None
    assert cache.lookup("P", "Prep", "k2", None) is None
    path = tmp_path / "cache" / "P" / "Prep" / "k1.json"
    entry = json.loads(path.read_text())
    entry["CreatedTime"] = "2020-01-01T00:00:00+00:00"
    write_json_atomic(path, entry)
    assert cache.lookup("P", "Prep", "k1", timedelta(days=30)) is None
    assert cache.lookup("P", "Prep", "k1", None) is not None


# --- state files ------------------------------------------------------------------------------


def test_execution_state_round_trips_and_lists_newest_first(tmp_path: Path) -> None:
    executions = ExecutionStore(tmp_path)
    first = executions.create({"Steps": []}, "P", {"Epochs": 2})
    time.sleep(0.01)
    second = executions.create({"Steps": []}, "P", {})
    record = StepRecord("Prep", "Processing", status="Succeeded", properties={"ProcessingJobName": "j"})
    executions.save_step(first.execution_id, record)
    loaded = load_execution(tmp_path, first.execution_id)
    assert loaded.parameters == {"Epochs": 2}
    assert loaded.steps["Prep"].properties == {"ProcessingJobName": "j"}
    assert [item.execution_id for item in list_executions(tmp_path)] == [
        second.execution_id,
        first.execution_id,
    ]
    on_disk = json.loads((loaded.folder / "execution.json").read_text())
    assert on_disk["PipelineExecutionStatus"] == "Executing"
    assert on_disk["PipelineExecutionArn"].endswith(f"/execution/{first.execution_id}")


def test_a_dead_runner_reads_as_stopped(tmp_path: Path) -> None:
    executions = ExecutionStore(tmp_path)
    execution = executions.create({"Steps": []}, "P", {})
    # No runner recorded (or a pid that is gone): the execution was interrupted.
    executions.save_step(execution.execution_id, StepRecord("Train", "Training", status="Executing"))
    loaded = load_execution(tmp_path, execution.execution_id)
    assert loaded.status == "Stopped" and loaded.interrupted
    assert loaded.steps["Train"].status == "Stopped"
    assert f"kennel run --resume {execution.execution_id}" in loaded.failure_reason
    # Reading changes nothing on disk.
    assert (
        json.loads((loaded.folder / "execution.json").read_text())["PipelineExecutionStatus"] == "Executing"
    )


def test_unknown_execution_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no execution 'nope'"):
        load_execution(tmp_path, "nope")
    with pytest.raises(StateError, match="is not an execution id"):
        load_execution(tmp_path, "../etc")
