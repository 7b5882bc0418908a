"""Which steps of a plan are finished already: their published, verified artifacts under the artifact root.

Walks the plan in order, computing each step's key from its inputs' manifests as a run would (pinning hub
revisions from the local cache or the hub); a step whose inputs are not all finished is not finished either.
"""

from __future__ import annotations

from typing import Any

from mergealign.artifacts import Manifest
from mergealign.errors import MergeAlignError
from mergealign.study import StudyPlan
from tasks.context import StepContext
from tasks.steps import kind_of


def finished_steps(ctx: StepContext, plan: StudyPlan) -> dict[str, Manifest | None]:
    """step id -> its manifest if published and its files present at their size (`verify: none`), else None."""
    store, memo = ctx.store(), {}
    found: dict[str, Manifest | None] = {}
    for step in plan.steps:
        kind = kind_of(step)
        inputs: dict[str, Any] = {}
        complete = True
        for role, value in step.inputs.items():
            if isinstance(value, str):
                inputs[role] = found.get(value)
                complete &= inputs[role] is not None
            else:
                inputs[role] = {k: found.get(v) for k, v in value.items()}
                complete &= all(m is not None for m in inputs[role].values())
        if not complete and not kind.tolerant:
            found[step.id] = None
            continue
        try:
            pins = kind.pin(ctx, step, memo) if kind.pin is not None else None
        except (MergeAlignError, OSError):  # e.g. a hub model neither cached nor reachable: not known here
            found[step.id] = None
            continue
        from tasks.steps import Pins

        key = kind.key(step, inputs, pins or Pins())
        found[step.id] = store.lookup(kind.name, key, "none")
    return found
