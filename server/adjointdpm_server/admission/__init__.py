"""Who runs when: at most ``--max-active-jobs`` jobs hold a slot, the rest wait in a bounded
queue (``queue``). The network calls of running jobs are shared by the engine (``engine/``)."""

from .queue import AdmissionQueue

__all__ = ["AdmissionQueue"]
