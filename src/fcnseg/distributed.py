"""What a distributed job needs beyond Lightning: its failures in one line (a collective that timed out or lost its
peer, because a rank died, diverged or was slower than the strategy's timeout, becomes an ``FcnsegError`` that says
what happened and what to do), and joining the ranks Hydra's submitit launcher started."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch.distributed as dist

from fcnseg.errors import FcnsegError, one_line

# What gloo says when a peer never answers or went away (NCCL's watchdog raises DistBackendError, a DistError).
_COLLECTIVE_FAILURES = ("Timed out waiting", "timeout caused pair closure", "Connection closed by peer", "Connection reset by peer",
                        "Connection refused", "Socket Timeout", "gloo")


class CollectiveError(FcnsegError):
    """A collective call across the training processes failed or timed out."""


def is_collective_failure(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _COLLECTIVE_FAILURES)


@contextlib.contextmanager
def collective_failures_as_one_line(rank: int, world: int, timeout_s: float | None, resume: str) -> Iterator[None]:
    """Turns a failed collective inside the block into a :class:`CollectiveError` naming the rank, the likely
    causes, the setting to raise (``trainer.strategy.timeout.seconds``) and ``resume``, the command that resumes."""
    try:
        yield
    except Exception as exc:
        if not is_collective_failure(exc):
            raise
        limit = f"; timeout {timeout_s:g} s" if timeout_s else ""
        raise CollectiveError(
            f"rank {rank} of {world}: a collective call across the training processes failed "
            f"({one_line(exc, 120)}{limit}); another rank died, did not start, diverged or was slower than "
            f"trainer.strategy.timeout.seconds: see the other ranks' lines, raise that timeout if a rank is "
            f"legitimately slow (slow checkpoint storage, a long first step), then resume with: {resume}"
        ) from None


def join_submitit_job() -> None:
    """Lets Lightning join the processes Hydra's submitit launcher started for one job of a sweep.

    On SLURM (``hydra/launcher=submitit_slurm``) Lightning reads the ``SLURM_*`` variables itself. Submitit's local
    executor (``submitit_local``) sets only its own, so they are exported as the ``env://`` variables Lightning
    joins (``MASTER_ADDR``/``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``NODE_RANK``); its tasks
    share this machine, so the master is the loopback address.
    """
    if "SUBMITIT_LOCAL_JOB_ID" not in os.environ or int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) < 2:
        return
    from submitit.helpers import TorchDistributedEnvironment

    job = TorchDistributedEnvironment()
    job.master_addr = "127.0.0.1"
    job.export(set_cuda_visible_devices=False, overwrite=True)  # Lightning maps LOCAL_RANK to a device itself
    os.environ["NODE_RANK"] = os.environ.get("SUBMITIT_LOCAL_NODEID", "0")
    # Lightning read the rank from the environment when it was imported, before these existed: without this, every
    # task would take itself for rank 0 until fit starts (and open the MLflow run, write the run's files)
    from lightning.pytorch.utilities import rank_zero_only

    rank_zero_only.rank = job.rank
