"""CheckTestLoss: register and deploy when test loss <= TestLossThreshold, otherwise fail."""

from __future__ import annotations

from sagemaker.core.workflow.conditions import ConditionLessThanOrEqualTo
from sagemaker.mlops.workflow.condition_step import ConditionStep
from sagemaker.mlops.workflow.steps import ProcessingStep, Step

from steps.common import StepContext
from steps.evaluate import test_loss

NAME = "CheckTestLoss"


def condition_step(ctx: StepContext, evaluate: ProcessingStep, if_steps: list[Step],
                   else_steps: list[Step]) -> ConditionStep:
    return ConditionStep(
        name=NAME,
        description="Is the test loss at most TestLossThreshold?",
        conditions=[ConditionLessThanOrEqualTo(left=test_loss(evaluate), right=ctx.params["TestLossThreshold"])],
        if_steps=if_steps,
        else_steps=else_steps,
    )
