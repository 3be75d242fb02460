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
    return hook


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
