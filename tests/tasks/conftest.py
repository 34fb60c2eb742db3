"""Every task run in process: the real ``Runtime`` (its ``NetworkEngine``, the embedded digits
model, an artifact store in a temporary directory), ``LocalJob`` as the stream, the request's
options as ``adjointdpm.options`` objects. Small on purpose: digits, 2-4 steps, batch 1-2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adjointdpm import options
from adjointdpm_server.config import ServerConfig
from adjointdpm_server.runtime import Runtime
from adjointdpm_server.tasks import Checkpoint, GenerationSpec, IterationReport, LossSpec, ValidationReport

STEPS = 3


@pytest.fixture(scope="session")
def runtime(tmp_path_factory):
    rt = Runtime(ServerConfig(models=("digits",), artifact_dir=tmp_path_factory.mktemp("task-artifacts")))
    yield rt
    rt.engine.close()


@pytest.fixture
def ctx(runtime):
    return runtime.for_tenant("default")


@pytest.fixture(scope="session")
def target():
    """An image target in [0, 1] for ``mse`` (server) and its client twin."""
    return torch.from_numpy(np.random.default_rng(5).uniform(size=(1, 8, 8)).astype(np.float32))


def opts(rpc: str, **kwargs):
    """``options.TYPES[rpc]`` with groups given as dicts (``stop_when={"patience": 2}``);
    ComputeGradient's ``weights`` is always an object (unset means its defaults)."""
    groups = options.GROUPS[rpc]
    for name, value in list(kwargs.items()):
        if name in groups and isinstance(value, dict):
            kwargs[name] = groups[name](**value)
    if rpc == "ComputeGradient" and kwargs.get("weights") is None:
        kwargs["weights"] = groups["weights"]()
    return options.TYPES[rpc](**kwargs)


def noise(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(batch, 1, 8, 8)).astype(np.float32))


def gen(batch: int = 1, *, seed: int = 0, steps: int = STEPS, labels=(3,), **kw) -> GenerationSpec:
    """Digits from a given x_T (so in-process and reference runs start from the same state)."""
    return GenerationSpec(labels=list(labels), x_T=noise(batch, seed), steps=steps, **kw)


def mse(target: torch.Tensor, weight: float = 1.0) -> LossSpec:
    return LossSpec("server", "mse", weight, "image", {}, {"target": target})


def client(name: str = "mine", weight: float = 1.0) -> LossSpec:
    return LossSpec("client", name, weight, "image")


def client_mse(target: torch.Tensor, calls: list | None = None):
    """The client twin of ``mse``: per-sample mean squared error, its gradient, the per-sample
    values (float64 arithmetic, so the comparison measures the server, not this)."""
    t = target.numpy().astype(np.float64)

    def fn(x):
        if calls is not None:
            calls.append(np.array(x))
        diff = x.astype(np.float64) - t
        per = np.mean(diff.reshape(len(x), -1) ** 2, axis=1)
        return float(per.sum()), (2 * diff / diff[0].size).astype(np.float32), per
    return fn


def constant_loss(value: float = 1.0, calls: list | None = None, *, moving: bool = False):
    """A client loss that never improves: ``value`` per sample, a zero gradient, or with
    ``moving`` a random one (the iterate moves, the loss stays: the best is iteration 0)."""
    rng = np.random.default_rng(0)

    def fn(x):
        if calls is not None:
            calls.append(np.array(x))
        grad = rng.normal(size=x.shape).astype(np.float32) if moving else np.zeros_like(x)
        return value * len(x), grad, np.full(len(x), value)
    return fn


def progress(events) -> list:
    return [e for e in events if type(e).__name__ == "IterationProgress"]


def reports(events) -> list[IterationReport]:
    return [e for e in events if isinstance(e, IterationReport)]


def kinds(events) -> list[str]:
    """The events other than progress, in order, as short names (``I0``: iteration 0's report,
    ``C2``: a checkpoint at iteration 2, ``V2``: a validation after 2 iterations)."""
    out = []
    for e in events:
        if isinstance(e, IterationReport):
            out.append(f"I{e.iteration}")
        elif isinstance(e, Checkpoint):
            out.append(f"C{e.info.iteration}")
        elif isinstance(e, ValidationReport):
            out.append(f"V{e.iteration}")
    return out


def solves(events) -> list[list]:
    """Progress events cut into solves: a new solve starts where the phase's step goes back to 1
    (forward) or the phase changes."""
    out: list[list] = []
    for e in progress(events):
        if not out or e.phase != out[-1][-1].phase or e.step <= out[-1][-1].step:
            out.append([])
        out[-1].append(e)
    return out


def engine_calls(runtime) -> int:
    return sum(runtime.engine.stats.calls.values())


def is_png(data: bytes, size=(8, 8)) -> bool:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return data[:8] == b"\x89PNG\r\n\x1a\n" and img.size == size


def finite(t) -> bool:
    return bool(torch.isfinite(torch.as_tensor(t)).all())

