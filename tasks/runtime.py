"""What a running step uses from Prefect: its logger, the GPU concurrency slot, the HF token."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from tasks.context import StepContext

log = logging.getLogger(__name__)


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a run (unit tests calling .fn)
        return log


@contextlib.contextmanager
def gpu_slot(ctx: StepContext) -> Iterator[None]:
    """Hold a slot of the global concurrency limit `ctx.gpu_slot` while a GPU step runs, if that limit exists.

    Without a limit on the server (CPU-only local runs) the step runs unguarded, and says so.
    """
    logger = run_logger()
    name = ctx.gpu_slot
    if not name:
        yield
        return
    if not _limit_exists(name):
        logger.info("no global concurrency limit %r on the Prefect server: running without a GPU slot "
                    "(create one with `prefect gcl create %s --limit 1`)", name, name)  # fmt: skip
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(name, occupy=1, strict=False):
        yield


def _limit_exists(name: str) -> bool:
    try:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(name)
                return True
            except ObjectNotFound:
                return False
    except Exception as exc:
        log.debug("could not read concurrency limit %s: %s", name, exc)
        return False


def hf_token(ctx: StepContext) -> str | None:
    """The HF token: from the Prefect Secret block named in the config, else HF_TOKEN. Never logged."""
    if ctx.hf_token_secret:
        from prefect.blocks.system import Secret

        return Secret.load(ctx.hf_token_secret).get()
    from mergealign.hub import token_from_env

    return token_from_env()
