"""Fail: the else branch; its message gives the measured test loss and the threshold."""

from __future__ import annotations

from sagemaker.core.workflow.functions import Join
from sagemaker.mlops.workflow.fail_step import FailStep
from sagemaker.mlops.workflow.steps import ProcessingStep

from steps.common import StepContext
from steps.evaluate import test_loss

NAME = "Fail"


def fail_step(ctx: StepContext, evaluate: ProcessingStep) -> FailStep:
    return FailStep(
        name=NAME,
        description="The model is not registered: its test loss is above the threshold",
        error_message=Join(on=" ", values=[
            "Test loss", test_loss(evaluate), "is above TestLossThreshold", ctx.params["TestLossThreshold"],
            "- the model was not registered; tune longer, unfreeze more, or raise the threshold.",
        ]),
    )
