"""Lightning's DDP with a start-up window of its own: the ranks get ``join_timeout`` to start and find each other,
and the collectives after that keep the short ``timeout`` that ends a job whose rank died or hung.

Why: ``torch.distributed`` uses one timeout for both. Lightning's launcher starts the other local ranks only when
rank 0 reaches ``fit``, so each of them still has to import torch, Lightning and MLflow and build its data and model
while rank 0 waits. On a busy or slow machine (or with nodes started one after another, or packages on network
storage) that alone outlasted the 45-s collective timeout, and the job died before its first step ("Timed out ...
waiting for clients", "The client socket has timed out ... while trying to connect"). torchrun's own rendezvous
waits up to 600 s for the same reason; under torchrun its agent has joined the ranks already, so nothing is added.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy

from fcnseg.distributed import CollectiveError
from fcnseg.errors import one_line


class RanksDidNotJoinError(CollectiveError):
    """The training processes did not all start and reach each other within the join timeout."""


class DDPStrategy(LightningDDPStrategy):
    """``lightning.pytorch.strategies.DDPStrategy`` plus ``join_timeout`` (``None``: Lightning's behaviour, one
    timeout for joining and collectives). Every other argument is Lightning's."""

    def __init__(self, *args: Any, join_timeout: timedelta | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.join_timeout = join_timeout
        self._join_store: dist.TCPStore | None = None

    def setup_distributed(self) -> None:
        if (self.join_timeout is not None and not dist.is_initialized()
                and not isinstance(self.cluster_environment, TorchElasticEnvironment)):
            self._wait_for_every_rank()
        super().setup_distributed()  # Lightning's own init_process_group, under the collective timeout

    def _wait_for_every_rank(self) -> None:
        """Global rank 0 opens the job's store (at the master address and port the process group will use) and
        waits, up to ``join_timeout``, until every rank has connected; the others retry connecting as long. The store
        is multi-tenant, so the process group's own ``env://`` rendezvous right after reuses its server and finds
        every rank there at once."""
        self.set_world_ranks()
        environment = self.cluster_environment
        rank, world = environment.global_rank(), environment.world_size()
        try:
            self._join_store = dist.TCPStore(environment.main_address, environment.main_port, world, rank == 0,
                                             timeout=self.join_timeout, wait_for_workers=True, multi_tenant=True)
        except dist.DistError as exc:
            raise RanksDidNotJoinError(
                f"rank {rank} of {world}: the training processes did not all start and reach each other within "
                f"trainer.strategy.join_timeout.seconds={self.join_timeout.total_seconds():g} "
                f"({one_line(exc, 120)}); a rank failed to start (see its lines), a node was not started, or "
                f"starting takes longer here: raise that timeout if so, then run the same command again"
            ) from None
