"""Many tenants' LoRA adapters over the wire (digits, float64): their Sample and ComputeGradient
calls share network calls with each other and with base-model requests, each result equal to the
same request run alone; a fine-tune beside eight sampling tenants trains the same adapter as
alone; the bank never serves one tenant another's adapter and refuses what it cannot hold."""

from __future__ import annotations

import contextlib
import gc
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

import adjointdpm
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.models._adapters import trainable_state, with_lora
from adjointdpm_server.wire import build_server

TENANTS = [f"t{k}" for k in range(9)]  # t0…t7 on adapters of their own, t8 on the base model
TO_EIGHT = adjointdpm.ServerLoss("classifier", params={"label": 8})
LIMITS = Limits(max_batch=16, max_steps=100, max_iterations=20, client_loss_timeout_s=20)


@contextlib.contextmanager
def _serving(tmp_path, **kw):
    """A float64 digits server with the nine tenants' tokens, stopped at the end."""
    kw.setdefault("batch_window_ms", 200.0)
    srv = build_server(ServerConfig(models=("digits",), port=0, dtype="float64", max_active_jobs=16,
                                    artifact_dir=tmp_path / "artifacts", limits=LIMITS,
                                    tokens=tuple(f"{t}:tok-{t}" for t in TENANTS), **kw))
    try:
        yield srv
    finally:
        srv.stop(0)


def _adapters(rt, tenants) -> dict[str, str]:
    """A random LoRA adapter (rank 1–7, its own alpha; one on other targets) saved for each tenant."""
    backend = rt.models["digits"]
    ids = {}
    for k, tenant in enumerate(tenants):
        targets = ("to_q", "to_v") if k == 3 else backend.lora_targets
        rank, alpha = 1 + k % 4 * 2, float(k + 1)
        copy = with_lora(backend.eps_fn, rank, alpha, targets, init_lora_weights=False)
        gen = torch.Generator().manual_seed(k)
        state = {n: torch.randn(v.shape, generator=gen, dtype=v.dtype) * 0.2
                 for n, v in trainable_state(copy).items()}
        info = rt.artifacts.save("lora", state, model="digits", tenant=tenant, metadata={
            "method": "lora", "rank": rank, "alpha": alpha, "targets": list(targets)})
        ids[tenant] = info.id
    return ids


def _client(srv, tenant):
    return adjointdpm.Client(f"127.0.0.1:{srv.port}", token=f"tok-{tenant}", timeout=300)


def _together(fns):
    """Run the fns at once (a barrier first); results in order, the first error re-raised."""
    barrier = threading.Barrier(len(fns))
    out, errors = [None] * len(fns), []

    def run(k):
        barrier.wait()
        try:
            out[k] = fns[k]()
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(fns))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(600)
    if errors:
        raise errors[0]
    return out


def test_tenants_on_eight_adapters_and_the_base_share_calls_and_equal_their_runs_alone(tmp_path):
    with _serving(tmp_path) as srv:
        ids = _adapters(srv.runtime, TENANTS[:8])

        def request(tenant, k):
            adapter = ids.get(tenant, "")
            with _client(srv, tenant) as c:
                if k % 2:
                    r = c.compute_gradient(TO_EIGHT, labels=k, seed=k, steps=4, adapter=adapter,
                                           images=False, progress=False)
                    return {"x0": r.x0, **r.gradients}
                return {"x0": c.sample(labels=k, seed=k, steps=4, adapter=adapter, images=False,
                                       progress=False).x0}

        calls = [lambda t=t, k=k: request(t, k) for k, t in enumerate(TENANTS)]
        bank = srv.runtime.banks["digits"]
        together = _together(calls)
        mixed = max(d for d, n in bank.stats.distinct.items() if n)
        alone = [call() for call in calls]
        assert mixed >= 4, dict(bank.stats.distinct)  # rows of ≥ 4 adapters in one call
        for k, (got, want) in enumerate(zip(together, alone)):
            assert got.keys() == want.keys()
            for key in want:
                assert np.abs(got[key] - want[key]).max() <= 1e-10, (TENANTS[k], key)
        base = alone[8]["x0"]
        assert all(np.abs(alone[k]["x0"] - base).max() > 1e-3 for k in (0, 2, 4, 6)), "adapters act"
        assert bank.resident == 8 and bank.stats.misses == 8 and bank.stats.evictions == 0


def _adapter_tensors(client, artifact_id) -> dict[str, torch.Tensor]:
    _, data = client.download_artifact(artifact_id)
    return load_safetensors(data)


def test_a_finetune_beside_eight_sampling_tenants_trains_the_same_adapter(tmp_path):
    with _serving(tmp_path, batch_window_ms=20.0) as srv:
        ids = _adapters(srv.runtime, TENANTS[:8])
        common = dict(examples=[{"seed": 0, "label": 0}, {"seed": 1, "label": 1}], iterations=3,
                      lr=0.05, steps=4, lora_rank=2, grad_mode="checkpoint", progress=False)
        with _client(srv, "t8") as c:
            first = _adapter_tensors(c, c.finetune_weights(TO_EIGHT, **common).artifact.id)
        done = threading.Event()

        def sampler(tenant):
            with _client(srv, tenant) as c:
                n = 0
                while not done.is_set():
                    c.sample(labels=n % 10, seed=n, steps=4, adapter=ids[tenant], images=False,
                             progress=False)
                    n += 1
                return n

        def tuner():
            try:
                with _client(srv, "t8") as c:
                    return _adapter_tensors(c, c.finetune_weights(TO_EIGHT, **common).artifact.id)
            finally:
                done.set()

        engine = srv.runtime.engine
        *counts, second = _together([lambda t=t: sampler(t) for t in TENANTS[:8]] + [tuner])
        assert min(counts) >= 1
        shared = [callers for kind, callers in engine.stats.recent
                  if kind == "forward" and "tenant:t8" in callers and len(set(callers)) > 1]
        assert shared, "the fine-tune's calls ran beside the samplers' rows"
        assert first.keys() == second.keys()
        worst = max(((first[k] - second[k]).abs().max() / first[k].abs().max()).item() for k in first)
        print(f"fine-tune beside 8 samplers vs alone: max relative difference {worst:.2e}")
        assert worst <= 1e-9  # not bitwise: its rows ran in calls of other sizes (see the docs)
        assert max(v.abs().max().item() for k, v in first.items() if "lora_B" in k) > 0, "it trained"


def test_the_bank_never_serves_one_tenant_another_tenants_adapter(tmp_path):
    with _serving(tmp_path) as srv:
        ids = _adapters(srv.runtime, ["t0"])
        with _client(srv, "t0") as a, _client(srv, "t1") as b:
            a.sample(labels=1, seed=0, steps=2, adapter=ids["t0"], images=False, progress=False)
            assert srv.runtime.banks["digits"].resident == 1  # resident now
            with pytest.raises(adjointdpm.AdjointDPMError) as err:
                b.sample(labels=1, seed=0, steps=2, adapter=ids["t0"], images=False, progress=False)
            assert err.value.code.name == "NOT_FOUND"


def test_an_adapter_the_bank_cannot_hold_is_refused_with_resource_exhausted(tmp_path):
    with _serving(tmp_path, adapter_cache_mib=0.001) as srv:
        ids = _adapters(srv.runtime, ["t0"])
        with _client(srv, "t0") as a:
            with pytest.raises(adjointdpm.AdjointDPMError) as err:
                a.sample(labels=1, seed=0, steps=2, adapter=ids["t0"], images=False, progress=False)
            assert err.value.code.name == "RESOURCE_EXHAUSTED"
            assert "adapter bank is full" in err.value.details and "--adapter-cache-mib" in err.value.details
            assert err.value.retry_after is not None
            a.sample(labels=1, seed=0, steps=2, images=False, progress=False)  # the base still serves


def _same_rank_adapters(rt, tenant: str, n: int) -> list[str]:
    """``n`` random rank-2 adapters of equal size saved for ``tenant``."""
    backend = rt.models["digits"]
    copy = with_lora(backend.eps_fn, 2, None, backend.lora_targets, init_lora_weights=False)
    shapes = {k: v.shape for k, v in trainable_state(copy).items()}
    ids = []
    for k in range(n):
        gen = torch.Generator().manual_seed(1000 + k)
        state = {name: torch.randn(shape, generator=gen, dtype=torch.float64) * 0.2
                 for name, shape in shapes.items()}
        ids.append(rt.artifacts.save("lora", state, model="digits", tenant=tenant, metadata={
            "method": "lora", "rank": 2, "alpha": None, "targets": list(backend.lora_targets)}).id)
    return ids


def test_one_tenants_adapter_churn_never_evicts_anothers_adapter_in_use(tmp_path):
    """t0 samples through a hundred adapters in a bank that holds four while t1's long Sample
    runs on its own: t1's adapter stays resident (pinned) throughout and its result is its result
    alone; the churn evicted only adapters nobody used."""
    with _serving(tmp_path, batch_window_ms=5.0) as srv:
        rt = srv.runtime
        (mine,) = _same_rank_adapters(rt, "t1", 1)
        churn = _same_rank_adapters(rt, "t0", 100)
        bank = rt.banks["digits"]
        one = sum(v.numel() * v.element_size() for v in rt.artifacts.load(mine)[0].values())
        bank.budget = 4 * one + one // 2  # four at once
        started, finished, resident = threading.Event(), threading.Event(), []

        def long_sample():
            try:
                with _client(srv, "t1") as c:
                    return c.sample(labels=5, seed=3, steps=60, adapter=mine, images=False,
                                    progress=False, on_event=lambda e: started.set()).x0
            finally:
                finished.set()

        def churner():
            started.wait(60)
            with _client(srv, "t0") as c:
                for k, adapter in enumerate(churn):
                    c.sample(labels=k % 10, seed=k, steps=1, adapter=adapter, images=False, progress=False)
                    if not finished.is_set():  # t1's Sample still runs: its adapter must be there
                        resident.append(mine in bank._entries)

        got, _ = _together([long_sample, churner])
        assert bank.stats.evictions >= 90
        assert len(resident) >= 10 and all(resident), "t1's adapter stayed while its Sample ran"
        with _client(srv, "t1") as c:
            alone = c.sample(labels=5, seed=3, steps=60, adapter=mine, images=False, progress=False).x0
        assert np.abs(got - alone).max() <= 1e-10


def test_a_cancelled_request_unpins_its_adapter(tmp_path):
    with _serving(tmp_path, batch_window_ms=5.0) as srv:
        ids = _adapters(srv.runtime, ["t0"])
        bank = srv.runtime.banks["digits"]
        with _client(srv, "t0") as c:
            call = c.sample(labels=1, seed=0, steps=100, adapter=ids["t0"], images=False, stream=True)
            steps = 0
            for event in call:
                steps += event.WhichOneof("kind") == "progress"
                if steps == 2:
                    assert bank._entries[ids["t0"]].views, "pinned while it runs"
                    call.cancel()
                    break
        deadline = time.time() + 30
        while time.time() < deadline and bank._entries[ids["t0"]].views:
            gc.collect()
            time.sleep(0.1)
        assert not bank._entries[ids["t0"]].views
        bank.budget = 0
        bank._make_room(0)  # nothing in use: everything may go
        assert bank.resident == 0 and bank.stats.evictions == 1


def _scrape(srv) -> dict[str, float]:
    """{'name{labels}': value} of the server's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_the_banks_metrics_count_what_it_did(tmp_path):
    with _serving(tmp_path, metrics_port=0) as srv:
        ids = _adapters(srv.runtime, TENANTS[:3])
        bank = srv.runtime.banks["digits"]

        def sample(tenant, adapter):
            with _client(srv, tenant) as c:
                c.sample(labels=1, seed=0, steps=2, adapter=adapter, images=False, progress=False)

        _together([lambda t=t: sample(t, ids[t]) for t in TENANTS[:3]] + [lambda: sample("t8", "")])
        sample("t0", ids["t0"])  # a hit
        one = bank._entries[ids["t0"]].nbytes
        bank.budget = 2 * one  # the next load evicts the least recent of the other two
        got = _scrape(srv)
        model = '{model="digits"}'
        assert got[f"adjointdpm_adapters_resident{model}"] == 3
        assert got[f"adjointdpm_adapter_bank_bytes{model}"] == bank.nbytes > 0
        assert got[f"adjointdpm_adapter_bank_misses_total{model}"] == 3
        assert got[f"adjointdpm_adapter_bank_hits_total{model}"] == 1
        assert got[f"adjointdpm_adapter_load_seconds_total{model}"] > 0
        calls = got[f'adjointdpm_adapter_batch_distinct_count{model}']
        assert calls == sum(bank.stats.distinct.values()) > 0
        mixed = calls - got['adjointdpm_adapter_batch_distinct_bucket{le="1.0",model="digits"}']
        assert mixed >= 1, "some call had rows of two or more adapters"
        (extra,) = _adapters(srv.runtime, ["t5"]).values()
        sample("t5", extra)
        got = _scrape(srv)
        assert got[f"adjointdpm_adapter_bank_evictions_total{model}"] >= 1
        assert got[f"adjointdpm_adapter_bank_budget_bytes{model}"] == 2 * one
        assert got[f"adjointdpm_adapter_mixed_fallbacks_total{model}"] == 0
