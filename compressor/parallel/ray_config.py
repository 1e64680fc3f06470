"""Where and how the per-rank workers of a distributed run are placed on a Ray cluster."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from compressor.config.base import StrictModel


class RayWorkersConfig(StrictModel):
    address: Optional[str] = None  # join an existing cluster ("auto", "ray://host:10001"); None = start a local one
    num_cpus: Optional[PositiveInt] = None  # local cluster only; None = all cores
    object_store_mb: PositiveInt = 500  # local cluster only
    cpus_per_worker: PositiveFloat = 1.0
    gpus_per_worker: NonNegativeFloat = 0.0  # 1 per rank on a GPU cluster
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_restarts: NonNegativeInt = 2  # group restarts after a worker failure; each resumes from the last checkpoint
    master_port: Optional[PositiveInt] = None  # torch.distributed rendezvous port; None = a free port on rank 0's node
    start_timeout_s: PositiveFloat = Field(300.0)  # placement group must be ready within this
    env: dict[str, str] = {}  # extra environment of every rank, e.g. {NCCL_SOCKET_IFNAME: eth0, NCCL_DEBUG: WARN}
