"""The merge engine as a package: config schema (config), per-tensor parameters (params), inputs (inputs),
planning (plan), reading (reader), the streaming engine (engine) and the model files it writes (model_files).

    from mergealign.merge import run_merge
    summary = run_merge("merge.yaml", "out/")
"""

from mergealign.merge.engine import MergeSummary, Observer, execute, run_merge
from mergealign.merge.inputs import VECTOR_META, MergeInput, locate, open_inputs
from mergealign.merge.plan import ENGINE_VERSION, MergePlan, plan_merge

__all__ = [
    "ENGINE_VERSION",
    "VECTOR_META",
    "MergeInput",
    "MergePlan",
    "MergeSummary",
    "Observer",
    "execute",
    "locate",
    "open_inputs",
    "plan_merge",
    "run_merge",
]
