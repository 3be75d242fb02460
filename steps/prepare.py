"""PrepareData: split and check the ImageFolder tree (entrypoints/prepare.py on a processing job)."""

from __future__ import annotations

from sagemaker.mlops.workflow.steps import ProcessingStep

from entrypoints import contract
from steps.common import (
    StepContext,
    cache_config,
    framework_processor,
    job_retry_policies,
    processing_input,
    processing_output,
    run_processor,
)

NAME = "PrepareData"
INPUT_PATH = f"{contract.PROCESSING_ROOT}/input/data"
OUTPUT_ROOT = f"{contract.PROCESSING_ROOT}/output"


def prepare_step(ctx: StepContext) -> ProcessingStep:
    """Reads InputDataUri; writes one output per contract.PREPARE_OUTPUTS (train/valid/test/report)."""
    config, params = ctx.config, ctx.params
    processor = framework_processor(
        ctx, f"{config.pipeline_name}-prepare",
        params["ProcessingInstanceType"], params["ProcessingInstanceCount"],
    )
    step_args = run_processor(
        ctx, processor, "prepare.py",
        inputs=[processing_input("data", params["InputDataUri"], INPUT_PATH)],
        outputs=[processing_output(ctx, NAME, name, f"{OUTPUT_ROOT}/{name}") for name in contract.PREPARE_OUTPUTS],
        arguments=[
            "--input", INPUT_PATH,
            "--output", OUTPUT_ROOT,
            "--valid-fraction", str(config.valid_fraction),
            "--test-fraction", str(config.test_fraction),
            "--seed", params["Seed"].to_string(),
            "--min-size", str(config.min_image_size),
        ],
    )
    return ProcessingStep(
        name=NAME,
        step_args=step_args,
        description="Check every image, split the ImageFolder tree into train/valid/test, report rejects",
        cache_config=cache_config(config),
        retry_policies=job_retry_policies(),
    )
