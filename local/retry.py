"""A step's RetryPolicies: which failures are retried, after how long, and how many times.

SageMaker's semantics: the first policy whose ExceptionType lists the failure's type applies;
the wait before retry n (1-based) is IntervalSeconds * BackoffRate^(n-1); MaxAttempts caps the
number of retries, ExpireAfterMin the time since the step first started. See local.handlers for
which local failures carry which type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RetryPolicy:
    exception_types: tuple[str, ...]
    interval_seconds: float = 1.0
    backoff_rate: float = 2.0
    max_attempts: int | None = None
    expire_after_minutes: float | None = None


def parse_policies(step: Mapping[str, Any]) -> list[RetryPolicy]:
    policies = []
    for item in step.get("RetryPolicies") or []:
        policies.append(
            RetryPolicy(
                exception_types=tuple(item.get("ExceptionType") or ()),
                interval_seconds=float(item.get("IntervalSeconds", 1)),
                backoff_rate=float(item.get("BackoffRate", 2.0)),
                max_attempts=int(item["MaxAttempts"]) if item.get("MaxAttempts") is not None else None,
                expire_after_minutes=float(item["ExpireAfterMin"])
                if item.get("ExpireAfterMin") is not None
                else None,
            )
        )
    return policies


def retry_delay(
    policies: list[RetryPolicy], failure_type: str | None, retries_done: int, seconds_since_first_start: float
) -> float | None:
    """Seconds to wait before the next attempt, or None when the failure is not to be retried."""
    policy = next((item for item in policies if failure_type and failure_type in item.exception_types), None)
    if policy is None:
        return None
    if policy.max_attempts is not None and retries_done >= policy.max_attempts:
        return None
    if (
        policy.expire_after_minutes is not None
        and seconds_since_first_start >= policy.expire_after_minutes * 60
    ):
        return None
    if policy.max_attempts is None and policy.expire_after_minutes is None:
        return None
    return policy.interval_seconds * policy.backoff_rate**retries_done
