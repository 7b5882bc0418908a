"""The demo zoo: a real small trio (base, aligned, expert) built offline on a CPU from data shipped in PyPI
packages, plus the demo's evaluation data. Prefect-free; tasks/zoo.py wraps each step as a cached task.

Every step is file-in/file-out into its own output directory, atomic, deterministic given a seed, and
returns a small manifest dict (see mergealign.demo.steps).
"""

from mergealign.demo.convert import convert_smollm2
from mergealign.demo.knowledge import (
    TASK_NAME,
    build_knowledge_data,
    generate_knowledge_base,
    heldout_mc_items,
    write_lm_eval_task,
)
from mergealign.demo.packages import check_resources, ensure_demo_packages
from mergealign.demo.safety_data import (
    REFUSALS,
    build_aligned_data,
    build_safety_prompts,
    generate_benign_prompts,
    load_harmful_prompts,
)
from mergealign.demo.training import TrainConfig, check_same_tensors, train_aligned, train_expert
from mergealign.demo.zoo import build_zoo

__all__ = [
    "REFUSALS",
    "TASK_NAME",
    "TrainConfig",
    "build_aligned_data",
    "build_knowledge_data",
    "build_safety_prompts",
    "build_zoo",
    "check_resources",
    "check_same_tensors",
    "convert_smollm2",
    "ensure_demo_packages",
    "generate_benign_prompts",
    "generate_knowledge_base",
    "heldout_mc_items",
    "load_harmful_prompts",
    "train_aligned",
    "train_expert",
    "write_lm_eval_task",
]
