"""entrypoints/debugger.py: the smdebug hook in a real training run, and the numpy-2 fix."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import contract
import debugger

# smdebug's generated protobuf modules warn on import under protobuf 3.20; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated create function:DeprecationWarning")

TINY = ("--image-size", "32", "--freeze", "head", "--workers", "0")


def sagemaker_hook_config(local_path: str | None) -> dict:
    """A debughookconfig.json as SageMaker writes it (all parameter values are strings)."""
    config = {
        "S3OutputPath": "s3://bucket/debug-output",
        "HookParameters": {"save_interval": "2"},
        "CollectionConfigurations": [
            {"CollectionName": "losses", "CollectionParameters": {"save_interval": "1"}},
            {"CollectionName": "weights", "CollectionParameters": {}},
            {"CollectionName": "gradients", "CollectionParameters": {}},
            {"CollectionName": "biases", "CollectionParameters": {}},
        ],
    }
    if local_path is not None:
        config["LocalPath"] = local_path
    return config


def write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


@pytest.mark.slow
def test_hooked_run_saves_losses_per_mode_weights_and_gradients(train_job) -> None:
    from smdebug import modes
    from smdebug.trials import create_trial

    # /opt/ml/output/tensors, as SageMaker names it: the hook must follow the re-rooted layout.
    write_json(train_job.hook_config, sagemaker_hook_config("/opt/ml/output/tensors"))
    result = train_job.run(*TINY, "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]

    trial = create_trial(str(train_job.root / "output" / "tensors"))
    [loss_name] = trial.tensor_names(collection="losses")
    loss = trial.tensor(loss_name)
    train_steps, eval_steps = loss.steps(mode=modes.TRAIN), loss.steps(mode=modes.EVAL)
    # save_interval 1 for losses: every step of both epochs in both modes.
    assert len(train_steps) >= 2 * 3 and len(eval_steps) >= 2
    values = [loss.value(step, mode=modes.TRAIN) for step in train_steps]
    values += [loss.value(step, mode=modes.EVAL) for step in eval_steps]
    assert all(math.isfinite(float(value)) for value in values)

    gradients = trial.tensor_names(collection="gradients")
    assert any(name.endswith("head.1.weight") for name in gradients)  # only the head trains
    weights = trial.tensor_names(collection="weights")
    assert any("backbone" in name for name in weights) and any("head" in name for name in weights)
    gradient = trial.tensor(gradients[0])
    assert np.isfinite(gradient.value(gradient.steps(mode=modes.TRAIN)[0], mode=modes.TRAIN)).all()


def smdebug_blocker(tmp_path: Path) -> dict[str, str]:
    """Environment in which `import smdebug` fails, as where it is not installed."""
    blocker = tmp_path / "no-smdebug" / "smdebug"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('smdebug is not installed here')\n")
    return {"PYTHONPATH": str(blocker.parent)}


@pytest.mark.slow
def test_training_needs_smdebug_only_when_a_hook_config_exists(train_job, tmp_path: Path) -> None:
    without_smdebug = smdebug_blocker(tmp_path)
    plain = train_job.run(*TINY, "--epochs", "1", extra_env=without_smdebug)
    assert plain.returncode == 0, plain.stderr[-3000:]

    write_json(train_job.hook_config, sagemaker_hook_config(None))
    hooked = train_job.run(
        *TINY, "--epochs", "1", "--checkpoint-dir", str(tmp_path / "c2"), extra_env=without_smdebug
    )
    assert hooked.returncode == 1 and "Traceback" not in hooked.stderr
    assert "smdebug is not installed: pip install smdebug==1.0.34" in hooked.stderr
    assert "smdebug is not installed" in train_job.failure.read_text()


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(0, 2, 1),  # not C-contiguous
        np.array([[1, -2], [3, 4]], dtype=np.int64),
        np.array([True, False, True]),
        np.float16(1.5) * np.ones(5, dtype=np.float16),
        np.array(2.25, dtype=np.float64),  # a scalar loss
    ],
    ids=["float32", "transposed", "int64", "bool", "float16", "scalar"],
)
def test_tensor_proto_round_trips_under_this_numpy(array: np.ndarray) -> None:
    from smdebug.core.tfevent.event_file_reader import get_tensor_data
    from smdebug.core.tfevent.proto.tensor_pb2 import TensorProto

    proto = debugger.make_tensor_proto(array, "name")
    decoded = get_tensor_data(TensorProto.FromString(proto.SerializeToString()))
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def test_string_tensors_still_encode() -> None:
    proto = debugger.make_tensor_proto(np.array(["a", "bc"]), "name")
    assert list(proto.string_val) == [b"a", b"bc"]


def test_patch_replaces_the_function_smdebug_writes_with() -> None:
    import smdebug.core.tfevent.util as util
    import smdebug.core.writer as writer

    debugger.patch_smdebug()
    debugger.patch_smdebug()  # idempotent
    assert writer.make_tensor_proto is debugger.make_tensor_proto
    assert util.make_tensor_proto is debugger.make_tensor_proto


@pytest.mark.parametrize(
    ("base_dir", "local_path", "expected"),
    [
        (None, "/opt/ml/output/tensors", None),  # not re-rooted: the config is used as is
        ("/job", "/opt/ml/output/tensors", "/job/output/tensors"),
        ("/job", None, "/job/output/tensors"),  # smdebug's default is /opt/ml/output/tensors
        ("/job", "/elsewhere/tensors", None),  # a path outside /opt/ml is the user's choice
        ("/job", "/opt/mlx/tensors", None),
    ],
)
def test_reroot_config(
    tmp_path: Path, base_dir: str | None, local_path: str | None, expected: str | None
) -> None:
    config = tmp_path / "debughookconfig.json"
    write_json(config, sagemaker_hook_config(local_path))
    (tmp_path / "scratch").mkdir()
    resolved = debugger.reroot_config(config, base_dir, tmp_path / "scratch")
    if expected is None:
        assert resolved == config
        return
    assert resolved != config and resolved.parent == tmp_path / "scratch"
    rerooted = json.loads(resolved.read_text())
    assert rerooted["LocalPath"] == expected
    assert rerooted["CollectionConfigurations"] == sagemaker_hook_config(None)["CollectionConfigurations"]


def test_no_config_no_hook(tmp_path: Path) -> None:
    import torch

    assert debugger.create_hook(tmp_path / "absent.json", torch.nn.Linear(2, 2), []) is None
    debugger.set_phase(None, debugger.TRAIN)  # no-ops without a hook
    debugger.close(None)


# --- smdebug's per-module forward hooks, released once no collection saves module tensors -----


class ReluNet(torch.nn.Module):
    """Small enough to train in-process; its `relu` module's input is what relu_input collects."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.relu = torch.nn.ReLU()
        self.head = torch.nn.Linear(4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(images)).mean(dim=(2, 3)))


def relu_input_hook_config(local_path: Path, relu_input: dict[str, str]) -> dict:
    """The definition's shape of hook config: module inputs under `relu_input`'s save config."""
    return {
        "LocalPath": str(local_path),
        "HookParameters": {"save_interval": "2"},
        "CollectionConfigurations": [
            {"CollectionName": "losses", "CollectionParameters": {"eval.save_interval": "1"}},
            {"CollectionName": "gradients", "CollectionParameters": {"train.save_steps": "0,1"}},
            {"CollectionName": "weights", "CollectionParameters": {"save_interval": "3"}},
            {
                "CollectionName": "relu_input",
                "CollectionParameters": {"include_regex": ".*relu_input", **relu_input},
            },
        ],
    }


def smdebug_forward_hooks(model: torch.nn.Module, hook) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if any(function == hook.forward_hook for function in module._forward_hooks.values())
    ]


def train_hooked(
    folder: Path, relu_input: dict[str, str], monkeypatch: pytest.MonkeyPatch, *, release: bool = True
) -> tuple[ReluNet, Any, list[list[str]]]:
    """Four training steps and three validation steps under a hook; the model, the hook and, after
    each step, the names of the modules that still carry smdebug's forward hook."""
    monkeypatch.delenv(contract.BASE_DIR_VARIABLE, raising=False)
    monkeypatch.delenv(debugger.CONFIG_PATH_VARIABLE, raising=False)
    if not release:
        monkeypatch.setattr(debugger, "release_module_hooks_when_done", lambda hook, model: None)
    torch.manual_seed(0)
    model, criterion = ReluNet(), torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = folder / "debughookconfig.json"
    write_json(config, relu_input_hook_config(folder / "tensors", relu_input))
    hook = debugger.create_hook(config, model, [criterion])
    hooked_after_each_step = []
    images, targets = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    debugger.set_phase(hook, debugger.TRAIN)
    for _ in range(4):
        loss = criterion(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hooked_after_each_step.append(smdebug_forward_hooks(model, hook))
    debugger.set_phase(hook, debugger.EVAL)
    with torch.no_grad():
        for _ in range(3):
            criterion(model(images), targets)
            hooked_after_each_step.append(smdebug_forward_hooks(model, hook))
    debugger.close(hook)
    return model, hook, hooked_after_each_step


def saved_tensors(folder: Path) -> dict[tuple[str, int, str], np.ndarray]:
    from smdebug import modes
    from smdebug.trials import create_trial

    trial = create_trial(str(folder / "tensors"))
    return {
        (mode.name, step, name): trial.tensor(name).value(step, mode=mode)
        for mode in (modes.TRAIN, modes.EVAL)
        for step in trial.steps(mode=mode)
        for name in trial.tensor_names(step=step, mode=mode)
    }


def test_module_hooks_go_after_the_last_step_that_saves_module_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the definition asks: activation inputs at the first training step only.
    first_step_only = {"train.save_steps": "0", "end_step": "0"}
    _, _, hooked = train_hooked(tmp_path / "released", first_step_only, monkeypatch)
    every_module = ["", "conv", "relu", "head"]
    assert hooked[0] == every_module  # step 0 saves relu_input: they all stay for it
    assert hooked[1:] == [[]] * 6  # from step 1 on, none: relu_input is done, in every mode
    train_hooked(tmp_path / "kept", first_step_only, monkeypatch, release=False)
    released, kept = saved_tensors(tmp_path / "released"), saved_tensors(tmp_path / "kept")
    # Nothing saved changes: the same tensors at the same steps with the same values. The hooks
    # that save the rest stay: the step hook (weights), gradient hooks, the loss module's hook.
    assert released.keys() == kept.keys()
    assert {
        ("TRAIN", 0, "relu_input_0"),
        ("TRAIN", 1, "gradient/ReluNet_head.weight"),
        ("TRAIN", 3, "ReluNet_head.weight"),
    } <= released.keys()
    assert {key[:2] for key in released if key[2] == "CrossEntropyLoss_output_0"} >= {
        ("TRAIN", 0),
        ("TRAIN", 2),
        ("EVAL", 0),
        ("EVAL", 1),
        ("EVAL", 2),
    }
    for key, value in released.items():
        np.testing.assert_array_equal(value, kept[key], err_msg=str(key))


@pytest.mark.parametrize(
    ("relu_input", "hooked_from"),
    [
        ({"save_interval": "3"}, None),  # no end: module tensors keep being saved, hooks stay
        ({"train.save_steps": "0,2", "end_step": "0"}, 3),  # an explicit later step counts
        ({"train.save_steps": "0", "eval.save_steps": "1", "end_step": "0"}, 6),  # eval step 1 saves
        # Steps 0 and 1 of every mode: PREDICT, which nothing here enters, could still come.
        ({"save_interval": "1", "end_step": "2"}, None),
    ],
    ids=["no-end", "later-save-step", "eval-save-step", "unused-mode"],
)
def test_module_hooks_stay_while_a_collection_may_save_module_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relu_input: dict[str, str], hooked_from: int | None
) -> None:
    _, _, hooked = train_hooked(tmp_path, relu_input, monkeypatch)
    every_module = ["", "conv", "relu", "head"]
    if hooked_from is None:
        assert hooked == [every_module] * 7
    else:
        assert hooked[:hooked_from] == [every_module] * hooked_from
        assert hooked[hooked_from:] == [[]] * (7 - hooked_from)
