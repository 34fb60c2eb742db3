"""Reward losses score each sample against its own condition (``LossContext.condition_kind`` /
``conditions``, ``Objective.set_conditions``): ``preference`` (and ``clip_similarity``) without a
prompt use each sample's generation prompt, ``classifier`` without a label each sample's class.

- ComputeGradient: the default equals the explicit per-sample prompt or label, value and gradient,
  bit for bit (and differs from scoring every sample against the first one);
- FinetuneWeights over a prompt set: every pass's per-sample losses are those of the prompts (or
  labels) drawn for that pass, on the very images the server scored (a weight-0 client loss
  records them); over examples, the conditions follow the examples cycled by ``batch_size``, and
  the held-out examples are scored against their own;
- a fine-tune over labels with the classifier and no label trains each label toward itself;
- refusals, before any event: no prompt of its own (labels, a tensor or learned conditioning, a
  token's placeholder) for ``preference``; no label of its own for ``classifier``.

Models: the embedded digits model (labels) and the tiny Stable Diffusion of tests/models/tiny_sd.py
(prompts), with the tiny PickScore-kind CLIP of tests/losses/tiny_rewards.py.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

import adjointdpm
from adjointdpm import options
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.errors import InvalidArgument
from adjointdpm_server.losses import LossContext, build_loss
from adjointdpm_server.tasks import (ConditionSpec, ExampleSpec, GenerationSpec, LocalJob, LossSpec,
                                     TokenSpec, run_compute_gradient, run_finetune_weights,
                                     run_optimize_embedding, run_optimize_latent, run_sample)
from adjointdpm_server.tasks._job import IterationReport, ValidationReport
from adjointdpm_server.tasks.finetune_weights import draw_conditions
from adjointdpm_server.wire import build_server
from tests.losses.tiny_rewards import build_tiny_preference
from tests.models.tiny_sd import build_tiny_sd

PROMPTS = ["a photo of a cat", "a dog", "a painting in the style of a cat"]  # the tiny vocabulary
SD = dict(model="tiny", steps=2, guidance_scale=2.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """digits (labels) and the tiny SD (prompts), the tiny preference CLIP (also as the
    clip_similarity CLIP: a CLIPModel with its tokenizer); max batch 4."""
    root = tmp_path_factory.mktemp("reward-conditions")
    sd = build_tiny_sd(root / "sd")
    clip = build_tiny_preference(root / "preference")
    config = ServerConfig(models=("digits", f"tiny=diffusers:{sd}"), host="127.0.0.1", port=0,
                          artifact_dir=root / "artifacts", max_active_jobs=2,
                          preference_model_dir=clip, clip_model_dir=clip,
                          limits=Limits(max_batch=4, max_steps=50, max_iterations=50,
                                        client_loss_timeout_s=20))
    srv = build_server(config)
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def ctx(server):
    return server.runtime.for_tenant("default")


@pytest.fixture(scope="module")
def client(server):
    with adjointdpm.Client(f"127.0.0.1:{server.port}", timeout=300) as c:
        yield c


def noise(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def server_loss(name: str, params: dict | None = None, weight: float = 1.0) -> LossSpec:
    return LossSpec("server", name, weight, "image", dict(params or {}))


def gradient_opts(targets=("x_T",)):
    return options.TYPES["ComputeGradient"](targets=list(targets),
                                            weights=options.GROUPS["ComputeGradient"]["weights"]())


def plugin(ctx, name: str, params: dict):
    """The plugin as a request builds it with an explicit prompt or label (no conditions)."""
    backend = ctx.model("digits")[1] if name == "classifier" else None
    return build_loss(name, LossContext(backend, ctx.settings), params)


def recorder(calls: list):
    """A client loss with weight 0 beside the reward: it sees the very images the reward scores
    (the objective decodes once for every term) and keeps them; its own loss is 0."""
    def fn(x):
        calls.append(torch.from_numpy(np.array(x)))
        return 0.0, np.zeros_like(x), np.zeros(len(x))
    return fn


RECORD = LossSpec("client", "record", 0.0, "image")


def iterations(job) -> list[IterationReport]:
    return [e for e in job.events if isinstance(e, IterationReport)]


# ---- ComputeGradient: the default is each sample's own prompt or label, bit for bit --------------

def _sd_gradient(ctx, loss: LossSpec, prompts=PROMPTS, targets=("x_T", "cond")):
    spec = GenerationSpec(prompt=list(prompts), x_T=noise((3, 4, 8, 8), 1), **SD)
    return run_compute_gradient(ctx, spec, [loss], LocalJob(), gradient_opts(targets))


def _same(a, b) -> None:
    assert a.loss == b.loss and a.sample_losses == b.sample_losses and a.loss_terms == b.loss_terms
    assert a.gradients.keys() == b.gradients.keys()
    for k in a.gradients:
        assert torch.equal(a.gradients[k], b.gradients[k]), k


def test_preference_without_prompt_is_each_sample_s_own_prompt_value_and_gradient(ctx):
    own = _sd_gradient(ctx, server_loss("preference"))
    explicit = _sd_gradient(ctx, server_loss("preference", {"prompt": PROMPTS}))
    _same(own, explicit)
    assert set(own.gradients) == {"x_T", "cond"} and float(own.gradients["x_T"].abs().max()) > 0
    # it has teeth: every sample against the first prompt scores samples 1 and 2 otherwise
    first = _sd_gradient(ctx, server_loss("preference", {"prompt": PROMPTS[0]}))
    assert first.sample_losses[0] == own.sample_losses[0]
    for i in (1, 2):
        assert abs(first.sample_losses[i] - own.sample_losses[i]) > 1e-3, i
    # one prompt for the batch: each sample's prompt is that one
    single = _sd_gradient(ctx, server_loss("preference"), prompts=["a dog"])
    _same(single, _sd_gradient(ctx, server_loss("preference", {"prompt": "a dog"}), prompts=["a dog"]))


def test_clip_similarity_without_text_is_each_sample_s_own_prompt(ctx):
    own = _sd_gradient(ctx, server_loss("clip_similarity"), targets=("x_T",))
    for i, prompt in enumerate(PROMPTS):  # sample i against its prompt, as an explicit text gives it
        assert own.sample_losses[i] == _sd_gradient(
            ctx, server_loss("clip_similarity", {"text": prompt}), targets=("x_T",)).sample_losses[i]
    single = _sd_gradient(ctx, server_loss("clip_similarity"), prompts=["a dog"], targets=("x_T",))
    _same(single, _sd_gradient(ctx, server_loss("clip_similarity", {"text": "a dog"}), prompts=["a dog"],
                               targets=("x_T",)))


def _digits_gradient(ctx, loss: LossSpec, **generation):
    spec = GenerationSpec(x_T=noise((3, 1, 8, 8), 2), steps=3, **generation)
    return run_compute_gradient(ctx, spec, [loss], LocalJob(), gradient_opts(("x_T", "cond")))


@pytest.mark.parametrize("mode", ["targeted", "untargeted", "margin"])
def test_classifier_without_label_is_each_sample_s_own_label(ctx, mode):
    own = _digits_gradient(ctx, server_loss("classifier", {"mode": mode}), labels=[1, 7, 3])
    _same(own, _digits_gradient(ctx, server_loss("classifier", {"mode": mode, "label": [1, 7, 3]}),
                                labels=[1, 7, 3]))
    if mode == "targeted":  # teeth: another label scores otherwise
        other = _digits_gradient(ctx, server_loss("classifier", {"label": 8}), labels=[1, 7, 3])
        assert all(abs(a - b) > 1e-3 for a, b in zip(own.sample_losses, other.sample_losses))
    # a digit prompt is the label the digits model reads in it
    _same(_digits_gradient(ctx, server_loss("classifier", {"mode": mode}), prompt=["7"]),
          _digits_gradient(ctx, server_loss("classifier", {"mode": mode, "label": 7}), prompt=["7"]))


def test_optimize_latent_scores_each_sample_against_its_own_prompt(ctx):
    def run(params):
        spec = GenerationSpec(prompt=list(PROMPTS[:2]), x_T=noise((2, 4, 8, 8), 3), **SD)
        job = LocalJob()
        result = run_optimize_latent(ctx, spec, [server_loss("preference", params)], job,
                                     options.TYPES["OptimizeLatent"](iterations=2, lr=0.1))
        return result, [r.sample_losses for r in iterations(job)]
    own, own_losses = run({})
    explicit, explicit_losses = run({"prompt": PROMPTS[:2]})
    assert own_losses == explicit_losses and own.history == explicit.history
    assert torch.equal(own.x_T, explicit.x_T)


# ---- FinetuneWeights over a prompt set: each pass scored against its drawn conditions ------------

def _check_passes(job, calls, expected_plugin, drawn_of, micro: int) -> list:
    """Every iteration's per-sample losses are the reward of the conditions drawn for each pass,
    on the images that pass scored (``calls``, in order); → [(the pass's conditions, images)]."""
    passes = []
    for r in iterations(job):
        drawn = drawn_of(r.iteration)
        expected = []
        for start in range(0, len(drawn), micro):
            part, images = drawn[start:start + micro], calls[len(passes)]
            assert images.shape[0] == len(part)
            with torch.no_grad():
                expected += expected_plugin(part)(images).tolist()
            passes.append((part, images))
        torch.testing.assert_close(torch.tensor(r.sample_losses, dtype=torch.float64),
                                   torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert len(passes) == len(calls)
    return passes


def _with_teeth(passes, expected_plugin) -> None:
    """Some pass drew different conditions, and there the first one for all scores otherwise."""
    part, images = next((part, images) for part, images in passes if len(set(part)) > 1)
    with torch.no_grad():
        right, wrong = expected_plugin(part)(images), expected_plugin(part[:1])(images)
    assert (right - wrong).abs().max() > 1e-3


def test_a_prompt_set_fine_tune_scores_each_sample_against_its_drawn_prompt(ctx):
    prompts = ["a cat", "a dog", "a photo of a cat", "a painting", "the dog in the style"]
    weights = [1.0, 2.0, 1.0, 1.0, 3.0]
    conditions = [ConditionSpec(prompt=p, weight=w) for p, w in zip(prompts, weights)]
    calls: list = []
    job = LocalJob({"record": recorder(calls)})
    opts = options.TYPES["FinetuneWeights"](iterations=3, batch_size=4, micro_batch=2, seed=3,
                                            lora_rank=2, lr=0.05)
    backend = ctx.model("tiny")[1]

    def drawn_of(it):
        picks, _ = draw_conditions(weights, 4, 3, it, backend.latent_shape)
        return [prompts[k] for k in picks.tolist()]

    result = run_finetune_weights(ctx, GenerationSpec(**SD), [],
                                  [server_loss("preference"), RECORD], job, opts, conditions=conditions)
    assert result.iterations_run == 3 and [len(c) for c in calls] == [2] * 6  # 2 passes of 2
    preference = lambda part: plugin(ctx, "preference", {"prompt": part})  # noqa: E731
    _with_teeth(_check_passes(job, calls, preference, drawn_of, 2), preference)


def test_a_fine_tune_over_labels_scores_and_trains_each_label_toward_itself(ctx):
    labels = [0, 1, 2, 3, 4, 5, 6, 7, 9]
    conditions = [ConditionSpec(label=v) for v in labels]
    calls: list = []
    job = LocalJob({"record": recorder(calls)})
    opts = options.TYPES["FinetuneWeights"](iterations=6, batch_size=4, micro_batch=2, seed=5,
                                            lora_rank=2, lr=0.05)
    backend = ctx.model("digits")[1]

    def drawn_of(it):
        picks, _ = draw_conditions([1.0] * len(labels), 4, 5, it, backend.latent_shape)
        return [labels[k] for k in picks.tolist()]

    result = run_finetune_weights(ctx, GenerationSpec(steps=3), [],
                                  [server_loss("classifier"), RECORD], job, opts, conditions=conditions)
    classifier = lambda part: plugin(ctx, "classifier", {"label": part})  # noqa: E731
    _with_teeth(_check_passes(job, calls, classifier, drawn_of, 2), classifier)
    # the result's batch (one sample per listed label, seeded noise): −log p(own label) fell for the
    # batch, each label trained toward itself (not toward one class)
    own = plugin(ctx, "classifier", {"label": labels[:4]})  # max batch 4: the first four labels
    base = run_sample(ctx, GenerationSpec(labels=labels[:4], x_T=result.x_T, steps=3), LocalJob(),
                      options.TYPES["Sample"](images=False))
    with torch.no_grad():
        before = own(backend.decode(base.x0))
        after = own(backend.decode(result.x0))
        verdicts = backend.classify(backend.decode(result.x0)).argmax(1).tolist()
    # (seed 5: before 0.029, 0.048, 0.046, 0.060; after 0.029, 0.032, 0.017, 0.057)
    assert float(after.sum()) < 0.9 * float(before.sum()), (before, after)
    assert verdicts == labels[:4]


# ---- FinetuneWeights over examples (cycled by batch_size) and the held-out examples --------------

def test_examples_cycled_by_batch_size_and_validation_are_scored_against_their_own_labels(ctx):
    labels, held_out = [1, 4, 6, 9], [2, 5]
    examples = [ExampleSpec(seed=10 + k, label=v) for k, v in enumerate(labels)]
    validation = [ExampleSpec(seed=100 + k, label=v) for k, v in enumerate(held_out)]
    calls: list = []
    job = LocalJob({"record": recorder(calls)})
    opts = options.TYPES["FinetuneWeights"](iterations=3, batch_size=3, micro_batch=2, lora_rank=2,
                                            lr=0.05, validate_every=1)
    run_finetune_weights(ctx, GenerationSpec(steps=3), examples,
                         [server_loss("classifier"), RECORD], job, opts, validation)
    # per iteration: passes of 2 and 1 (batch_size 3), then the validation's 2 held-out images
    assert [len(c) for c in calls] == [2, 1, 2] * 3
    train = [c for k, c in enumerate(calls) if k % 3 != 2]
    held = [c for k, c in enumerate(calls) if k % 3 == 2]
    classifier = lambda part: plugin(ctx, "classifier", {"label": part})  # noqa: E731
    # iteration it: examples 3·it, 3·it + 1, 3·it + 2, cycled (the reference's index too)
    _with_teeth(_check_passes(job, train, classifier,
                              lambda it: [labels[k % 4] for k in range(3 * it, 3 * it + 3)], 2),
                classifier)
    validations = [e for e in job.events if isinstance(e, ValidationReport)]
    assert [v.iteration for v in validations] == [1, 2, 3]
    for v, images in zip(validations, held):
        with torch.no_grad():
            expected = plugin(ctx, "classifier", {"label": held_out})(images).sum()
        assert v.loss == pytest.approx(float(expected), rel=1e-6)


# ---- refusals, before any work -------------------------------------------------------------------

def _refused_in_process(run, message: str) -> None:
    job = LocalJob()
    with pytest.raises(InvalidArgument, match=message) as err:
        run(job)
    assert err.value.code == "INVALID_ARGUMENT"
    assert job.events == []  # no progress, no JobStarted: refused before any work


def test_preference_without_prompt_is_refused_where_samples_have_no_prompt(ctx):
    pref = [server_loss("preference")]
    tensor = torch.zeros(1, *ctx.model("tiny")[1].cond_shape)
    cases = {
        "class labels": lambda job: run_compute_gradient(
            ctx, GenerationSpec(labels=[1, 2], steps=3), pref, job, gradient_opts()),
        "a tensor": lambda job: run_compute_gradient(
            ctx, GenerationSpec(cond=tensor, batch=1, **SD), pref, job, gradient_opts()),
        "placeholder": lambda job: run_compute_gradient(
            ctx, GenerationSpec(prompt=["a photo of <*>"], batch=1, **SD), pref, job,
            gradient_opts(("token",)), TokenSpec(initializer="cat")),
        "no prompt": lambda job: run_optimize_embedding(
            ctx, GenerationSpec(prompt=["a photo of <*>"], batch=1, **SD), pref, job,
            options.TYPES["OptimizeEmbedding"](iterations=1), TokenSpec(initializer="cat")),
        "generated from class labels": lambda job: run_finetune_weights(
            ctx, GenerationSpec(steps=3), [], pref, job, options.TYPES["FinetuneWeights"](iterations=1),
            conditions=[ConditionSpec(label=1), ConditionSpec(label=2)]),
    }
    for what, run in cases.items():
        _refused_in_process(run, rf"preference needs the parameter 'prompt'.*{what}")
    # a prompt given explicitly is taken on the same requests
    explicit = [server_loss("preference", {"prompt": "a photo of a cat"})]
    run_compute_gradient(ctx, GenerationSpec(labels=[1, 2], steps=2), explicit, LocalJob(),
                         gradient_opts())
    result = run_compute_gradient(ctx, GenerationSpec(prompt=["a photo of <*>"], batch=1, **SD),
                                  explicit, LocalJob(), gradient_opts(("token",)),
                                  TokenSpec(initializer="cat"))
    assert float(result.gradients["token"].abs().max()) > 0


def test_classifier_without_label_is_refused_where_samples_have_no_label(ctx):
    cls = [server_loss("classifier")]
    _refused_in_process(lambda job: run_compute_gradient(
        ctx, GenerationSpec(prompt=["a cat"], batch=1, **SD), cls, job, gradient_opts()),
        "needs a model with a classifier")  # a prompt model
    tensor = torch.zeros(1, *ctx.model("digits")[1].cond_shape)
    for generation in (GenerationSpec(batch=2, steps=3),  # digits unconditional
                       GenerationSpec(cond=tensor, batch=2, steps=3)):
        _refused_in_process(lambda job: run_compute_gradient(ctx, generation, cls, job, gradient_opts()),
                            "classifier needs the parameter 'label'.*no label")
    _refused_in_process(lambda job: run_optimize_embedding(  # the vector learned is no label
        ctx, GenerationSpec(labels=[3], batch=2, steps=3), cls, job,
        options.TYPES["OptimizeEmbedding"](iterations=1)), "classifier needs the parameter 'label'")
    # the training's labels have their own, the held-out examples (seeds alone) have none
    _refused_in_process(lambda job: run_finetune_weights(
        ctx, GenerationSpec(steps=3), [], cls, job,
        options.TYPES["FinetuneWeights"](iterations=1, validate_every=1),
        [ExampleSpec(seed=100), ExampleSpec(seed=101)], conditions=[ConditionSpec(label=1)]),
        "classifier needs the parameter 'label'")


def test_refusals_over_the_wire_come_before_any_event(client):
    for loss, kwargs, message in (
            (adjointdpm.ServerLoss("preference"), dict(conditions=[1, 3]), "parameter 'prompt'"),
            (adjointdpm.ServerLoss("classifier"), dict(model="tiny", conditions=["a cat", "a dog"]),
             "needs a model with a classifier")):
        events: list = []
        with pytest.raises(adjointdpm.AdjointDPMError) as err:
            client.finetune_weights(loss, [], on_event=events.append, steps=2, iterations=1, **kwargs)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, err.value.details
        assert message in err.value.details
        assert not [e for e in events if e.WhichOneof("kind") in ("progress", "job", "iteration")]


def test_the_defaults_are_declared(client):
    """ListLosses carries each plugin's description and parameter names; the parameters'
    descriptions are the plugin's ``params``."""
    from adjointdpm_server.losses import discover_losses

    described = {loss["name"]: loss for loss in client.list_losses()}
    for name, key, what in (("preference", "prompt", "prompt"), ("clip_similarity", "text", "prompt"),
                            ("classifier", "label", "label")):
        default = f"default: each sample's own generation {what}"
        assert default in discover_losses()[name].params[key]
        assert key in described[name]["params"]
        assert f"each sample's own generation {what}" in described[name]["description"]
