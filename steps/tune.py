"""Tune: a hyperparameter tuning job over entrypoints/train.py (ModelTrainer + HyperparameterTuner)."""

from __future__ import annotations

from typing import Any

from sagemaker.core.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter
from sagemaker.core.shapes import OutputDataConfig, StoppingCondition
from sagemaker.core.training.configs import Compute, InputData, SourceCode
from sagemaker.mlops.workflow.steps import ProcessingStep, TuningStep
from sagemaker.train.distributed import Torchrun
from sagemaker.train.model_trainer import ModelTrainer
from sagemaker.train.tuner import HyperparameterTuner

from entrypoints import contract
from steps.common import (
    DRIVERS_FOLDER,
    StepContext,
    cache_config,
    content_addressed_channel,
    job_retry_policies,
    output_uri,
    static_s3_uri,
    training_image,
)

NAME = "Tune"
TUNED = ("lr", "batch-size", "epochs")  # the hyperparameters the tuner searches


class ParameterizedTuningStep(TuningStep):
    """A TuningStep whose resource limits are pipeline parameters.

    The v3 tuner builds its request with pydantic models that take only ints for the limits,
    while CreateHyperParameterTuningJob inside a pipeline takes parameter references; the
    limits are swapped in after the SDK has built the request, and the driver channel is moved to
    a content-addressed place (steps.common).
    """

    def __init__(self, *, ctx: StepContext, resource_limits: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._ctx = ctx
        self._resource_limits = resource_limits

    @property
    def arguments(self) -> dict[str, Any]:
        request = super().arguments
        request["HyperParameterTuningJobConfig"]["ResourceLimits"].update(self._resource_limits)
        # The tuner uploads its driver channel under a time-stamped key; its cache key must not move.
        content_addressed_channel(self._ctx, request["TrainingJobDefinition"]["InputDataConfig"], DRIVERS_FOLDER)
        return request


def static_hyperparameters(ctx: StepContext) -> dict[str, Any]:
    """train.py's arguments that every trial and the final training share.

    Hyperparameters are strings in CreateTrainingJob, so integer parameters go in as their
    string form (a `Std:Join`), never as a bare integer `Get`.
    """
    config, params = ctx.config, ctx.params
    return {
        "arch": params["Architecture"],
        "weights": config.weights,
        "allow-download": ctx.allow_download,
        "freeze": params["Freeze"],
        "image-size": params["ImageSize"].to_string(),
        "optimizer": config.optimizer,
        "weight-decay": str(config.weight_decay),
        "label-smoothing": str(config.label_smoothing),
        "seed": params["Seed"].to_string(),
        "workers": str(config.workers),
    }


def model_trainer(ctx: StepContext, base_job_name: str, hyperparameters: dict[str, Any], source_dir: str,
                  distributed: bool = False) -> ModelTrainer:
    """A ModelTrainer running train.py from the shared code bundle, already in S3 at `source_dir`
    (a prefix of files for a training job's `code` channel, or the tarball a tuner's trials fetch).

    `distributed` starts train.py under torchrun, one process per GPU on each of the
    TrainingInstanceCount instances. Otherwise the job runs one process on one instance: the tuner
    starts its trials the framework-toolkit way, which would run independent copies of train.py on
    extra instances, so trials scale out through MaxParallelJobs instead.
    """
    config, params = ctx.config, ctx.params
    return ModelTrainer(
        training_image=training_image(config),
        source_code=SourceCode(source_dir=source_dir, entry_script="train.py"),
        compute=Compute(instance_type=params["TrainingInstanceType"],
                        instance_count=params["TrainingInstanceCount"] if distributed else 1),
        stopping_condition=StoppingCondition(max_runtime_in_seconds=config.max_runtime_seconds),
        output_data_config=OutputDataConfig(s3_output_path=static_s3_uri(config, base_job_name),
                                            compression_type="GZIP"),
        role=config.role_arn,
        sagemaker_session=ctx.session,
        base_job_name=base_job_name,
        hyperparameters=hyperparameters,
        environment={"PYTHONUNBUFFERED": "1"},
        distributed=Torchrun() if distributed else None,
    )


def training_channels(prepare: ProcessingStep) -> list[InputData]:
    """The train and valid channels, read from the prepare step's outputs."""
    return [InputData(channel_name=name, data_source=output_uri(prepare, name)) for name in contract.TRAIN_CHANNELS]


def tune_step(ctx: StepContext, prepare: ProcessingStep) -> ParameterizedTuningStep:
    """Minimizes contract.OBJECTIVE_METRIC over lr (log), batch-size (categorical), epochs (integer)."""
    config, params = ctx.config, ctx.params
    tuner = HyperparameterTuner(
        # The trials start train.py the training toolkit's way, from sagemaker_submit_directory: a tarball.
        model_trainer=model_trainer(ctx, f"{config.pipeline_name}-tune", static_hyperparameters(ctx),
                                    source_dir=ctx.code.tarball_uri),
        objective_metric_name=contract.OBJECTIVE_METRIC,
        objective_type="Minimize",
        hyperparameter_ranges={
            "lr": ContinuousParameter(config.lr_min, config.lr_max, scaling_type="Logarithmic"),
            "batch-size": CategoricalParameter(list(config.batch_sizes)),
            "epochs": IntegerParameter(config.min_epochs, params["Epochs"]),
        },
        metric_definitions=[dict(definition) for definition in contract.METRIC_DEFINITIONS],
        strategy=config.strategy,
        # Hyperband stops trials itself; SageMaker refuses Auto early stopping alongside it.
        early_stopping_type="Off" if config.strategy == "Hyperband" else "Auto",
        max_jobs=config.max_jobs,  # placeholders, replaced by the parameters (see the step class)
        max_parallel_jobs=config.max_parallel_jobs,
        base_tuning_job_name=f"{config.pipeline_name}-tune",
    )
    return ParameterizedTuningStep(
        ctx=ctx,
        name=NAME,
        step_args=tuner.tune(inputs=training_channels(prepare)),
        resource_limits={
            "MaxNumberOfTrainingJobs": params["MaxJobs"],
            "MaxParallelTrainingJobs": params["MaxParallelJobs"],
        },
        description="Search lr, batch size and epochs; minimize the validation loss",
        cache_config=cache_config(config),
        retry_policies=job_retry_policies(),
    )


def best_hyperparameter(tune: TuningStep, name: str) -> Any:
    """A `Get` on the best training job's tuned value of `name`."""
    return tune.properties.BestTrainingJob.TunedHyperParameters[name]
