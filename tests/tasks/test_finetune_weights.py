"""run_finetune_weights in process: Iteration, Checkpoint and Validation events in order,
keep_checkpoints pruning, the adapter artifact, batch_size, stop_when, cancel and resume."""

import pytest
import torch

from adjointdpm_server.errors import Cancelled, NotFound
from adjointdpm_server.tasks import (Checkpoint, ExampleSpec, GenerationSpec, LocalJob,
                                     ValidationReport, run_finetune_weights, run_sample)

from .conftest import client, client_mse, constant_loss, finite, is_png, kinds, mse, opts, reports

EXAMPLES = [ExampleSpec(seed=0, label=1), ExampleSpec(seed=1, label=7)]


def test_events_in_order_checkpoints_pruned_and_the_adapter_samples_the_result(ctx, target):
    spec = GenerationSpec(steps=3)
    job = LocalJob()
    result = run_finetune_weights(ctx, spec, EXAMPLES, [mse(target)], job, opts(
        "FinetuneWeights", lr=0.05, iterations=3, lora_rank=2, checkpoint_every=1, keep_checkpoints=1,
        validate_every=2, name="style"), validation=[ExampleSpec(seed=9, label=4)])
    # checkpoints after iterations 1 and 2 (none at the end: the adapter is the end), validation
    # every 2 iterations and after the last
    assert kinds(job.events) == ["I0", "C1", "I1", "C2", "V2", "I2", "V3"]

    its = reports(job.events)
    assert [r.loss for r in its] == result.history and len(result.history) == 3
    assert all(r.lr == pytest.approx(0.05) and r.grad_norm > 0 and len(r.sample_losses) == 2 for r in its)
    assert [p.iteration for p in job.events if type(p).__name__ == "IterationProgress"
            and p.phase == "backward"] == [0] * 3 + [1] * 3 + [2] * 3

    first, second = [e.info for e in job.events if isinstance(e, Checkpoint)]
    assert first.kind == second.kind == "checkpoint" and (first.iteration, second.iteration) == (1, 2)
    with pytest.raises(NotFound):  # keep_checkpoints 1: the older one is gone
        ctx.artifacts.info(first.id)
    state, info = ctx.artifacts.load(second.id)
    assert info.metadata["history"] == result.history[:2]
    assert any(k.startswith("__optim__/") for k in state) and any("lora_B" in k for k in state)

    validations = [e for e in job.events if isinstance(e, ValidationReport)]
    for v in validations:
        assert finite(v.loss) and 0 <= v.agreement <= 1 and len(v.images) == 1 and is_png(v.images[0])
    assert validations[0].best  # the first validation is the best so far

    adapter = result.artifact
    assert adapter.kind == "lora" and adapter.model == "digits" and adapter.name == "style"
    assert adapter.metadata["rank"] == 2 and adapter.iteration == 3 and result.best_iteration == [3]
    weights, _ = ctx.artifacts.load(adapter.id)
    assert all("lora_" in k for k in weights) and max(float(w.abs().max()) for k, w in weights.items()
                                                      if "lora_B" in k) > 0  # trained
    assert result.x0.shape == (2, 1, 8, 8) and finite(result.x0) and result.iterations_run == 3
    assert len(result.images) == len(result.initial_images) == 2
    base = run_sample(ctx, GenerationSpec(labels=[1, 7], x_T=result.x_T, steps=3), LocalJob(),
                      opts("Sample", images=False))
    tuned = run_sample(ctx, GenerationSpec(labels=[1, 7], x_T=result.x_T, steps=3, adapter=adapter.id),
                       LocalJob(), opts("Sample", images=False))
    torch.testing.assert_close(tuned.x0, result.x0, rtol=1e-5, atol=1e-5)  # the saved adapter's sample
    assert float((tuned.x0 - base.x0).abs().max()) > 1e-4  # and not the base model's


def test_batch_size_and_stop_when_patience(ctx):
    calls = []
    job = LocalJob({"mine": constant_loss(1.0, calls)})
    result = run_finetune_weights(ctx, GenerationSpec(steps=2), EXAMPLES, [client()], job, opts(
        "FinetuneWeights", iterations=10, batch_size=1, stop_when={"patience": 1}))
    assert [c.shape for c in calls] == [(1, 1, 8, 8)] * 2  # one example an iteration
    assert result.iterations_run == 2 and kinds(job.events) == ["I0", "I1"]
    assert result.artifact.iteration == 2


def test_cancel_writes_a_checkpoint_that_resumes(ctx, target):
    examples = EXAMPLES[:1]
    job = LocalJob()
    seen, again = [], []
    mine = client_mse(target, seen)

    def cancelling(x):
        if len(reports(job.events)) == 1:  # in iteration 1
            job.cancelled.set()
        return mine(x)

    job.client_losses["mine"] = cancelling
    options = dict(lr=0.05, iterations=3, lora_rank=2)
    with pytest.raises(Cancelled):
        run_finetune_weights(ctx, GenerationSpec(steps=2), examples, [client()], job,
                             opts("FinetuneWeights", **options))
    assert kinds(job.events) == ["I0", "C1"]  # durable: the iteration done is kept
    checkpoint = job.events[-1].info
    assert ctx.artifacts.info(checkpoint.id).iteration == 1

    resumed = LocalJob({"mine": client_mse(target, again)})
    result = run_finetune_weights(ctx, GenerationSpec(steps=2), examples, [client()], resumed,
                                  opts("FinetuneWeights", resume_from=checkpoint.id, **options))
    assert kinds(resumed.events) == ["I1", "I2"]
    assert len(result.history) == 3 and result.history[0] == reports(job.events)[0].loss
    # iteration 1 resumed sees what iteration 1 saw before the cancel: the checkpoint's weights
    assert len(seen) == 2 and len(again) == 2
    assert abs(seen[1] - seen[0]).max() > 1e-5  # (one Adam step changed the sample)
    assert abs(again[0] - seen[1]).max() < 1e-5
