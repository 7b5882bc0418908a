"""Every step kind of a study plan: importing a kind's module registers it (tasks.steps.register)."""

from tasks import (  # noqa: F401
    domain_eval,
    findings,
    generate,
    judge,
    merge,
    models,
    preflight,
    prompts,
    report,
    safety,
    similarity,
    vectors,
)
