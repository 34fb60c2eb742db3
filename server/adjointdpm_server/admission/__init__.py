"""Who runs when: fair admission per caller (``queue``) — at most ``--max-active-jobs`` jobs
hold a slot, the rest wait in bounded per-caller queues served in weighted fair order. The
network calls of running jobs are shared by the engine (``engine/``)."""

from .queue import AdmissionQueue, Admitted, CallerLoad

__all__ = ["AdmissionQueue", "Admitted", "CallerLoad"]
