"""What the server keeps resident: the models, the engine that runs their network calls, the
artifact store, each model's bank of LoRA adapters and copies of fully fine-tuned models.

The gRPC layer hands this to tasks (it is their ``TaskContext``); tasks never modify a resident
model (LoRA adapters live in a bank beside it, full fine-tunes in copies, docs/design.md §5, "Many adapters").
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from .cluster import coordination, default_replica
from .config import ServerConfig
from .engine import NetworkEngine
from .errors import FailedPrecondition, InvalidArgument, NotFound
from .models import AdapterBank, AdapterSpec, ModelBackend, check_precision, load_model
from .models._adapters import fresh_lora, load_adapter
from .storage.artifacts import ArtifactStore

__all__ = ["Runtime", "model_name"]

log = logging.getLogger("adjointdpm.storage")


def model_name(spec: str) -> tuple[str, str]:
    """``name=spec`` or ``spec`` → (name, spec); a diffusers directory is named after itself."""
    name, eq, rest = spec.partition("=")
    if eq:
        return name, rest
    kind, _, arg = spec.partition(":")
    return (Path(arg).name or kind) if kind == "diffusers" and arg else kind, spec


class Runtime:
    def __init__(self, config: ServerConfig, models: dict[str, ModelBackend] | None = None,
                 full_copies: int = 4):
        self.config = config
        if models is None:
            dtype = getattr(torch, config.dtype)
            check_precision(config.device, dtype)  # refused at start, not at the first request
            models = {}
            for spec in config.models:
                name, spec = model_name(spec)
                models[name] = load_model(spec, device=config.device, dtype=dtype)
        if not models:
            raise ValueError("the server needs at least one model")
        self.models = dict(models)
        self.default_model = next(iter(self.models))
        mib = lambda v: None if v is None else int(v * 2**20)  # noqa: E731
        self.cluster = coordination(config.coordination, config.replica_id or default_replica(),
                                    config.lease_s)
        self.artifacts = ArtifactStore(config.artifact_store or config.artifact_dir,
                                       quota_bytes=mib(config.artifact_storage_mib),
                                       tenant_quota_bytes=mib(config.tenant_storage_mib),
                                       retention_s=config.artifact_retention_s, cluster=self.cluster)
        if self.artifacts.removed_orphans:
            log.info("artifact store %s: swept %d orphans of dead writers: %s", self.artifacts.blobs.url,
                     len(self.artifacts.removed_orphans), ", ".join(self.artifacts.removed_orphans))
        self.settings = config.loss_settings()
        self.limits = dataclasses.replace(config.limits, working_dtype=config.dtype)
        self.engine = NetworkEngine(max_batch=config.max_network_batch,
                                    window_ms=config.batch_window_ms,
                                    weights=dict(config.tenant_weights),
                                    chunk_rows=config.engine_chunk_rows,
                                    share_from=_share_from(config.device))
        budget = int(_bank_mib(config) * 2**20)
        self.banks = {name: AdapterBank(backend.eps_fn, budget, mixed=config.multi_adapter_batching)
                      for name, backend in self.models.items()}
        self._full: OrderedDict[tuple[str, str], torch.nn.Module] = OrderedDict()
        self._full_copies = full_copies  # whole networks: a few, apart from the bank
        self._lock = threading.Lock()

    def model(self, name: str = "") -> tuple[str, ModelBackend]:
        name = name or self.default_model
        backend = self.models.get(name)
        if backend is None:
            raise NotFound(f"no model {name!r} on this server; it serves {', '.join(self.models)}")
        return name, backend

    def for_tenant(self, tenant: str) -> "TenantContext":
        """What one tenant's tasks see: its own artifacts only (all of them with
        ``--shared-artifacts``), everything else shared."""
        return TenantContext(self, tenant)

    def adapted(self, model: str, adapter_id: str, artifacts=None) -> torch.nn.Module:
        """The resident ``eps_fn`` of ``model`` with the adapter applied — a view of the model's
        adapter bank for LoRA (``""``: the base, which shares calls with them), a cached copy
        for a full fine-tune; the adapter is looked up in ``artifacts`` (a tenant's view)."""
        bank = self.banks[model]
        if not adapter_id:
            return bank.base_view
        info = (artifacts or self.artifacts).info(adapter_id)  # NOT_FOUND before any cache hit
        if info.kind not in ("lora", "full", "checkpoint"):
            raise InvalidArgument(f"artifact {adapter_id} is a {info.kind}, not an adapter")
        if info.model != model:
            raise FailedPrecondition(f"adapter {adapter_id} was trained on model {info.model!r}, "
                                     f"not {model!r}")
        meta = info.metadata
        if meta.get("method", info.kind) == "lora":
            try:
                return bank.view(adapter_id, lambda: self._lora_state(model, adapter_id, meta))
            except ValueError as err:
                raise FailedPrecondition(f"adapter {adapter_id}: {err}") from err
        return self._full_copy(model, adapter_id)

    def forget(self, artifact_id: str) -> None:
        """A deleted artifact leaves the banks and the full copies (no later request can name it:
        lookups go to the store first)."""
        for bank in self.banks.values():
            bank.forget(artifact_id)
        with self._lock:
            for key in [k for k in self._full if k[1] == artifact_id]:
                del self._full[key]

    def new_lora(self, model: str, rank: int, alpha: float | None, targets) -> torch.nn.Module:
        """A fresh trainable LoRA adapter on ``model`` (B = 0: it starts equal to the base), a row
        of the model's bank like any adapter: its calls batch with other requests'."""
        backend = self.models[model]
        state = fresh_lora(backend.eps_fn, rank, alpha, targets)
        return self.banks[model].trainable(state, AdapterSpec(rank, alpha, tuple(targets)))

    def _lora_state(self, model: str, adapter_id: str, meta: dict):
        state, _ = self.artifacts.load(adapter_id, device=self.models[model].device)
        state = {k: v for k, v in state.items() if not k.startswith("__optim__/")}  # checkpoints
        alpha = meta.get("alpha")
        spec = AdapterSpec(int(meta.get("rank", 0)), None if alpha is None else float(alpha),
                           tuple(meta.get("targets", ())))
        if spec.rank < 1 or not spec.targets:
            raise ValueError("its metadata names no LoRA rank or target modules")
        return state, spec

    def _full_copy(self, model: str, adapter_id: str) -> torch.nn.Module:
        with self._lock:
            if (model, adapter_id) in self._full:
                self._full.move_to_end((model, adapter_id))
                return self._full[model, adapter_id]
        backend = self.models[model]
        state, info = self.artifacts.load(adapter_id, device=backend.device)
        state = {k: v for k, v in state.items() if not k.startswith("__optim__/")}  # checkpoints
        try:
            eps = load_adapter(backend.eps_fn, "full", state)
        except ValueError as err:
            raise FailedPrecondition(f"adapter {adapter_id}: {err}") from err
        with self._lock:
            self._full[model, adapter_id] = eps
            while len(self._full) > self._full_copies:
                self._full.popitem(last=False)
        return eps


def _bank_mib(config: ServerConfig) -> float:
    """``--adapter-cache-mib``, else 1 GiB on a CPU and a tenth of an accelerator's memory."""
    if config.adapter_cache_mib is not None:
        return max(0.0, config.adapter_cache_mib)
    if config.device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device(config.device)).total_memory / 10 / 2**20
    return 1024.0


def _share_from(device: str) -> int:
    """Gradient jobs from which ``auto`` recomputes to batch rather than keeping graphs: 2 on an
    accelerator (one device does everything); on a CPU, kept graphs' backward passes run in the
    jobs' threads on the other cores, so batching pays only beyond that parallelism: from
    2 × torch's threads + 1 (docs/design.md §5)."""
    return 2 * torch.get_num_threads() + 1 if device == "cpu" else 2


class TenantContext:
    """A ``TaskContext`` for one tenant: the runtime's models, engine, limits and settings, and
    the artifact store scoped to the tenant."""

    def __init__(self, runtime: Runtime, tenant: str):
        self.runtime, self.tenant = runtime, tenant
        self.limits, self.settings, self.engine = runtime.limits, runtime.settings, runtime.engine
        self.cluster = runtime.cluster
        self.artifacts = runtime.artifacts.scoped(None if runtime.config.shared_artifacts else tenant)

    def model(self, name: str = ""):
        return self.runtime.model(name)

    def adapted(self, model: str, adapter_id: str):
        return self.runtime.adapted(model, adapter_id, self.artifacts)

    def new_lora(self, model: str, rank: int, alpha: float | None, targets):
        return self.runtime.new_lora(model, rank, alpha, targets)
