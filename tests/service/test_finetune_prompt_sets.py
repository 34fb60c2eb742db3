"""FinetuneWeights over a prompt set (``conditions``): every iteration draws its batch of
conditions by weight, each with a fresh noise, from a stream seeded by (seed, iteration) — the same
on every run and on a resume — and ``micro_batch`` accumulates an iteration's gradient over
sampler passes. The reward case: the digits model's labels as the prompt set, its classifier as
the reward, a held-out validation set scored as the run goes."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_safetensors

import adjointdpm
from adjointdpm import _requests, options
from adjointdpm.cli import _condition, main
from adjointdpm.v1 import adjointdpm_pb2 as pb
from adjointdpm.v1 import adjointdpm_pb2_grpc as pb_grpc
from adjointdpm_server.errors import InvalidArgument
from adjointdpm_server.tasks import (ConditionSpec, GenerationSpec, LocalJob, LossSpec,
                                     run_finetune_weights, run_sample)
from adjointdpm_server.tasks.finetune_weights import draw_conditions
from adjointdpm_server.wire import convert

TO_EIGHT = adjointdpm.ServerLoss("classifier", {"label": 8})  # the reward: look like an 8
CONDITIONS = [1, (3, 2.0), {"label": 7, "weight": 1.0}]       # labels, drawn 1 : 2 : 1
RUN = dict(steps=3, iterations=3, lr=0.05, batch_size=3, seed=5, lora_rank=2)


def _adapter(client, artifact_id: str) -> dict[str, np.ndarray]:
    _, data = client.download_artifact(artifact_id)
    return load_safetensors(data)


def _same_adapter(a: dict, b: dict, *, exact: bool = True) -> bool:
    """Bit for bit, or (``exact=False``) to float32 rounding of the accumulated gradient: every
    weight within 1e-4 of how far training moved the weights at most."""
    if a.keys() != b.keys():
        return False
    if exact:
        return all(np.array_equal(a[k], b[k]) for k in a)
    scale = max(float(np.abs(v).max()) for v in a.values())
    return all(np.allclose(a[k], b[k], rtol=0, atol=1e-4 * scale) for k in a)


def _finetune(client, events=None, **kwargs):
    """A prompt-set fine-tune through the SDK (``events``: a list collecting every event)."""
    conditions = kwargs.pop("conditions", CONDITIONS)
    return client.finetune_weights(TO_EIGHT, [], conditions=conditions,
                                   on_event=None if events is None else events.append,
                                   **{**RUN, **kwargs})


# ---- (a) reproducible: the stream is the seed's ------------------------------------------------

def test_the_same_seed_trains_the_same_adapter_and_another_seed_does_not(client):
    first, again = _finetune(client), _finetune(client)
    assert len(first.history) == 3 and all(math.isfinite(v) for v in first.history)
    assert first.history == again.history  # bit for bit
    assert [i.sample_losses for i in first.iterations] == [i.sample_losses for i in again.iterations]
    assert _same_adapter(_adapter(client, first.artifact.id), _adapter(client, again.artifact.id))
    np.testing.assert_array_equal(first.x_T, again.x_T)  # the result's batch: seeded too

    other = _finetune(client, seed=6)
    assert other.history != first.history
    assert not _same_adapter(_adapter(client, first.artifact.id), _adapter(client, other.artifact.id),
                             exact=False)
    # what a resume must repeat is on the adapter too
    meta = first.artifact.metadata
    assert meta["seed"] == "5" and meta["batch_size"] == 3 and meta["micro_batch"] == 3
    assert meta["conditions"] == again.artifact.metadata["conditions"] != ""
    reweighted = _finetune(client, iterations=1, conditions=[1, (3, 3.0), 7])
    assert reweighted.artifact.metadata["conditions"] != meta["conditions"]


# ---- (b) the batch stream: weights, seed and iteration ------------------------------------------

def test_draws_follow_the_weights_and_a_weight_of_zero_is_never_drawn():
    weights = [0.0, 1.0, 3.0, 6.0]
    counts = np.zeros(4)
    iterations, size = 200, 50
    for it in range(iterations):
        picks, noise = draw_conditions(weights, size, 1234, it, (1, 8, 8))
        assert picks.shape == (size,) and noise.shape == (size, 1, 8, 8)
        counts += np.bincount(picks.numpy(), minlength=4)
    n = iterations * size
    assert counts[0] == 0
    p = np.array(weights) / sum(weights)
    sigma = np.sqrt(p * (1 - p) / n)
    # 5 standard errors: a false alarm about once in 10⁶ runs; uniform draws miss by ~50 of them
    assert np.all(np.abs(counts / n - p) <= 5 * sigma + 1e-12), (counts / n, p)


def test_a_draw_is_a_function_of_seed_and_iteration_alone():
    shape = (1, 8, 8)
    picks, noise = draw_conditions([1.0, 1.0, 1.0], 8, 7, 3, shape)
    again_picks, again_noise = draw_conditions([1.0, 1.0, 1.0], 8, 7, 3, shape)
    assert torch.equal(picks, again_picks) and torch.equal(noise, again_noise)
    for seed, it in ((7, 4), (8, 3)):  # the next iteration, another seed: another batch
        other_picks, other_noise = draw_conditions([1.0, 1.0, 1.0], 8, seed, it, shape)
        assert not torch.equal(other_noise, noise)
    assert abs(float(noise.mean())) < 0.5 and 0.7 < float(noise.std()) < 1.3  # N(0, I) noise


def _recording(calls: list):
    """A client loss with a zero gradient (the adapter never moves off the base model, so each
    iteration's images are the base model's on the drawn batch) that records what it sees."""
    def fn(x):
        calls.append(np.array(x))
        return 0.0, np.zeros_like(x), np.zeros(len(x))
    return fn


def test_each_iteration_samples_exactly_the_drawn_conditions_and_noises(rt):
    ctx = rt.for_tenant("default")
    conditions = [ConditionSpec(label=1, weight=0.0), ConditionSpec(label=3, weight=1.0),
                  ConditionSpec(label=7, weight=3.0)]
    calls: list = []
    job = LocalJob({"mine": _recording(calls)})
    opts = options.TYPES["FinetuneWeights"](iterations=3, batch_size=4, micro_batch=2, seed=11,
                                            lora_rank=2)
    result = run_finetune_weights(ctx, GenerationSpec(steps=3), [], [LossSpec("client", "mine")],
                                  job, opts, conditions=conditions)
    assert result.iterations_run == 3 and [len(c) for c in calls] == [2] * 6  # 2 passes of 2 each
    backend = rt.models["digits"]
    for it in range(3):
        picks, noise = draw_conditions([0.0, 1.0, 3.0], 4, 11, it, backend.latent_shape)
        labels = [[1, 3, 7][k] for k in picks.tolist()]
        assert 1 not in labels
        base = run_sample(ctx, GenerationSpec(labels=labels, x_T=noise, steps=3), LocalJob(),
                          options.TYPES["Sample"](images=False))
        seen = np.concatenate(calls[2 * it:2 * it + 2])
        np.testing.assert_allclose(seen, backend.decode(base.x0).numpy(), atol=2e-5)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A text-conditioned model (tiny Stable Diffusion from config) whose max batch, 4, is less
    than the prompt set: its prompts are encoded in two chunks, a batch runs in two passes."""
    from adjointdpm_server.config import Limits, ServerConfig
    from adjointdpm_server.runtime import Runtime
    from tests.models.tiny_sd import build_tiny_sd

    root = tmp_path_factory.mktemp("tiny-sd")
    rt = Runtime(ServerConfig(models=(f"tiny=diffusers:{build_tiny_sd(root / 'sd')}",),
                              artifact_dir=root / "artifacts", limits=Limits(max_batch=4, max_steps=50)))
    yield rt
    rt.engine.close()


def test_prompts_are_encoded_once_each_and_drawn_like_labels(tiny_sd):
    ctx = tiny_sd.for_tenant("default")
    prompts = ["a cat", "a dog", "a photo of a cat", "a painting", "a cat", "the dog in the style"]
    conditions = [ConditionSpec(prompt=p, weight=w) for p, w in zip(prompts, (1, 2, 1, 1, 3, 1))]
    calls: list = []
    opts = options.TYPES["FinetuneWeights"](iterations=2, batch_size=4, micro_batch=3, seed=3,
                                            lora_rank=2)
    result = run_finetune_weights(ctx, GenerationSpec(model="tiny", steps=2, guidance_scale=2.0), [],
                                  [LossSpec("client", "mine")], LocalJob({"mine": _recording(calls)}),
                                  opts, conditions=conditions)
    assert [len(c) for c in calls] == [3, 1, 3, 1]
    assert len(result.images) == 4  # the result: the first max-batch distinct prompts
    backend = tiny_sd.models["tiny"]
    for it in range(2):
        picks, noise = draw_conditions([1, 2, 1, 1, 3, 1], 4, 3, it, backend.latent_shape)
        drawn = [prompts[k] for k in picks.tolist()]
        base = run_sample(ctx, GenerationSpec(model="tiny", prompt=drawn, x_T=noise, steps=2,
                                              guidance_scale=2.0), LocalJob(),
                          options.TYPES["Sample"](images=False))
        with torch.no_grad():
            images = backend.decode(base.x0).numpy()
        np.testing.assert_allclose(np.concatenate(calls[2 * it:2 * it + 2]), images, atol=1e-4)


# ---- (c) a resume continues the same stream ------------------------------------------------------

def test_a_resume_from_a_mid_run_checkpoint_reproduces_the_rest_exactly(client):
    whole = _finetune(client, iterations=4, checkpoint_every=2, micro_batch=2)
    checkpoint = next(c for c in whole.checkpoints if c.iteration == 2)
    assert checkpoint.metadata["seed"] == "5" and checkpoint.metadata["micro_batch"] == 2
    resumed = _finetune(client, iterations=4, micro_batch=2, resume_from=checkpoint.id)
    assert resumed.history == whole.history  # the first two from the checkpoint, then the same
    assert [i.iteration for i in resumed.iterations] == [2, 3]
    assert [i.loss for i in resumed.iterations] == whole.history[2:]
    assert _same_adapter(_adapter(client, whole.artifact.id), _adapter(client, resumed.artifact.id))

    # micro_batch is memory, not the stream: a resume on a smaller device may split further
    smaller = _finetune(client, iterations=4, micro_batch=1, resume_from=checkpoint.id)
    np.testing.assert_allclose(smaller.history, whole.history, rtol=1e-5)
    assert smaller.history[:2] == whole.history[:2]

    for change, what in ((dict(seed=6), "seed='5', this request has '6'"),
                         (dict(batch_size=2), "batch_size=3, this request has 2"),
                         (dict(conditions=[1, (3, 2.0), (7, 2.0)]), "the prompt set")):
        with pytest.raises(adjointdpm.AdjointDPMError) as err:
            _finetune(client, **{"iterations": 4, "micro_batch": 2, "resume_from": checkpoint.id,
                                 **change})
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION, err.value.details
        assert what in err.value.details
    with pytest.raises(adjointdpm.AdjointDPMError) as err:  # examples cannot go on from it
        client.finetune_weights(TO_EIGHT, [{"seed": 0, "label": 1}], steps=3, iterations=4,
                                micro_batch=2, batch_size=3, resume_from=checkpoint.id, lora_rank=2)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "the prompt set" in err.value.details and "this request has examples" in err.value.details


# ---- (d) micro-batches accumulate to the whole batch's step --------------------------------------

def _backward_passes(events, iteration: int, steps: int = 3) -> int:
    return sum(1 for e in events if e.WhichOneof("kind") == "progress" and e.progress.phase == "backward"
               and e.progress.iteration == iteration) // steps


def test_micro_batches_give_the_unsplit_batch_s_gradient_and_weights(client):
    """SGD: a step is linear in the gradient, so the weights compare the accumulated gradients
    (Adam's first steps are ±lr whatever a gradient entry's size, its sign amplified)."""
    runs = {}
    for micro in (None, 1, 2, 3, 10):  # 10 > batch_size: a cap, the whole batch in one pass
        events: list = []
        runs[micro] = (_finetune(client, events, micro_batch=micro, grad_mode="checkpoint",
                                 optimizer="sgd", lr=0.5), events)
    whole, whole_events = runs[None]
    assert _backward_passes(whole_events, 0) == 1
    for micro, passes in ((1, 3), (2, 2), (3, 1), (10, 1)):
        result, events = runs[micro]
        assert _backward_passes(events, 0) == passes, micro
        assert result.artifact.metadata["micro_batch"] == min(micro, 3)
        if passes == 1:  # the same computation as the unsplit batch: the same numbers
            assert result.history == whole.history
            continue
        np.testing.assert_allclose(result.history, whole.history, rtol=1e-5)
        np.testing.assert_allclose([i.grad_norm for i in result.iterations],
                                   [i.grad_norm for i in whole.iterations], rtol=1e-4)
        assert [len(i.sample_losses) for i in result.iterations] == [3] * 3
        np.testing.assert_allclose([i.sample_losses for i in result.iterations],
                                   [i.sample_losses for i in whole.iterations], rtol=1e-5)
        assert _same_adapter(_adapter(client, result.artifact.id), _adapter(client, whole.artifact.id),
                             exact=False)


def test_micro_batches_accumulate_over_examples_too(client):
    examples = [{"seed": k, "label": k} for k in (1, 4, 6)]
    common = dict(steps=3, iterations=2, lr=0.5, optimizer="sgd", lora_rank=2)
    whole = client.finetune_weights(TO_EIGHT, examples, **common)
    split = client.finetune_weights(TO_EIGHT, examples, micro_batch=1, **common)
    np.testing.assert_allclose(split.history, whole.history, rtol=1e-5)
    assert _same_adapter(_adapter(client, split.artifact.id), _adapter(client, whole.artifact.id),
                         exact=False)
    assert whole.artifact.metadata["micro_batch"] == 3 and split.artifact.metadata["micro_batch"] == 1


def _forward_solves(events, iteration: int) -> int:
    return sum(1 for e in events if e.WhichOneof("kind") == "progress" and e.progress.phase == "forward"
               and e.progress.step == 1 and e.progress.iteration == iteration)


def test_a_content_term_gets_the_base_model_s_output_on_each_drawn_batch(client):
    """gram_style's content term reads the reference (it says so: ``uses_reference``): each pass
    of a drawn batch first samples the base model from the same noises. At iteration 0 the
    adapter is still the base model (LoRA B = 0), so the content term is exactly 0 there, and its
    gradient too; at iteration 1 it measures how far one step moved the images."""
    style = np.random.default_rng(0).uniform(size=(1, 8, 8)).astype(np.float32)
    runs = {}
    for weight in (0.0, 10.0):
        events: list = []
        loss = adjointdpm.ServerLoss("gram_style", {"content_weight": weight}, tensors={"style": style})
        result = client.finetune_weights(loss, [], conditions=[1, 3, 7], on_event=events.append,
                                         **{**RUN, "iterations": 2, "micro_batch": 2})
        runs[weight] = result, events
    (style_only, plain), (content, checked) = runs[0.0], runs[10.0]
    assert content.history[0] == pytest.approx(style_only.history[0], rel=1e-6, abs=1e-9)
    assert content.history[1] > style_only.history[1] + 1e-6
    for it in (0, 1):  # 2 passes a batch: 2 more forward solves with the reference
        assert _forward_solves(checked, it) == _forward_solves(plain, it) + 2


# ---- (e) the reward case, with its held-out set scored as it goes --------------------------------

def test_a_reward_fine_tune_over_labels_streams_its_validations(client):
    events: list = []
    held_out = [{"seed": 100, "label": 2}, {"seed": 101, "label": 5}]
    result = _finetune(client, events, conditions=[0, 1, 2, 3, 4, 5, 6, 7, 9], iterations=6,
                       batch_size=4, micro_batch=2, validation=held_out, validate_every=2)
    kinds = [(e.WhichOneof("kind"), getattr(e, e.WhichOneof("kind")).iteration) for e in events
             if e.WhichOneof("kind") in ("iteration", "validation")]
    assert kinds == [("iteration", 0), ("iteration", 1), ("validation", 2), ("iteration", 2),
                     ("iteration", 3), ("validation", 4), ("iteration", 4), ("iteration", 5),
                     ("validation", 6)]
    validations = result.validations
    assert [v.iteration for v in validations] == [2, 4, 6]
    for v in validations:
        assert math.isfinite(v.loss) and 0 <= v.agreement <= 1 and len(v.images) == 2
    # the reward rose on images the training never drew (the held-out seeds and labels)
    assert validations[-1].loss < validations[0].loss
    assert len(result.images) == len(result.initial_images) == 9  # the result: one per condition


# ---- (f) what is refused, before any work --------------------------------------------------------

def _refused(client, *args, **kwargs) -> str:
    events: list = []
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        client.finetune_weights(*args, on_event=events.append, **kwargs)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, err.value.details
    assert not [e for e in events if e.WhichOneof("kind") in ("progress", "job", "iteration")]
    return err.value.details


@pytest.mark.parametrize("conditions,message", [
    ([1, (3, -1.0)], "conditions[1].weight must be finite and ≥ 0"),
    ([1, (3, math.nan)], "conditions[1].weight must be finite and ≥ 0"),
    ([(1, math.inf), 3], "conditions[0].weight must be finite and ≥ 0"),
    (["3", 4], "either prompts or labels, not both"),
    ([3, 12], "class labels must lie in 0–9"),
    (["a cat"], "the digits model takes a single digit"),
])
def test_bad_conditions_are_refused(client, conditions, message):
    details = _refused(client, TO_EIGHT, [], conditions=conditions, steps=3, iterations=1)
    assert message in details


def test_examples_and_conditions_go_alone_and_batches_fit_a_pass(client):
    both = _refused(client, TO_EIGHT, [{"seed": 0, "label": 1}], conditions=[1], steps=3, iterations=1)
    assert "not both" in both
    neither = _refused(client, TO_EIGHT, [], steps=3, iterations=1)
    assert "give examples" in neither and "or conditions" in neither
    # a batch larger than a pass (the test server's max batch is 16) needs micro-batches
    big = _refused(client, TO_EIGHT, [], conditions=[1, 2], batch_size=20, steps=3, iterations=1)
    assert "micro_batch ≤ 16" in big
    too_many = _refused(client, TO_EIGHT, [], conditions=[1, 2], batch_size=300, micro_batch=4,
                        steps=3, iterations=1)
    assert "batch_size must be at most 256" in too_many


def test_a_condition_with_a_prompt_and_a_label_is_refused_on_the_wire(server):
    request = pb.FinetuneWeightsSpec(generation=pb.Generation(steps=3), optimizer=pb.Optimizer(iterations=1),
                                 conditions=[pb.WeightedCondition(prompt="3", label=3)])
    request.losses.add(server=pb.ServerLoss(name="classifier")).server.params.update({"label": 8})
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.AdjointDPMServiceStub(channel).FinetuneWeights(
                iter([pb.FinetuneWeightsRequest(spec=request)]), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "conditions[0] gives a prompt and a label" in err.value.details()


def test_on_the_wire_an_unset_weight_is_1_and_in_process_all_zero_is_refused(rt):
    limits = rt.limits
    parsed = convert.conditions([pb.WeightedCondition(label=1), pb.WeightedCondition(label=2, weight=0.5)],
                                limits)
    assert [(c.label, c.weight) for c in parsed] == [(1, 1.0), (2, 0.5)]
    with pytest.raises(InvalidArgument, match="at most 256 conditions"):
        convert.conditions([pb.WeightedCondition(label=1)] * 257, limits)
    zeros = [ConditionSpec(label=1, weight=0.0), ConditionSpec(label=2, weight=0.0)]
    with pytest.raises(InvalidArgument, match="every condition's weight is 0"):
        run_finetune_weights(rt.for_tenant("default"), GenerationSpec(steps=3), [],
                             [LossSpec("server", "classifier", params={"label": 8})], LocalJob(),
                             options.TYPES["FinetuneWeights"](iterations=1), conditions=zeros)


# ---- the SDK and the CLI --------------------------------------------------------------------------

def test_the_sdk_takes_prompts_labels_pairs_and_dicts():
    request, _ = _requests.build("finetune_weights", TO_EIGHT, None,
                                 conditions=["a cat", ("a dog", 2), {"prompt": "a cow", "weight": 0.5}],
                                 seed=9, micro_batch=2)
    assert list(request.conditions) == [pb.WeightedCondition(prompt="a cat"),
                                        pb.WeightedCondition(prompt="a dog", weight=2.0),
                                        pb.WeightedCondition(prompt="a cow", weight=0.5)]
    assert (request.seed, request.micro_batch, len(request.examples)) == (9, 2, 0)
    labels, _ = _requests.build("finetune_weights", TO_EIGHT, [], conditions=[np.int64(3), (4, 1.5)])
    assert [(c.HasField("label"), c.label, c.weight) for c in labels.conditions] == [
        (True, 3, 0.0), (True, 4, 1.5)]  # weight 0 on the wire: unset, which the server reads as 1
    refused = {"weight 0 would read as 1": [("a", 0)], "a prompt or a label": [{"prompt": "a", "label": 1}],
               r"a prompt \(str\) or a class label \(int\)": [3.5], "weight is a number": [("a", "x")]}
    for message, bad in refused.items():
        with pytest.raises(ValueError, match=message):
            _requests.build("finetune_weights", TO_EIGHT, [], conditions=bad)


def test_the_cli_fine_tunes_over_a_prompt_set(server, tmp_path, capsys):
    # an integer is a label, other text a prompt; "@W" a weight where W is a number
    assert [_condition(v) for v in ("3", "3@2", "a cat@0.5", "ratio 16:9", "me@home")] == [
        3, (3, 2.0), ("a cat", 0.5), "ratio 16:9", "me@home"]
    code = main(["--target", f"127.0.0.1:{server.port}", "finetune", "--out", str(tmp_path),
                 "--loss", "classifier", "--params", '{"label": 8}', "--condition", "1",
                 "--condition", "3@2", "--batch-size", "2", "--micro-batch", "1", "--seed", "4",
                 "--steps", "3", "--iterations", "2", "--validation", "1", "--rank", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "validation after 2 steps" in out
    artifact_id = out.strip().splitlines()[-1].split()[1]
    with adjointdpm.Client(f"127.0.0.1:{server.port}") as c:
        meta = next(a for m in c.list_models() for a in m.get("adapters", []) if a["id"] == artifact_id)
    assert meta["metadata"]["seed"] == "4" and meta["metadata"]["micro_batch"] == 1
