"""SageMaker Debugger (smdebug) hook set-up for train.py, and the one fix smdebug needs under numpy 2.

SageMaker writes the hook configuration to /opt/ml/input/config/debughookconfig.json when a
training job has a DebugHookConfig; smdebug reads it through $SMDEBUG_CONFIG_FILE_PATH. Without
that file there is no hook and smdebug is never imported, so training runs where smdebug is not
installed.

smdebug 1.0.34 serialises tensors with `ndarray.tostring()`, which numpy 2 removed (AWS training
containers may carry numpy 2). `make_tensor_proto` below is smdebug's function with `tobytes()`
instead, which returns the same bytes and exists in numpy 1 too, so it is installed whatever
numpy is present: the path that is tested is the path that runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

# isort: split
# Siblings, imported flat as inside a SageMaker source_dir.
import contract

CONFIG_PATH_VARIABLE = "SMDEBUG_CONFIG_FILE_PATH"  # read by smdebug's create_from_json_file()
SAGEMAKER_ROOT = "/opt/ml"
# Where smdebug writes when the config has no LocalPath (smdebug's own default).
DEFAULT_TENSORS_DIR = "/opt/ml/output/tensors"
TRAIN, EVAL = "train", "eval"
EPOCH_ACCURACY_TENSORS = {
    TRAIN: contract.EPOCH_TRAINING_ACCURACY_TENSOR,
    EVAL: contract.EPOCH_VALIDATION_ACCURACY_TENSOR,
}


class DebuggerUnavailable(RuntimeError):
    """A hook config asks for Debugger but smdebug cannot be imported; the message says what to do."""


def make_tensor_proto(nparray_data: Any, tag: str) -> Any:
    """smdebug.core.tfevent.util.make_tensor_proto with `tobytes()` in place of `tostring()`."""
    from smdebug.core.tfevent.proto.tensor_pb2 import TensorProto
    from smdebug.core.tfevent.proto.tensor_shape_pb2 import TensorShapeProto
    from smdebug.core.tfevent.util import _get_proto_dtype

    is_number, dtype = _get_proto_dtype(nparray_data.dtype)
    dimensions = [TensorShapeProto.Dim(size=d, name=f"{tag}_{d}") for d in nparray_data.shape]
    shape = TensorShapeProto(dim=dimensions)
    if is_number:
        return TensorProto(dtype=dtype, tensor_content=nparray_data.tobytes(), tensor_shape=shape)
    proto = TensorProto(tensor_shape=shape)
    for item in nparray_data:
        proto.string_val.append(bytes(item, encoding="utf-8"))
    return proto


def patch_smdebug() -> None:
    """Install make_tensor_proto in smdebug; idempotent.

    smdebug's writer imported the function by name, so both module attributes are replaced.
    """
    import smdebug.core.tfevent.util as util
    import smdebug.core.writer as writer

    util.make_tensor_proto = make_tensor_proto
    writer.make_tensor_proto = make_tensor_proto


def reroot_config(config_path: Path, base_dir: str | None, scratch_dir: Path) -> Path:
    """The hook config to give smdebug: `config_path` itself, or a copy whose LocalPath is re-rooted.

    SageMaker's config names /opt/ml/output/tensors (or nothing, which means the same). When the
    container layout is re-rooted under $SAGEMAKER_BASE_DIR, that path must move with it, or
    smdebug would try to write to /opt/ml (and, failing, silently disable itself).
    """
    if not base_dir:
        return config_path
    config = json.loads(config_path.read_text())
    local_path = config.get("LocalPath") or DEFAULT_TENSORS_DIR
    if not (local_path == SAGEMAKER_ROOT or local_path.startswith(SAGEMAKER_ROOT + "/")):
        return config_path
    config["LocalPath"] = os.path.join(base_dir, os.path.relpath(local_path, SAGEMAKER_ROOT))
    rerooted = scratch_dir / config_path.name
    rerooted.write_text(json.dumps(config))
    return rerooted


def create_hook(config_path: Path, model: nn.Module, losses: list[nn.Module]) -> Any | None:
    """The smdebug hook described by `config_path`, registered on `model` and `losses`; None without a config.

    Create it after torch.distributed is initialised: smdebug names its worker from the rank
    then, and with its default include_workers="one" only rank 0 writes tensors.
    """
    if not config_path.is_file():
        return None
    try:
        import smdebug.pytorch as smd
    except ImportError:
        raise DebuggerUnavailable(
            f"{config_path} asks for SageMaker Debugger but smdebug is not installed: "
            "pip install smdebug==1.0.34 (see entrypoints/requirements.txt) or remove the hook config"
        ) from None
    patch_smdebug()
    with tempfile.TemporaryDirectory(prefix="kennel-smdebug-") as scratch:
        resolved = reroot_config(config_path, os.environ.get(contract.BASE_DIR_VARIABLE), Path(scratch))
        os.environ[CONFIG_PATH_VARIABLE] = str(resolved)
        hook = smd.Hook.create_from_json_file()  # reads the file once, here
    os.environ[CONFIG_PATH_VARIABLE] = str(config_path)  # the copy is gone; point at the original
    hook.register_module(model)
    for loss in losses:
        hook.register_loss(loss)
    release_module_hooks_when_done(hook, model)
    return hook


def release_module_hooks_when_done(hook: Any, model: nn.Module) -> None:
    """Take smdebug's forward hook off `model` and its submodules from the first step from which
    no collection can save a module's inputs or outputs.

    smdebug calls that hook after every module's forward, at every step (some 200 calls a step for
    EfficientNet-Lite0), to save module inputs and outputs and to time the modules for framework
    profiling; and a module with a hook leaves torch's fast call path. The definition saves module
    tensors at the first training step only (the activation inputs PoorWeightInitialization
    reads) and asks for no framework profiling, so after that step the hooks save nothing and cost
    about 9 ms of a 145 ms training step on the local default job (measured on 2 cores). What
    stays: the model's step hooks (step count, weights, biases), the gradient hooks, and the loss
    modules' hooks (the losses collection). Nothing saved changes. With framework profiling on,
    every hook stays, since its timeline needs them.
    """
    if hook.profiler_config_parser.profiling_enabled:
        return
    from smdebug.core.modes import ModeKeys
    from smdebug.core.utils import match_inc

    modules = list(model.modules())
    # smdebug names a module's tensors <module name>_input_<i> and <module name>_output_<i>.
    tensor_names = [
        f"{module._module_name}{suffix}0" for module in modules for suffix in ("_input_", "_output_")
    ]

    def saves_module_tensors(collection: Any) -> bool:
        return any(
            name in collection.tensor_names or match_inc(name, collection.include_regex)
            for name in tensor_names
        )

    def may_save_again(collection: Any) -> bool:
        """Whether `collection` can save at the current step or a later one, in any mode."""
        for mode in ModeKeys:
            config = collection.save_config.get_save_config(mode)
            if config is None:
                continue
            # smdebug's step hook has already moved the current mode to the step about to run.
            first = hook.mode_steps.get(mode, hook.init_step) + (0 if mode == hook.mode else 1)
            if (
                config.end_step is None
                or config.end_step > first
                or any(step >= first for step in config.save_steps)
            ):
                return True
        return False

    watched: list[Any] | None = None  # the collections that save module tensors

    def release(module: nn.Module, inputs: Any) -> None:
        nonlocal watched
        if not hook.prepared_collections:
            return  # smdebug's step hook set nothing up (it turns itself off on its own errors)
        if watched is None:
            # Found once, at the first step, after smdebug's step hook has prepared its collections:
            # matching ~400 names against every collection's patterns costs a few milliseconds.
            watched = [
                item
                for item in hook.collection_manager.get_collections().values()
                if saves_module_tensors(item)
            ]
            configs = [item.save_config.get_save_config(mode) for item in watched for mode in ModeKeys]
            if any(config is not None and config.end_step is None for config in configs):
                handle.remove()  # one of them saves module tensors with no end: all the hooks stay
                return
        if any(may_save_again(collection) for collection in watched):
            return
        for each in modules:
            for key, function in list(each._forward_hooks.items()):
                if function == hook.forward_hook:
                    del each._forward_hooks[key]
                    each._forward_hooks_with_kwargs.pop(key, None)
                    each._forward_hooks_always_called.pop(key, None)
        handle.remove()

    # Registered after smdebug's step hook, so it runs once that hook has advanced the step.
    handle = model.register_forward_pre_hook(release)


def set_phase(hook: Any | None, phase: str) -> None:
    """Tell the hook whether the next steps are training or validation (no-op without a hook)."""
    if hook is None:
        return
    from smdebug import modes

    hook.set_mode({TRAIN: modes.TRAIN, EVAL: modes.EVAL}[phase])


def save_epoch_ends(hook: Any | None, steps_per_epoch: int, epochs: int) -> None:
    """Save the epoch-means collection in training mode only at the last step of each epoch.

    The hook config saves it at every step (its tensors exist only where `record_epoch_mean` puts
    them), but smdebug visits every module and parameter at each step any collection saves, which
    at every training step costs more than the Debugger budget. No-op without the collection.
    """
    if hook is None or contract.EPOCH_MEANS_COLLECTION not in hook.collection_manager.collections:
        return
    from smdebug import modes
    from smdebug.core.save_config import SaveConfig, SaveConfigMode

    collection = hook.collection_manager.get(contract.EPOCH_MEANS_COLLECTION)
    configured = collection.save_config.mode_save_configs if collection.save_config else {}
    ends = [(epoch + 1) * steps_per_epoch - 1 for epoch in range(epochs)]
    collection.save_config = SaveConfig(
        mode_save_configs={**configured, modes.TRAIN: SaveConfigMode(save_steps=ends)}
    )


def record_epoch_mean(hook: Any | None, name: str, value: float) -> None:
    """Save an epoch's mean loss (contract.EPOCH_TRAINING_TENSOR or EPOCH_VALIDATION_TENSOR) or
    accuracy (EPOCH_ACCURACY_TENSORS) at the current step, the last of the phase; no-op without a hook."""
    if hook is None:
        return
    hook.record_tensor_value(name, torch.tensor(value))


def close(hook: Any | None) -> None:
    """Flush the hook's last step and mark the trial finished (smdebug also does this at exit)."""
    if hook is not None:
        hook.close()
