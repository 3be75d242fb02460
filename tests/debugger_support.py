"""Builders for the Debugger, profiler and plot tests (imported by their test modules, defines no tests).

`debug_training_step` takes the TrainWithDebugger step of the real pipeline definition (built
offline, code bundles included) and makes it runnable alone: the data channels point at a small
image tree in the store and the tuned hyperparameters get fixed values. What a test changes
(a rule's parameters) it changes in that request, so everything else is what
`kennel definition` emits. `write_trial` writes smdebug trials with smdebug's own hook, for
rules whose trip would be slow or flaky to provoke with real training.
"""

from __future__ import annotations

import copy
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from local.home import store_root
from local.runner import RunOptions, run_pipeline
from local.state import Execution, StepRecord
from local.store import ObjectStore, import_objects

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "data" / "sample"
STEP = "TrainWithDebugger"
DATA = "s3://kennel-local/tests/data"
# Small and fast: a pretrained backbone that works offline, 32 px, only the head trains.
FAST_HYPERPARAMETERS = {
    "arch": "efficientnet_lite0",
    "freeze": "head",
    "image-size": "32",
    "seed": "0",
    "lr": "0.003",
    "batch-size": "64",
    "epochs": "3",
    "workers": "0",
}


def copy_sample(target: Path, classes: int, per_class: Mapping[str, int], *, shift: int = 0) -> Path:
    """An ImageFolder tree with the first `classes` sample classes; images of split valid are taken
    from the class `shift` places further on, so shift > 0 gives a validation set whose labels
    disagree with what training teaches (a divergent split)."""
    names = sorted(path.name for path in (SAMPLE_DIR / "train").iterdir() if path.is_dir())[:classes]
    for split, count in per_class.items():
        for index, name in enumerate(names):
            source = names[(index + shift) % len(names)] if split == "valid" else name
            folder = target / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for image in sorted((SAMPLE_DIR / split / source).glob("*.png"))[:count]:
                shutil.copy(image, folder / image.name)
    return target


def upload_tree(store: ObjectStore, folder: Path, prefix: str) -> None:
    store.put_tree(folder, prefix)


def debug_training_step(
    build: Any,
    home: Path,
    data: Path,
    *,
    hyperparameters: Mapping[str, str] | None = None,
    rules: Mapping[str, Mapping[str, str]] | None = None,
    keep_rules: tuple[str, ...] | None = None,
    fast: bool = True,
) -> dict[str, Any]:
    """The definition's TrainWithDebugger step, made runnable alone on `data` (train/ and valid/).

    `fast` swaps in FAST_HYPERPARAMETERS; without it the hyperparameters stay the definition's
    (run it with the definition's parameters) and `hyperparameters` must give the tuned ones.
    `rules` overrides RuleParameters by rule name; `keep_rules` keeps only those
    DebugRuleConfigurations.
    """
    import_objects(home, build.objects)
    store = ObjectStore(store_root(home))
    for split in ("train", "valid", "test"):
        if (data / split).is_dir():
            store.put_tree(data / split, f"{DATA}/{split}")
    [step] = [copy.deepcopy(item) for item in build.definition["Steps"] if item["Name"] == STEP]
    arguments = step["Arguments"]
    for channel in arguments["InputDataConfig"]:
        if channel["ChannelName"] in ("train", "valid"):
            channel["DataSource"]["S3DataSource"]["S3Uri"] = f"{DATA}/{channel['ChannelName']}"
    if fast:
        arguments["HyperParameters"].update(FAST_HYPERPARAMETERS)
    arguments["HyperParameters"].update(hyperparameters or {})
    arguments["ResourceConfig"].update(InstanceType="ml.m5.large", InstanceCount=1)
    arguments.pop("CheckpointConfig", None)  # execution-scoped in the definition; not needed here
    configurations = arguments["DebugRuleConfigurations"]
    if keep_rules is not None:
        configurations[:] = [rule for rule in configurations if rule["RuleConfigurationName"] in keep_rules]
    for rule in configurations:
        rule["RuleParameters"].update((rules or {}).get(rule["RuleConfigurationName"], {}))
    step.pop("CacheConfig", None)
    step.pop("RetryPolicies", None)
    return step


def evaluate_step(build: Any) -> dict[str, Any]:
    """The definition's Evaluate step on the test split under DATA (its model input stays the
    TrainWithDebugger step's artifact)."""
    [step] = [copy.deepcopy(item) for item in build.definition["Steps"] if item["Name"] == "Evaluate"]
    arguments = step["Arguments"]
    for item in arguments["ProcessingInputs"]:
        if item["InputName"] == "test":
            item["S3Input"]["S3Uri"] = f"{DATA}/test"
    arguments["ProcessingResources"]["ClusterConfig"].update(InstanceType="ml.m5.large", InstanceCount=1)
    step.pop("CacheConfig", None)
    step.pop("RetryPolicies", None)
    return step


def pipeline_of(*steps: dict[str, Any], parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"Version": "2020-12-01", "Metadata": {}, "Parameters": parameters or [], "Steps": list(steps)}


def statuses(record: Any, key: str = "DebugRuleEvaluationStatuses") -> dict[str, dict[str, Any]]:
    return {item["RuleConfigurationName"]: item for item in record.properties.get(key, [])}


# --- real runs --------------------------------------------------------------------------------------

FAST = RunOptions(stop_grace_seconds=1.0, cores=2)
# Four classes and batch 32: 16 training images per class make two training steps per epoch, 10
# validation images per class two validation steps, of different classes (the loader keeps the
# folder order), so a rule that compared single validation batches would see class differences.
SPLITS = {"train": 16, "valid": 10, "test": 5}
RUN_HYPERPARAMETERS = {"batch-size": "32", "epochs": "3"}


@dataclass
class DebugRun:
    execution: Execution
    home: Path
    data: Path

    @property
    def train(self) -> StepRecord:
        return self.execution.steps[STEP]

    @property
    def job_dir(self) -> Path:
        return Path(self.train.job_dir or "")

    def store(self) -> ObjectStore:
        return ObjectStore(store_root(self.home))


def run_debug_pipeline(
    build: Any,
    root: Path,
    *,
    shift: int = 0,
    hyperparameters: Mapping[str, str] | None = None,
    rules: Mapping[str, Mapping[str, str]] | None = None,
    keep_rules: tuple[str, ...] | None = None,
    evaluate: bool = False,
) -> DebugRun:
    """TrainWithDebugger (and Evaluate) of the real definition on a small copy of the sample."""
    splits = SPLITS if evaluate else {name: SPLITS[name] for name in ("train", "valid")}
    data = copy_sample(root / "data", 4, splits, shift=shift)
    home = root / "home"
    step = debug_training_step(
        build,
        home,
        data,
        hyperparameters={**RUN_HYPERPARAMETERS, **(hyperparameters or {})},
        rules=rules,
        keep_rules=keep_rules,
    )
    steps = [step, evaluate_step(build)] if evaluate else [step]
    return DebugRun(run_pipeline(pipeline_of(*steps), {}, home, options=FAST), home, data)


@pytest.fixture(scope="session")
def healthy_debug_run(offline_builds: Any, tmp_path_factory: pytest.TempPathFactory) -> DebugRun:
    """The healthy sample run, trained and evaluated once for the Debugger, profiler and plot tests."""
    return run_debug_pipeline(offline_builds["local"], tmp_path_factory.mktemp("healthy"), evaluate=True)


# --- synthetic trials, written by smdebug itself -------------------------------------------------

Phase = tuple[str, list[dict[str, Any]]]  # (TRAIN | EVAL, one {tensor name: value} dict per step)


def write_trial(out_dir: Path, phases: list[Phase], collections: Mapping[str, list[str]]) -> Path:
    """An smdebug trial with exactly the given values, written through smdebug's hook and writer.

    `collections` maps collection name -> the tensor names that belong to it (losses are saved
    through the 'losses' collection like a registered loss would be).
    """
    import smdebug.pytorch as smd
    import torch
    from smdebug import modes

    import debugger

    debugger.patch_smdebug()  # the numpy-2 fix train.py installs too
    hook = smd.Hook(
        out_dir=str(out_dir),
        save_config=smd.SaveConfig(save_interval=1),
        include_collections=list(collections),
        export_tensorboard=False,
    )
    for name, members in collections.items():
        hook.get_collection(name).include([f"^{re.escape(member)}$" for member in members])
    model = torch.nn.Linear(1, 1)
    hook.register_module(model)  # each forward call is a new step
    for phase, steps in phases:
        hook.set_mode(modes.TRAIN if phase == "TRAIN" else modes.EVAL)
        for values in steps:
            # smdebug writes custom tensors when the next step starts, into that step: queue them first.
            for name, value in values.items():
                owner = [collection for collection, members in collections.items() if name in members]
                hook.save_tensor(
                    name, torch.as_tensor(value, dtype=torch.float32), collections_to_write=owner
                )
            model(torch.zeros(1, 1))
    hook.close()
    return out_dir
