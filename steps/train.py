"""TrainWithDebugger: the final training job, with the best trial's hyperparameters.

SDK v3's ModelTrainer has no Debugger arguments, so `DebugTrainingStep` adds DebugHookConfig,
DebugRuleConfigurations, ProfilerConfig and ProfilerRuleConfigurations to the CreateTrainingJob
request itself. Nothing in v3 adds the tensor collections a rule reads, so the hook config lists
them here: every rule below names the collections it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import smdebug_rulesconfig as rule_configs
from sagemaker.core.debugger import (
    CollectionConfig,
    DebuggerHookConfig,
    ProfilerConfig,
    ProfilerRule,
    Rule,
    get_rule_container_image_uri,
)
from sagemaker.core.training.configs import MetricDefinition
from sagemaker.mlops.workflow.steps import ProcessingStep, TrainingStep, TuningStep

from entrypoints import contract
from steps.common import (
    DRIVERS_FOLDER,
    StepContext,
    cache_config,
    content_addressed_channel,
    job_retry_policies,
    static_s3_uri,
)
from steps.tune import TUNED, best_hyperparameter, model_trainer, static_hyperparameters, training_channels

NAME = "TrainWithDebugger"


@dataclass(frozen=True)
class DebugRule:
    base_config: Any  # a smdebug_rulesconfig factory
    parameters: dict[str, str]  # AWS's documented parameters, spelled out so they are visible
    collections: tuple[str, ...]  # tensor collections the rule reads


# smdebug names a module's inputs "<module path>_input_<n>" (n counts the calls in a step: a module
# used twice gets _input_0 and _input_1). The activations of the ResNets are modules named `relu`,
# those of efficientnet_lite (ReLU6) modules named `_swish`; AWS's default, ".*relu_input", sees
# only the former.
ACTIVATION_INPUTS_REGEX = ".*relu_input,.*_swish_input"
# PoorWeightInitialization looks at the first `steps` training steps only.
INITIAL_STEPS = 10
# The epoch means (contract.EPOCH_MEANS_COLLECTION) hold losses and accuracies: the loss rules name
# the loss tensors, so that an accuracy never counts as a loss.
EPOCH_LOSS_TENSORS = f"{contract.EPOCH_TRAINING_TENSOR}_output_0,{contract.EPOCH_VALIDATION_TENSOR}_output_0"
EPOCH_ACCURACY_TENSORS = (contract.EPOCH_TRAINING_ACCURACY_TENSOR, contract.EPOCH_VALIDATION_ACCURACY_TENSOR)

DEBUG_RULES = (
    # The loss rules compare epochs: train.py records each epoch's mean training and validation loss
    # (contract.EPOCH_MEANS_COLLECTION). Single batches differ with the classes they hold by far
    # more than these thresholds: on them the rules fired on healthy runs.
    DebugRule(rule_configs.loss_not_decreasing,
              {"tensor_regex": EPOCH_LOSS_TENSORS, "use_losses_collection": "False",
               "mode": "EVAL", "num_steps": "1", "diff_percent": "0.1", "increase_threshold_percent": "5"},
              (contract.EPOCH_MEANS_COLLECTION,)),
    DebugRule(rule_configs.vanishing_gradient, {"threshold": "0.0000001"}, ("gradients",)),
    DebugRule(rule_configs.overfit,
              {"tensor_regex": EPOCH_LOSS_TENSORS, "start_step": "0", "patience": "1", "ratio_threshold": "0.1"},
              (contract.EPOCH_MEANS_COLLECTION,)),
    DebugRule(rule_configs.overtraining,
              {"patience_train": "5", "patience_validation": "10", "delta": "0.01"}, ("losses",)),
    # threshold is AWS's 10 times 10. The backbones Kennel fine-tunes are pretrained, and a pretrained
    # network's activation inputs differ across layers more than a fresh initialization's: measured
    # on efficientnet_lite0's ImageNet weights, 12x (224 px) to 39x (32 px); a fresh initialization
    # whose batch norm normalizes, 1.6x (lite0) to 4.7x (resnet18); one that lets the signal vanish
    # (untrained weights with frozen batch-norm statistics), 1e17x. At 10 the rule would call every
    # pretrained starting point a poor initialization.
    DebugRule(rule_configs.poor_weight_initialization,
              {"activation_inputs_regex": ACTIVATION_INPUTS_REGEX, "threshold": "100", "distribution_range": "0.001",
               "patience": "5", "steps": str(INITIAL_STEPS)}, ("weights", "gradients", "losses", "relu_input")),
    # Cheap (a NaN/inf scan of tensors already saved). ClassImbalance is left out: it needs label and
    # prediction tensors that train.py does not save.
    DebugRule(rule_configs.exploding_tensor, {"collection_names": "gradients,weights", "only_nan": "False"},
              ("gradients", "weights")),
)
PROFILER_RULES = (rule_configs.ProfilerReport, rule_configs.LowGPUUtilization)
FIRST_STEPS = ",".join(str(step) for step in range(INITIAL_STEPS))
# Collection parameters beyond the hook's save interval (per mode where a rule reads one mode only).
COLLECTION_PARAMETERS = {
    # Every validation step: Overtraining compares whole validation passes. Every one of the first
    # training steps, which PoorWeightInitialization examines (it needs more than `patience` losses
    # and the gradients of each); later, the hook's interval. (Every training step would make
    # smdebug visit the whole model at each step: more than the hook's budget.)
    "losses": {"eval.save_interval": "1", "train.save_steps": FIRST_STEPS},
    "gradients": {"train.save_steps": FIRST_STEPS},
    # Recorded by train.py at the last step of each phase; train.py narrows the training-mode saves
    # to the epochs' last steps, which it alone knows.
    contract.EPOCH_MEANS_COLLECTION: {
        "include_regex": ",".join(
            f"{name}_output_.*"
            for name in (contract.EPOCH_TRAINING_TENSOR, contract.EPOCH_VALIDATION_TENSOR, *EPOCH_ACCURACY_TENSORS)
        ),
        "save_interval": "1",
    },
    # Weights and biases are most of the saved volume and change slowly: every 100th step (step 0
    # included) serves PoorWeightInitialization and ExplodingTensor.
    "weights": {"save_interval": "100"},
    "biases": {"save_interval": "100"},
    # Activation inputs are large (145 MB a step for efficientnet_lite0 at 96 px and batch 32): the
    # first training step only, where an initialization shows (AWS's own default saves them every
    # 500th step, so also only once in the first `steps`). end_step 0 stops the interval in every mode.
    "relu_input": {"include_regex": ACTIVATION_INPUTS_REGEX, "train.save_steps": "0", "end_step": "0"},
}
PROFILING_INTERVAL_MS = 500


class DebugTrainingStep(TrainingStep):
    """A TrainingStep whose CreateTrainingJob request carries Debugger and profiler settings, and
    whose driver channel lies at a content-addressed place (steps.common)."""

    def __init__(self, *, ctx: StepContext, debugger: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._ctx = ctx
        self._debugger = debugger

    @property
    def arguments(self) -> dict[str, Any]:
        request = super().arguments
        request.update(self._debugger)
        # The ModelTrainer uploads its driver channel under the time-stamped job name; the cache key
        # (InputDataConfig) must not move with it.
        content_addressed_channel(self._ctx, request["InputDataConfig"], DRIVERS_FOLDER)
        return request


def debugger_request(ctx: StepContext) -> dict[str, Any]:
    """The four Debugger members of CreateTrainingJob, rule images resolved for the region."""
    config = ctx.config
    collections = sorted({name for rule in DEBUG_RULES for name in rule.collections} | {"biases"})
    hook = DebuggerHookConfig(
        s3_output_path=static_s3_uri(config, config.pipeline_name, "debug"),
        hook_parameters={"save_interval": str(config.debug_save_interval)},
        collection_configs=[CollectionConfig(name=name, parameters=COLLECTION_PARAMETERS.get(name))
                            for name in collections],
    )
    rules = []
    for spec in DEBUG_RULES:
        rule = Rule.sagemaker(spec.base_config(), rule_parameters=dict(spec.parameters))
        rule.image_uri = get_rule_container_image_uri(rule.name, config.region)
        rules.append(rule.to_debugger_rule_config_dict())
    profiler_rules = []
    for factory in PROFILER_RULES:
        rule = ProfilerRule.sagemaker(factory())
        rule.image_uri = get_rule_container_image_uri(rule.name, config.region)
        profiler_rules.append(rule.to_profiler_rule_config_dict())
    profiler = ProfilerConfig(s3_output_path=static_s3_uri(config, config.pipeline_name, "profiler"),
                              system_monitor_interval_millis=PROFILING_INTERVAL_MS)
    return {
        "DebugHookConfig": hook._to_request_dict(),
        "DebugRuleConfigurations": rules,
        "ProfilerConfig": profiler._to_request_dict(),
        "ProfilerRuleConfigurations": profiler_rules,
    }


def train_step(ctx: StepContext, prepare: ProcessingStep, tune: TuningStep) -> DebugTrainingStep:
    """Trains once more with the static hyperparameters plus the best trial's tuned values."""
    config = ctx.config
    hyperparameters = static_hyperparameters(ctx)
    hyperparameters.update({name: best_hyperparameter(tune, name) for name in TUNED})
    # No CheckpointConfig: it is part of the step's cache key, and an S3 checkpoint path shared
    # across executions would let one execution resume another's run, while one per execution
    # would never hit the cache. train.py checkpoints locally either way.
    # torchrun, so that TrainingInstanceCount > 1 or a multi-GPU instance trains one model together.
    trainer = model_trainer(ctx, f"{config.pipeline_name}-train", hyperparameters, source_dir=ctx.code.source_uri,
                            distributed=True)
    # The tuner sets metric definitions on its trials; this job needs its own so that SageMaker (and
    # the local runner) fill FinalMetricDataList and Studio charts its epochs.
    trainer.with_metric_definitions([MetricDefinition(name=d["Name"], regex=d["Regex"])
                                     for d in contract.METRIC_DEFINITIONS])
    return DebugTrainingStep(
        ctx=ctx,
        name=NAME,
        step_args=trainer.train(input_data_config=training_channels(prepare)),
        debugger=debugger_request(ctx),
        description="Train with the best trial's hyperparameters; Debugger rules and profiler attached",
        cache_config=cache_config(config),
        retry_policies=job_retry_policies(),
    )


def model_artifacts(train: TrainingStep) -> Any:
    """A `Get` on the S3 URI of the trained model.tar.gz."""
    return train.properties.ModelArtifacts.S3ModelArtifacts
