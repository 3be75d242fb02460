"""What a run shows: plain lines when the output is not a terminal, a live block when it is."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from test_local_support import BUCKET, definition, processing_step, store_for, tuning_step

from local.progress import LiveProgress, PlainProgress, QuietProgress, format_execution, make_progress
from local.runner import RunOptions, run_pipeline

FAST = RunOptions(stop_grace_seconds=1.0, cores=2)

TALKER = """
    for epoch in (1, 2):
        print(f"epoch={epoch} valid_loss={1 / epoch:.3f}")
"""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_make_progress_picks_by_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    assert isinstance(make_progress(io.StringIO()), PlainProgress)
    assert isinstance(make_progress(Terminal()), LiveProgress)
    assert isinstance(make_progress(Terminal(), quiet=True), QuietProgress)
    monkeypatch.setenv("TERM", "dumb")
    assert not isinstance(make_progress(Terminal()), LiveProgress)


def test_plain_lines_show_steps_logs_and_the_outcome(tmp_path: Path) -> None:
    home = tmp_path / "kennel"
    step = processing_step(home, "Talk", TALKER)
    broken = processing_step(
        home, "Broken", "import sys; sys.exit('bad input: fix the data')", DependsOn=["Talk"]
    )
    stream = io.StringIO()
    execution = run_pipeline(definition(step, broken), {}, home, options=FAST, progress=PlainProgress(stream))
    text = stream.getvalue()
    assert "\x1b[" not in text  # no terminal control codes in plain mode
    assert "Talk: Executing" in text and "Talk: Succeeded" in text
    assert "Talk | epoch=2 valid_loss=0.500" in text
    assert "Broken: Failed" in text
    assert f"Execution {execution.execution_id} (kennel-local): Failed" in text
    assert "bad input: fix the data" in text
    assert f"log: {execution.steps['Broken'].log_path}" in text
    assert f"resume with: kennel run --resume {execution.execution_id}" in text


def test_live_block_redraws_steps_and_trials(tmp_path: Path) -> None:
    home = tmp_path / "kennel"
    store_for(home).put_bytes(f"{BUCKET}/data/a.txt", b"a")
    talk = processing_step(home, "Talk", TALKER)
    tune = tuning_step(
        home,
        "Tune",
        TALKER.replace("print(", "print('valid_loss=0.3', "),
        strategy="Random",
        ranges={"CategoricalParameterRanges": [{"Name": "x", "Values": ["1", "2"]}]},
        channels={"train": f"{BUCKET}/data"},
        static={},
        max_jobs=2,
    )
    stream = Terminal()
    progress = LiveProgress(stream, refresh_seconds=0.05)
    execution = run_pipeline(definition(talk, tune), {}, home, options=FAST, progress=progress)
    assert execution.status == "Succeeded", execution.failure_reason
    text = stream.getvalue()
    assert "\x1b[" in text and "F\x1b[J" in text  # the block is cleared and redrawn in place
    assert "✓ Talk" in text and "✓ Tune" in text
    assert "epoch 2" in text  # the step line shows the latest epoch
    assert "trials 2/2 done" in text
    assert "Tune: trial" in text and "Completed" in text


def test_format_execution_for_status(tmp_path: Path) -> None:
    home = tmp_path / "kennel"
    step = processing_step(home, "Talk", TALKER)
    execution = run_pipeline(definition(step), {}, home, options=FAST)
    text = format_execution(execution)
    assert text.splitlines()[0] == f"Execution {execution.execution_id} (kennel-local): Succeeded"
    assert "Talk" in text and "Succeeded" in text and "resume" not in text
