"""A study: its run config (schema, loading) and its plan (every step, Prefect-free)."""

from mergealign.study.config import RunConfig
from mergealign.study.load import check_inputs, coerce_config, load_config, parse_config
from mergealign.study.plan import Step, StudyPlan, plan_study
from mergealign.study.refs import ModelRef

__all__ = ["ModelRef", "RunConfig", "Step", "StudyPlan", "check_inputs", "coerce_config", "load_config",
           "parse_config", "plan_study"]  # fmt: skip
