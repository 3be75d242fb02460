"""What the SageMaker Debugger hook costs the training job, at the definition's default save intervals.

    python bench/debugger_overhead.py [--repeats 11]

Trains entrypoints/train.py on the bundled sample the way the local pipeline's TrainWithDebugger
step does (the [local] settings of kennel.toml: architecture, freeze, image size, epochs, batch
size), once with the step's DebugHookConfig (from the definition `kennel definition` builds:
collections, save_interval) written to debughookconfig.json, and once without it. The runs
alternate (none, hook, hook, none, ...) so that the load of this shared machine falls on both.

Reports, for each variant, the training job's wall time (the process, smdebug's import and the
hook's set-up included: what a user waits for), its CPU time (user + system) and the epochs' wall
time (train.py's per-epoch `seconds`; also after the first epoch alone, which leaves out the
hook's one-time costs: smdebug's import, the first step's activation inputs, the first steps'
gradients), each as minimum and median over the runs. The overhead of
each figure is the median over the runs' pairs (run i with the hook against run i without, which
ran next to it) of with / without - 1: a burst of other load on this shared machine then falls on
both sides of a pair, and one disturbed pair moves the median little. Target: the hook costs at
most 10% of the training job's wall time. Writes bench/results/debugger_overhead.json and prints
one line; exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from entrypoints import contract  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "debugger_overhead.json"
SAMPLE = REPO_ROOT / "data" / "sample"
TARGET_OVERHEAD = 0.10
STEP = "TrainWithDebugger"


def definition_step() -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The TrainWithDebugger arguments and the definition's parameter defaults, and the config."""
    from pipeline.config import load_config
    from pipeline.definition import build_definition

    config = load_config(REPO_ROOT / "kennel.toml").for_target("local")
    definition = build_definition(config, "local")
    [step] = [item for item in definition["Steps"] if item["Name"] == STEP]
    defaults = {item["Name"]: item.get("DefaultValue") for item in definition["Parameters"]}
    return step["Arguments"], defaults, config


def resolve(value: Any, defaults: dict[str, Any], tuned: dict[str, str], name: str) -> str:
    """A hyperparameter's value: literal, a parameter's default, or (from the tuner) `tuned`."""
    if isinstance(value, dict) and "Std:Join" in value:
        return "".join(resolve(item, defaults, tuned, name) for item in value["Std:Join"]["Values"])
    if isinstance(value, dict) and "Get" in value:
        path = value["Get"]
        return str(defaults[path.split(".", 1)[1]]) if path.startswith("Parameters.") else tuned[name]
    return str(value)


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train_once(hyperparameters: dict[str, str], hook: dict | None, workdir: Path) -> dict[str, float]:
    """One train.py process in a fresh re-rooted /opt/ml; its wall time and its epochs' time."""
    root = Path(tempfile.mkdtemp(dir=workdir))
    if hook is not None:
        config = root / "input" / "config" / "debughookconfig.json"
        config.parent.mkdir(parents=True)
        config.write_text(json.dumps({**hook, "LocalPath": "/opt/ml/output/tensors"}))
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("SM_", "SAGEMAKER_"))
    }
    environment.update(
        SAGEMAKER_BASE_DIR=str(root),
        SM_CHANNEL_TRAIN=str(SAMPLE / "train"),
        SM_CHANNEL_VALID=str(SAMPLE / "valid"),
        SM_MODEL_DIR=str(root / "model"),
        SM_OUTPUT_DATA_DIR=str(root / "output" / "data"),
        TRAINING_JOB_NAME="bench-debugger-overhead",
        PYTHONWARNINGS="ignore",
    )
    arguments = [item for name, value in hyperparameters.items() for item in (f"--{name}", value)]
    started, before = time.monotonic(), cpu_of_children()
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "entrypoints" / "train.py"), *arguments],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds, cpu = time.monotonic() - started, cpu_of_children() - before
    if result.returncode != 0:
        raise RuntimeError(f"train.py failed:\n{result.stderr[-3000:]}")
    history = json.loads((root / "output" / "data" / contract.EPOCH_METRICS_FILE).read_text())
    tensors = root / "output" / "tensors"
    size = (
        sum(path.stat().st_size for path in tensors.rglob("*") if path.is_file()) if tensors.exists() else 0
    )
    # Gone before the next run: the kernel writes dirty pages back some 30 s after they were
    # written, so a hooked run's 240 MB of tensors would otherwise be written to disk during the
    # runs after it, whichever variant they are.
    shutil.rmtree(root)
    return {
        "cpu_seconds": cpu,
        "process_seconds": seconds,
        "epoch_seconds": sum(row["seconds"] for row in history),
        # After the first epoch: no import, no first-step activations, no first-steps gradients.
        "later_epoch_seconds": sum(row["seconds"] for row in history[1:]),
        "tensor_bytes": size,
    }


def summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for key in ("cpu_seconds", "process_seconds", "epoch_seconds", "later_epoch_seconds"):
        values = [run[key] for run in runs]
        figures[f"{key}_min"] = round(min(values), 2)
        figures[f"{key}_median"] = round(statistics.median(values), 2)
    figures["runs"] = [{key: round(value, 2) for key, value in run.items()} for run in runs]
    return figures


def pair_overheads(with_hook: list[dict[str, float]], without: list[dict[str, float]], key: str) -> list[float]:
    """with / without - 1 for each pair of runs (adjacent in time)."""
    return [hooked[key] / plain[key] - 1 for hooked, plain in zip(with_hook, without, strict=True)]


def paired_overhead(with_hook: list[dict[str, float]], without: list[dict[str, float]], key: str) -> float:
    """Median over the pairs of runs of with / without - 1."""
    return round(statistics.median(pair_overheads(with_hook, without, key)), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11, help="runs of each variant")
    args = parser.parse_args(argv)
    arguments, defaults, config = definition_step()
    tuned = {"lr": "0.001", "batch-size": str(config.batch_sizes[0]), "epochs": str(config.epochs)}
    hyperparameters = {
        name: resolve(value, defaults, tuned, name) for name, value in arguments["HyperParameters"].items()
    }
    hook = arguments["DebugHookConfig"]
    runs: dict[str, list[dict[str, float]]] = {"without_hook": [], "with_hook": []}
    load_before = round(os.getloadavg()[0], 2)
    order = [("without_hook", None), ("with_hook", hook)]
    with tempfile.TemporaryDirectory(prefix="kennel-bench-debugger-") as folder:
        for repeat in range(args.repeats):
            for name, config_or_none in order if repeat % 2 == 0 else order[::-1]:
                runs[name].append(train_once(hyperparameters, config_or_none, Path(folder)))
    without, with_hook = summary(runs["without_hook"]), summary(runs["with_hook"])
    overheads = {
        f"{key}_overhead": paired_overhead(runs["with_hook"], runs["without_hook"], key)
        for key in ("process_seconds", "cpu_seconds", "epoch_seconds", "later_epoch_seconds")
    }
    judged = overheads["process_seconds_overhead"]
    # How far the pairs spread: this shared machine moves one run by up to a second either way.
    low, _, high = statistics.quantiles(
        pair_overheads(runs["with_hook"], runs["without_hook"], "process_seconds"), n=4
    )
    result = {
        "benchmark": "train.py on the bundled sample with and without the definition's DebugHookConfig",
        "hyperparameters": hyperparameters,
        "hook": {
            "save_interval": hook.get("HookParameters", {}).get("save_interval"),
            "collections": [item["CollectionName"] for item in hook.get("CollectionConfigurations", [])],
            "tensor_bytes_per_run": int(statistics.median(run["tensor_bytes"] for run in runs["with_hook"])),
        },
        "without_hook": without,
        "with_hook": with_hook,
        **overheads,
        "overhead_statistic": "median over adjacent pairs of runs of with_hook / without_hook - 1",
        "process_seconds_overhead_quartiles": [round(low, 4), round(high, 4)],
        "judged_on": "process_seconds_overhead",
        "target_overhead": TARGET_OVERHEAD,
        "meets_target": judged <= TARGET_OVERHEAD,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m_before": load_before,
            "load_average_1m_after": round(os.getloadavg()[0], 2),
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    temporary = RESULTS.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(RESULTS)
    print(
        f"debugger hook: training job {without['process_seconds_median']:.1f} -> "
        f"{with_hook['process_seconds_median']:.1f} s ({100 * judged:+.1f}%, target <= {100 * TARGET_OVERHEAD:.0f}%, "
        f"{'met' if result['meets_target'] else 'MISSED'}; pairs' quartiles {100 * low:+.1f}% to {100 * high:+.1f}%); CPU {100 * overheads['cpu_seconds_overhead']:+.1f}%, "
        f"epochs {100 * overheads['epoch_seconds_overhead']:+.1f}%, epochs after the first "
        f"{100 * overheads['later_epoch_seconds_overhead']:+.1f}% (medians of {args.repeats} pairs) "
        f"-> {RESULTS.relative_to(REPO_ROOT)}"
    )
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
