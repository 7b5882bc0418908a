"""Shared test helpers, imported by package name (`from tests.helpers.models import make_trio`):

- models: every tiny real checkpoint (trios, chat models, the trained guard judge), through
  mergealign.zoo_tiny's builder; state dicts and bf16 ulp distances.
- reference: plain reference formulas of the merge methods.
- merge_configs: the merge config of a trio, as the merge tests write it.
- study: run-config writers, the environment of subprocesses, state tables of a study run.
- evaluation: reference computations with plain transformers, prompt rows, jsonl files.
"""
