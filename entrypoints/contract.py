"""Names shared by the step scripts and the code that wires them into a pipeline.

The scripts in this folder are uploaded alone as a SageMaker `source_dir`, so they cannot import
`steps/` or `pipeline/`. The names that both sides must agree on (output names, file names, the
metric line the tuner reads, the JSON path the condition reads) therefore live here, in a
stdlib-only module that `steps/` imports as `entrypoints.contract` and the scripts as `contract`.
"""

from __future__ import annotations

import os
import re

# SageMaker containers keep everything under /opt/ml. The training toolkit moves that root when
# SAGEMAKER_BASE_DIR is set; Kennel's scripts honour the same variable, which is how the local
# runner (and the tests) re-root the container layout into a job folder.
BASE_DIR_VARIABLE = "SAGEMAKER_BASE_DIR"


def opt_ml(*parts: str) -> str:
    """`/opt/ml/<parts>`, or the same path under $SAGEMAKER_BASE_DIR when that is set."""
    return os.path.join(os.environ.get(BASE_DIR_VARIABLE) or "/opt/ml", *parts)


# --- processing (prepare / evaluate) -------------------------------------------------------
PROCESSING_ROOT = "/opt/ml/processing"
SPLITS = ("train", "valid", "test")
MANIFEST_FILE = "manifest.json"  # class index -> label, counts per split (written by prepare)
DATA_REPORT_FILE = "data_report.json"  # every rejected file and why (written by prepare)

# Output names of the prepare step; each is a folder under /opt/ml/processing/output/.
PREPARE_OUTPUTS = ("train", "valid", "test", "report")

EVALUATION_OUTPUT = "evaluation"  # output name of the evaluate step
EVALUATION_FILE = "evaluation.json"
# SageMaker's model-quality layout: multiclass_classification_metrics.<metric>.value
EVALUATION_METRICS_KEY = "multiclass_classification_metrics"
TEST_LOSS_JSON_PATH = f"{EVALUATION_METRICS_KEY}.loss.value"
TEST_ACCURACY_JSON_PATH = f"{EVALUATION_METRICS_KEY}.accuracy.value"
# Printed once by evaluate.py for the job log (the JSON file is what the pipeline reads).
TEST_METRIC_LINE = "test_loss={test_loss:.6f} test_accuracy={test_accuracy:.6f}"

# --- training --------------------------------------------------------------------------------
TRAIN_CHANNELS = ("train", "valid")  # SM_CHANNEL_TRAIN, SM_CHANNEL_VALID
# Per-epoch history (epoch, train_loss, valid_loss, valid_accuracy, seconds) that train.py rewrites
# in SM_OUTPUT_DATA_DIR each epoch; the local runner plots it.
EPOCH_METRICS_FILE = "metrics.json"
# Each epoch's mean training loss and the whole validation set's mean loss, recorded with the
# Debugger hook (as <name>_output_0) at the last training and the last validation step of the
# epoch, in their own collection: single batches differ with the classes they hold, so the loss
# rules compare these, epoch against epoch. The names must not end in "loss": smdebug's losses
# collection takes every "*loss_*output" tensor.
EPOCH_TRAINING_TENSOR = "training_set_mean"
EPOCH_VALIDATION_TENSOR = "validation_set_mean"
# Each epoch's accuracy on the training pass and on the validation set, recorded the same way next
# to the loss means, for the plots.
EPOCH_TRAINING_ACCURACY_TENSOR = "training_set_accuracy"
EPOCH_VALIDATION_ACCURACY_TENSOR = "validation_set_accuracy"
EPOCH_MEANS_COLLECTION = "epoch_means"
MODEL_WEIGHTS_FILE = "model.pth"  # a state_dict, loaded with torch.load(weights_only=True)
MODEL_META_FILE = "model_meta.json"  # arch, class names, image size, normalization
CHECKPOINT_FILE = "checkpoint.pth"

# One line per epoch, printed by train.py and read by the tuner (SageMaker's MetricDefinitions
# and the local tuner apply the same regexes to the job's log).
EPOCH_METRIC_LINE = (
    "epoch={epoch} train_loss={train_loss:.6f} valid_loss={valid_loss:.6f} "
    "valid_accuracy={valid_accuracy:.6f}"
)
_NUMBER = r"([0-9]+\.?[0-9]*(?:[eE][-+]?[0-9]+)?)"
METRIC_DEFINITIONS = [
    {"Name": "train:loss", "Regex": rf"train_loss={_NUMBER}"},
    {"Name": "valid:loss", "Regex": rf"valid_loss={_NUMBER}"},
    {"Name": "valid:accuracy", "Regex": rf"valid_accuracy={_NUMBER}"},
]
OBJECTIVE_METRIC = "valid:loss"  # minimized by the tuner

# --- inference -------------------------------------------------------------------------------
IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "application/x-image")
INFERENCE_CONTENT_TYPES = (*IMAGE_CONTENT_TYPES, "application/json", "application/x-npy")
INFERENCE_RESPONSE_TYPES = ("application/json",)
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # SageMaker real-time endpoints refuse bodies over 6 MB
INFERENCE_MAX_BATCH = 64  # images in one request; a larger batch is a 400, not a slow 500
DEFAULT_TOP_K = 5  # labels an answer carries unless a JSON request asks for another top_k


def parse_metric_line(line: str) -> dict[str, float]:
    """Values of the metric definitions found in one log line (what SageMaker would record)."""
    found = {}
    for definition in METRIC_DEFINITIONS:
        match = re.search(definition["Regex"], line)
        if match:
            found[definition["Name"]] = float(match.group(1))
    return found
