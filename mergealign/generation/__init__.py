"""Generation backends (vllm, transformers) behind one interface; every run in its own child process."""

from mergealign.generation.generate import GenerationSummary, generate
from mergealign.generation.settings import GenerationSettings, RuntimeSettings

__all__ = ["GenerationSettings", "GenerationSummary", "RuntimeSettings", "generate"]
