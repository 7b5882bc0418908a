"""Errors that users see: each names the file, tensor, parameter or field at fault."""


class MergeAlignError(Exception):
    """Base class for every error meant for the user (the CLI prints it and exits non-zero)."""

    exit_code = 1


class CheckpointError(MergeAlignError):
    """A checkpoint file, index or header is missing, truncated, corrupt or refused."""


class PreflightError(MergeAlignError):
    """Inputs do not fit together; lists every problem found from headers and configs."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"preflight found {len(self.problems)} problem(s):\n{lines}")


class ConfigError(MergeAlignError):
    """A config file or parameter is invalid; lists every problem with its field path."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config{where} ({len(self.problems)} problem(s)):\n{lines}")


class HubUnreachableError(MergeAlignError):
    """The hub could not be reached (network, timeout, HTTP 5xx) and no local copy helps: worth a retry,
    unlike a missing repo or revision."""
