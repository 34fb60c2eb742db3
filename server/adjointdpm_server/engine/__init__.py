"""The per-device engine that schedules network calls, not jobs (continuous batching).

Tasks call their model through :meth:`NetworkEngine.network`; concurrent jobs' calls on the same
network and dtype are concatenated along the batch, run as one call, and split back — forward
calls and the VJP calls of backward passes alike. See docs/design.md §5.
"""

from ._engine import EngineStats, NetworkEngine
from ._network import EngineNetwork

__all__ = ["NetworkEngine", "EngineNetwork", "EngineStats"]
