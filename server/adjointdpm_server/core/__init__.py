"""The AdjointDPM numerical library: pure math, no gRPC (docs/design.md §2, §4).

    from adjointdpm_server.core import VPSchedule, sample
    x0 = sample(eps_fn, x_T, cond, schedule=VPSchedule.linear(), steps=20)
    x0 = sample(velocity_fn, x_T, cond, schedule=FlowSchedule.rectified(shift=3.0), steps=20,
                prediction="velocity")    # a flow-matching model (SD3/FLUX-type)
    loss(x0).backward()          # exact gradient of the sampler, memory flat in steps
"""

from ._baseline import sample_torchdiffeq
from ._blocks import (BlockCheckpointing, blocks_checkpointed, checkpointed_blocks,
                      enable_block_checkpointing, recomputed_in)
from ._calls import network_call_scope
from ._field import HALF_DTYPES, GuidedEps, NetworkVJP, Node, SharedRows
from ._grids import GRIDS, time_grid
from ._memory import MemoryPlan, default_budget
from ._oracle import GaussianMixture, gaussian_solution
from ._sample import GRAD_MODES, Progress, sample
from ._flow_schedule import FlowSchedule
from ._prediction import PREDICTIONS
from ._schedule import VPSchedule
from ._solvers import SOLVERS, get_solver

__all__ = [
    "HALF_DTYPES",
    "VPSchedule",
    "FlowSchedule",
    "PREDICTIONS",
    "sample",
    "sample_torchdiffeq",
    "Progress",
    "GaussianMixture",
    "gaussian_solution",
    "time_grid",
    "get_solver",
    "GuidedEps",
    "Node",
    "NetworkVJP",
    "SharedRows",
    "SOLVERS",
    "GRAD_MODES",
    "GRIDS",
    "default_budget",
    "MemoryPlan",
    "BlockCheckpointing",
    "blocks_checkpointed",
    "checkpointed_blocks",
    "enable_block_checkpointing",
    "recomputed_in",
    "network_call_scope",
]
