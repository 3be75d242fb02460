"""Evaluate: test-set metrics of the trained model (entrypoints/evaluate.py on a processing job)."""

from __future__ import annotations

from sagemaker.core.workflow.functions import Join, JsonGet
from sagemaker.core.workflow.properties import PropertyFile
from sagemaker.mlops.workflow.steps import ProcessingStep, TrainingStep

from entrypoints import contract
from steps.common import (
    StepContext,
    cache_config,
    framework_processor,
    job_retry_policies,
    output_uri,
    processing_input,
    processing_output,
    run_processor,
)
from steps.train import model_artifacts

NAME = "Evaluate"
REPORT = "EvaluationReport"  # the PropertyFile the condition reads
MODEL_PATH = f"{contract.PROCESSING_ROOT}/input/model"
TEST_PATH = f"{contract.PROCESSING_ROOT}/input/test"
OUTPUT_PATH = f"{contract.PROCESSING_ROOT}/output/{contract.EVALUATION_OUTPUT}"


def evaluate_step(ctx: StepContext, prepare: ProcessingStep, train: TrainingStep) -> ProcessingStep:
    """Writes contract.EVALUATION_FILE to the `evaluation` output, registered as a PropertyFile."""
    params = ctx.params
    processor = framework_processor(
        ctx, f"{ctx.config.pipeline_name}-evaluate",
        params["ProcessingInstanceType"], params["ProcessingInstanceCount"],
    )
    step_args = run_processor(
        ctx, processor, "evaluate.py",
        inputs=[
            # SageMaker downloads the model.tar.gz object into this folder.
            processing_input("model", model_artifacts(train), MODEL_PATH),
            processing_input("test", output_uri(prepare, "test"), TEST_PATH),
        ],
        outputs=[processing_output(ctx, NAME, contract.EVALUATION_OUTPUT, OUTPUT_PATH)],
        arguments=["--model", MODEL_PATH, "--test", TEST_PATH, "--output", OUTPUT_PATH],
    )
    return ProcessingStep(
        name=NAME,
        step_args=step_args,
        description="Loss and accuracy of the trained model on the held-out test split",
        property_files=[PropertyFile(name=REPORT, output_name=contract.EVALUATION_OUTPUT,
                                     path=contract.EVALUATION_FILE)],
        cache_config=cache_config(ctx.config),
        retry_policies=job_retry_policies(),
    )


def test_loss(evaluate: ProcessingStep) -> JsonGet:
    """The measured test loss, read from evaluation.json when the pipeline runs."""
    return JsonGet(step_name=evaluate.name, property_file=evaluate.property_files[0],
                   json_path=contract.TEST_LOSS_JSON_PATH)


def evaluation_file_uri(evaluate: ProcessingStep) -> Join:
    """S3 URI of evaluation.json (for the model package's ModelMetrics)."""
    return Join(on="/", values=[output_uri(evaluate, contract.EVALUATION_OUTPUT), contract.EVALUATION_FILE])
