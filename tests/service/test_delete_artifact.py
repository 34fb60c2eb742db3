"""DeleteArtifact over the wire: a tenant deletes its own artifacts (the quota freed, the adapter
gone from the bank, later lookups NOT_FOUND), never another tenant's (NOT_FOUND, the artifact
intact); the sync and asyncio SDKs and the CLI."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

import adjointdpm
import adjointdpm.aio
from adjointdpm.cli import main
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.models._adapters import trainable_state, with_lora
from adjointdpm_server.wire import build_server

LIMITS = Limits(max_batch=16, max_steps=100, max_iterations=20, client_loss_timeout_s=20)


@pytest.fixture
def srv(tmp_path):
    server = build_server(ServerConfig(models=("digits",), port=0, artifact_dir=tmp_path / "artifacts",
                                       limits=LIMITS, tokens=("alice:tok-a", "bob:tok-b")))
    yield server
    server.stop(0)


def _adapter(rt, tenant: str, seed: int = 0) -> str:
    backend = rt.models["digits"]
    copy = with_lora(backend.eps_fn, 2, None, backend.lora_targets, init_lora_weights=False)
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in trainable_state(copy).items()}
    return rt.artifacts.save("lora", state, model="digits", tenant=tenant, metadata={
        "method": "lora", "rank": 2, "alpha": None, "targets": list(backend.lora_targets)}).id


def _client(srv, token):
    return adjointdpm.Client(f"127.0.0.1:{srv.port}", token=token, timeout=120)


def _code(fn) -> str:
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        fn()
    return err.value.code.name


def test_a_tenant_deletes_its_own_adapter_and_it_is_gone_everywhere(srv):
    rt = srv.runtime
    adapter = _adapter(rt, "alice")
    with _client(srv, "tok-a") as a:
        a.sample(labels=1, seed=0, steps=2, adapter=adapter, images=False, progress=False)
        bank = rt.banks["digits"]
        assert bank.resident == 1 and rt.artifacts.usage("alice") > 0
        info = a.delete_artifact(adapter)
        assert (info.id, info.kind, info.model) == (adapter, "lora", "digits") and info.size > 0
        assert rt.artifacts.usage("alice") == 0  # the quota is freed
        assert bank.resident == 0 and adapter not in bank._entries
        assert _code(lambda: a.sample(labels=1, seed=0, steps=2, adapter=adapter, progress=False)) == "NOT_FOUND"
        assert _code(lambda: a.download_artifact(adapter)) == "NOT_FOUND"
        assert _code(lambda: a.delete_artifact(adapter)) == "NOT_FOUND"  # twice: gone
        assert not [x for m in a.list_models() for x in m["adapters"] if x["id"] == adapter]


def test_another_tenants_artifact_is_not_found_and_stays(srv):
    rt = srv.runtime
    adapter = _adapter(rt, "alice")
    with _client(srv, "tok-a") as a, _client(srv, "tok-b") as b:
        a.sample(labels=1, seed=0, steps=2, adapter=adapter, images=False, progress=False)
        assert _code(lambda: b.delete_artifact(adapter)) == "NOT_FOUND"
        assert rt.artifacts.info(adapter).tenant == "alice" and rt.banks["digits"].resident == 1
        a.sample(labels=1, seed=0, steps=2, adapter=adapter, images=False, progress=False)
        assert _code(lambda: b.delete_artifact("not-an-id")) == "INVALID_ARGUMENT"
        assert _code(lambda: b.delete_artifact("../" + adapter)) == "INVALID_ARGUMENT"


def test_an_adapter_in_use_leaves_the_bank_when_its_request_ends(srv):
    rt = srv.runtime
    adapter = _adapter(rt, "alice")
    bank = rt.banks["digits"]
    with _client(srv, "tok-a") as a:
        call = a.sample(labels=1, seed=0, steps=60, adapter=adapter, images=False, stream=True)
        steps = 0
        for event in call:
            steps += event.WhichOneof("kind") == "progress"
            if steps == 2:
                a.delete_artifact(adapter)  # while the Sample runs on it
                assert adapter not in bank._entries and bank.resident == 1  # still in use
        assert call.result.x0.shape[0] == 1  # the Sample finished on the adapter it had loaded
        a.sample(labels=1, seed=0, steps=2, images=False, progress=False)
        bank.release_unused()
        assert bank.resident == 0


def test_the_asyncio_client_and_the_cli_delete(srv, tmp_path, capsys):
    rt = srv.runtime
    first, second = _adapter(rt, "alice", 1), _adapter(rt, "alice", 2)

    async def delete():
        async with adjointdpm.aio.Client(f"127.0.0.1:{srv.port}", token="tok-a", timeout=60) as client:
            return await client.delete_artifact(first)

    assert asyncio.run(delete()).id == first
    target = ["--target", f"127.0.0.1:{srv.port}", "--token", "tok-a"]
    assert main([*target, "delete-artifact", second]) == 0
    assert f"deleted {second} (lora" in capsys.readouterr().out
    assert main([*target, "delete-artifact", second]) == 1  # NOT_FOUND: a service error
    assert rt.artifacts.usage("alice") == 0


def test_a_resumed_run_prunes_the_checkpoints_its_stopped_run_left(srv):
    """The run id is in each checkpoint (in the store), so whichever process resumes the run
    keeps only its newest ``keep_checkpoints``: a stopped run's leftovers go too."""
    store = srv.runtime.artifacts
    loss = adjointdpm.ServerLoss("classifier", {"label": 3})
    examples = [{"seed": k, "label": k} for k in range(2)]
    with _client(srv, "tok-a") as a:
        call = a.finetune_weights(loss, examples, iterations=12, steps=2, lora_rank=2, checkpoint_every=1,
                                  keep_checkpoints=6, stream=True)
        done = 0
        for event in call:
            done += event.WhichOneof("kind") == "iteration"
            if done == 4:
                call.cancel()
                break
        deadline = time.time() + 30
        while time.time() < deadline and len(store.list(kind="checkpoint", tenant="alice")) < 4:
            time.sleep(0.1)
        time.sleep(1.0)  # the stopped run's last checkpoint
        left = store.list(kind="checkpoint", tenant="alice")
        assert len(left) >= 4 and len({i.metadata["run"] for i in left}) == 1
        newest = max(left, key=lambda i: i.iteration)
        other = _adapter(srv.runtime, "alice")  # not a checkpoint of the run: never pruned
        result = a.finetune_weights(loss, examples, iterations=newest.iteration + 2, steps=2, lora_rank=2,
                                    checkpoint_every=1, keep_checkpoints=2, resume_from=newest.id)
        after = store.list(kind="checkpoint", tenant="alice")
        assert len(after) == 2 and {i.metadata["run"] for i in after} == {newest.metadata["run"]}
        assert max(i.iteration for i in after) == newest.iteration + 1  # the last one is the adapter
        assert result.artifact.kind == "lora" and store.info(other).id == other
