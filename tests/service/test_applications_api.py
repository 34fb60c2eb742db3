"""The applications API end to end over a loopback server, checked against in-process references
on the server's own resident models: per-sample loss semantics (docs/design.md §4.3: the objective
is the sum over samples of per-sample losses, so a sample's gradient does not depend on its batch),
classifier modes, learning-rate schedules, OptimizeLatent's per-sample best iterate and
``stop_when``, guided sampling's step, OptimizeEmbedding's priors and FinetuneWeights'
validation."""

import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_safetensors

import adjointdpm

TO_EIGHT = adjointdpm.ServerLoss("classifier", params={"label": 8})
TO_THREE = adjointdpm.ServerLoss("classifier", params={"label": 3})


# ---- in-process references -------------------------------------------------------------------

def _logits(backend, x0) -> torch.Tensor:
    """The digits classifier's logits of decode(x0), in float64 for the reference formulas."""
    with torch.no_grad():
        return backend.classify(backend.decode(torch.from_numpy(np.asarray(x0)))).double()


def _targeted(logits: torch.Tensor, label: int) -> np.ndarray:
    """−log p(label) per sample."""
    return (-torch.log_softmax(logits, 1)[:, label]).numpy()


def _mixture_problem():
    target = np.random.default_rng(0).uniform(size=(1, 8, 8)).astype(np.float32)
    return adjointdpm.ServerLoss("mse", tensors={"target": target})


def _refused(call):
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        call()
    return err.value.code.name


# ---- 1. the objective is a sum of per-sample losses ------------------------------------------

@pytest.mark.parametrize("kind", ["server", "client-torch"])
def test_a_samples_gradient_does_not_depend_on_its_batch(client, rt, kind):
    """§4.3: L = Σ_samples loss, so ∂L/∂x_T of sample 0 is the same alone (batch 1) as in a batch
    of 3 (a mean would scale it by 1/3), and its per-sample loss is the same too."""
    if kind == "server":
        loss = TO_EIGHT
    else:
        loss = adjointdpm.ClientLoss(lambda img: -torch.log_softmax(
            rt.models["digits"].classify(img), 1)[:, 8], name="to_eight_torch")
    x = rt.models["digits"].noise(3, seed=0).numpy()
    batch = client.compute_gradient(loss, x_T=x, labels=[3, 4, 5], steps=5)
    alone = client.compute_gradient(loss, x_T=x[:1], labels=[3], steps=5)
    g_batch, g_alone = batch.gradients["x_T"][0], alone.gradients["x_T"][0]
    assert np.linalg.norm(g_batch - g_alone) <= 1e-5 * np.linalg.norm(g_alone)
    assert len(batch.sample_losses) == 3 and len(alone.sample_losses) == 1
    assert batch.sample_losses[0] == pytest.approx(alone.sample_losses[0], rel=1e-5)
    assert batch.loss == pytest.approx(sum(batch.sample_losses), rel=1e-6)
    # the per-sample values are the classifier's −log p(8) of each returned x0
    np.testing.assert_allclose(batch.sample_losses, _targeted(_logits(rt.models["digits"], batch.x0), 8),
                               rtol=1e-5, atol=1e-6)


# ---- 2. classifier loss modes ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["targeted", "untargeted", "margin"])
def test_classifier_modes_match_their_formulas(client, rt, mode):
    """targeted −log p(y), untargeted −log(1 − p(y)), margin max(z_y − max_{j≠y} z_j, −κ), per
    sample, on the x0 the gradient result carries (κ = 4.6 clamps sample 2, not sample 3)."""
    kappa = 4.6
    loss = adjointdpm.ServerLoss("classifier", params={"label": 8, "mode": mode, "kappa": kappa})
    result = client.compute_gradient(loss, labels=[8, 8, 3, 1], seed=1, steps=5)
    z = _logits(rt.models["digits"], result.x0)
    p = torch.softmax(z, 1)[:, 8]
    others = z.clone()
    others[:, 8] = -math.inf
    margin = z[:, 8] - others.amax(1)
    want = {"targeted": -torch.log(p), "untargeted": -torch.log1p(-p),
            "margin": margin.clamp_min(-kappa)}[mode].numpy()
    np.testing.assert_allclose(result.sample_losses, want, rtol=1e-4, atol=1e-5)
    assert result.loss == pytest.approx(float(want.sum()), rel=1e-4, abs=1e-4)
    if mode == "margin":  # the data straddle the floor: one sample clamped, one not
        assert margin[2] < -kappa < margin[3] < 0 < margin[0]


# ---- 3. learning-rate schedules ----------------------------------------------------------------

def _expected_lr(lr: float, schedule: str, warmup: int, iterations: int) -> list[float]:
    out = []
    for it in range(iterations):
        if it < warmup:
            out.append(lr * (it + 1) / (warmup + 1))
            continue
        p = (it - warmup) / (iterations - warmup)
        out.append({"cosine": lr * 0.5 * (1 + math.cos(math.pi * p)), "linear": lr * (1 - p),
                    "constant": lr}[schedule])
    return out


@pytest.mark.parametrize("schedule, warmup, iterations", [("cosine", 2, 6), ("linear", 1, 5),
                                                          ("constant", 2, 4)])
def test_learning_rate_schedule_is_reported_and_applied(client, schedule, warmup, iterations):
    """Each iteration reports the schedule's step size (warm-up lr·(it+1)/(warmup+1), then cosine
    or linear decay over the rest) and SGD really takes it: x_{k+1} − x_k = −lr_k ∂L/∂x_k."""
    loss, lr = _mixture_problem(), 30.0
    result = client.optimize_latent(loss, optimizer="sgd", lr=lr, iterations=iterations,
                                    schedule=schedule, warmup=warmup, model="gaussian-mixture",
                                    seed=0, batch=2, steps=6)
    want = _expected_lr(lr, schedule, warmup, iterations)
    assert [r.iteration for r in result.iterations] == list(range(iterations))
    np.testing.assert_allclose([r.lr for r in result.iterations], want, rtol=1e-12, atol=1e-12)
    for k in range(iterations):  # the last step leads to the final iterate, last_x_T
        g = client.compute_gradient(loss, model="gaussian-mixture", x_T=result.iterations[k].x_T,
                                    steps=6).gradients["x_T"]
        after = result.iterations[k + 1].x_T if k + 1 < iterations else result.last_x_T
        step = after - result.iterations[k].x_T
        assert np.linalg.norm(step + want[k] * g) <= 1e-4 * np.linalg.norm(step)


# ---- 4. OptimizeLatent: each sample's best iterate ---------------------------------------------

def test_optimize_latent_returns_each_samples_best_iterate(client, rt):
    """result.x_T row i is the iterate of best_iteration[i] (an IterationRecord's x_T row, or the
    final iterate last_x_T when best_iteration[i] == iterations_run), whose loss is the minimum over
    the run; any reported iterate reproduces its loss with sample(x_T=…)."""
    backend, labels, n = rt.models["digits"], [1, 2, 3], 6
    result = client.optimize_latent(TO_EIGHT, iterations=n, lr=0.5, seed=0, batch=3, steps=4,
                                    labels=labels)
    records = result.iterations
    assert result.iterations_run == n and [r.iteration for r in records] == list(range(n))
    final = client.sample(x_T=result.last_x_T, labels=labels, steps=4, images=False)
    table = np.array([r.sample_losses for r in records] + [_targeted(_logits(backend, final.x0), 8)])
    for i in range(3):
        best = int(np.argmin(table[:, i]))
        assert result.best_iteration[i] == best
        assert result.sample_losses[i] == pytest.approx(table[best, i], rel=1e-5)
        source = result.last_x_T if best == n else records[best].x_T
        np.testing.assert_array_equal(result.x_T[i], source[i])
    # both kinds occur with this seed: a mid-run best and the final iterate
    assert any(b < n for b in result.best_iteration) and any(b == n for b in result.best_iteration)
    assert result.loss == pytest.approx(sum(result.sample_losses), rel=1e-6)
    assert not any(result.stopped)
    # the returned x0 is what the returned x_T samples to
    again = client.sample(x_T=result.x_T, labels=labels, steps=4, images=False)
    np.testing.assert_allclose(result.x0, again.x0, atol=1e-5)
    # a mid-run iterate reproduces: its loss, recomputed in-process from a fresh sample
    mid = client.sample(x_T=records[2].x_T, labels=labels, steps=4, images=False)
    np.testing.assert_allclose(records[2].sample_losses, _targeted(_logits(backend, mid.x0), 8),
                               rtol=1e-5, atol=1e-6)
    assert records[2].loss == pytest.approx(sum(records[2].sample_losses), rel=1e-6)


# ---- 5. stop_when, per sample ------------------------------------------------------------------

def _check_frozen(result, stop_at: list[int], kept: list[int]):
    """Sample i stops at iteration stop_at[i] and is frozen at iteration kept[i]'s iterate: later
    records repeat that row exactly, earlier ones move; the call ends when all have stopped."""
    records = result.iterations
    for i, (k_stop, k_keep) in enumerate(zip(stop_at, kept)):
        assert [r.stopped[i] for r in records] == [k >= k_stop for k in range(len(records))]
        for k in range(k_stop + 1, len(records)):
            np.testing.assert_array_equal(records[k].x_T[i], records[k_keep].x_T[i])
        for k in range(k_stop):
            assert not np.array_equal(records[k].x_T[i], records[k + 1].x_T[i])
        np.testing.assert_array_equal(result.x_T[i], records[k_keep].x_T[i])
        assert result.best_iteration[i] == k_keep
    assert result.stopped == [True] * len(stop_at)
    assert result.iterations_run == len(records) == max(stop_at) + 1


def test_stop_when_loss_below_freezes_each_sample(client):
    """A sample whose loss reaches the threshold keeps that iterate and is frozen; the call ends
    early once every sample has stopped."""
    threshold, n = 3.0, 8
    result = client.optimize_latent(TO_EIGHT, iterations=n, lr=0.5, seed=3, batch=3, steps=4,
                                    labels=[1, 2, 3], stop_when={"loss_below": threshold})
    losses = np.array([r.sample_losses for r in result.iterations])
    stop_at = [int(np.flatnonzero(losses[:, i] <= threshold)[0]) for i in range(3)]
    assert len(set(stop_at)) > 1  # the samples stop at different iterations
    _check_frozen(result, stop_at, stop_at)
    assert result.iterations_run < n
    for i, k in enumerate(stop_at):
        assert result.sample_losses[i] == pytest.approx(losses[k, i]) and losses[k, i] <= threshold


def test_stop_when_patience_freezes_non_improving_samples(client):
    """patience 1: a sample whose loss does not beat its best is frozen at its best iterate."""
    result = client.optimize_latent(TO_EIGHT, iterations=8, lr=0.5, seed=0, batch=3, steps=4,
                                    labels=[1, 2, 3], stop_when={"patience": 1})
    losses = np.array([r.sample_losses for r in result.iterations])
    stop_at, kept = [], []
    for i in range(3):
        best, at = math.inf, -1
        for k in range(len(losses)):
            if losses[k, i] < best:
                best, at = losses[k, i], k
            elif k - at >= 1:
                break
        else:
            pytest.fail(f"sample {i} never stopped")
        stop_at.append(k)
        kept.append(at)
    _check_frozen(result, stop_at, kept)
    assert result.iterations_run < 8


@pytest.mark.parametrize("mode", ["untargeted", "margin"])
def test_stop_when_verdict_changed_keeps_the_first_flipped_iterate(client, rt, mode):
    """Away from the true labels: a stopped sample's result is classified differently from its
    start, and every iterate before the one it kept still had the start's verdict."""
    backend, labels = rt.models["digits"], [1, 2, 3]
    loss = adjointdpm.ServerLoss("classifier", params={"label": labels, "mode": mode})
    result = client.optimize_latent(loss, iterations=8, lr=0.5, seed=3, batch=3, steps=4,
                                    labels=labels, stop_when={"verdict_changed": True})
    def verdict(**generation):
        return _logits(backend, client.sample(labels=labels, steps=4, images=False, **generation).x0).argmax(1)

    start, final = verdict(seed=3, batch=3), _logits(backend, result.x0).argmax(1)
    verdicts = [verdict(x_T=r.x_T) for r in result.iterations]
    for i, k in enumerate(result.best_iteration):
        assert final[i] != start[i] and verdicts[k][i] == final[i]
        assert all(verdicts[j][i] == start[i] for j in range(k))
    _check_frozen(result, result.best_iteration, result.best_iteration)  # every sample stopped
    assert result.iterations_run < 8


# ---- 6. guided sampling's step -----------------------------------------------------------------

def test_normalized_guided_step_does_not_depend_on_the_batch(client, rt):
    """§7: each sample moves scale·σ_t·g/rms(g), so sample 0's guided result is the same alone as in
    a batch of 4 (a batch-wide normalization would not be)."""
    x, labels = rt.models["digits"].noise(4, seed=7).numpy(), [2, 3, 4, 5]
    guided = {"every": 2, "scale": 0.3, "step": "normalized"}
    batch = client.optimize_latent(TO_EIGHT, guided=guided, x_T=x, labels=labels, steps=4)
    alone = client.optimize_latent(TO_EIGHT, guided=guided, x_T=x[:1], labels=labels[:1], steps=4)
    np.testing.assert_allclose(alone.x0[0], batch.x0[0], atol=1e-4)
    plain = client.sample(x_T=x, labels=labels, steps=4, images=False)
    assert np.abs(batch.x0 - plain.x0).max() > 0.1  # the guidance did act
    assert len(batch.history) == 2  # nodes 0 and 2


def test_guided_step_formula_and_clip(client, rt):
    """One steered node (every = steps), from an intermediate x_t (t = 0.5, where σ_t ≈ 0.7 tells
    a missing noise-level factor apart): the guided result is exactly sample(x_t − step(g)) with
    g = ∂L/∂x_t, step = scale·σ_t·g/rms(g) (normalized) or scale·g (raw), each entry clipped to
    ±clip; a tiny clip keeps the result near unguided sampling."""
    backend = rt.models["digits"]
    x, labels, steps, t = backend.noise(4, seed=7).numpy(), [2, 3, 4, 5], 4, 0.5
    sigma = float(backend.schedule.sigma(torch.tensor(t, dtype=torch.float64)))
    assert sigma < 0.9
    at_t = dict(labels=labels, steps=steps, t_start=t)
    g = client.compute_gradient(TO_EIGHT, x_T=x, **at_t).gradients["x_T"]
    rms = np.sqrt((g.reshape(4, -1) ** 2).mean(1)).reshape(4, 1, 1, 1)
    plain = client.sample(x_T=x, images=False, **at_t).x0
    moved = {}
    for step, scale, clip in [("normalized", 0.3, 0.0), ("raw", 0.5, 0.0), ("raw", 0.5, 1e-3)]:
        delta = scale * sigma * g / rms if step == "normalized" else scale * g
        if clip:
            delta = np.clip(delta, -clip, clip)
        want = client.sample(x_T=x - delta, images=False, **at_t).x0
        got = client.optimize_latent(TO_EIGHT, x_T=x, **at_t,
                                     guided={"every": steps, "scale": scale, "step": step, "clip": clip})
        np.testing.assert_allclose(got.x0, want, atol=1e-4)  # float32 rms in numpy vs torch
        moved[(step, clip)] = np.abs(got.x0 - plain).max()
    assert np.abs(0.5 * g).max() > 0.1  # unclipped, the raw step is large …
    assert moved[("raw", 1e-3)] < 0.05 * moved[("raw", 0.0)]  # … and the clip bounds it


# ---- 7. OptimizeEmbedding: priors, best vector, early stop -----------------------------------

def _embedding(client, result) -> np.ndarray:
    info, data = client.download_artifact(result.artifact.id)
    assert info.kind == "embedding" and info.id == result.artifact.id
    tensors = load_safetensors(data)
    assert set(tensors) == {"cond"}
    return tensors["cond"]


def test_embedding_norm_prior_keeps_the_vector_among_the_tables(client, rt):
    """A 'norm' prior keeps the learned class vector's norm nearer the table's mean row norm than
    the loss alone; either way the stored vector is the best iterate: sampling with it reproduces
    history[best_iteration] (classifier losses plus batch·w·(|v|/R − 1)²)."""
    backend = rt.models["digits"]
    table = backend.embedding_table().double()
    radius = float(table.norm(dim=1).mean())
    vectors = {}
    for prior, weight in [("", 0.0), ("norm", 10.0)]:
        result = client.optimize_embedding([TO_THREE], iterations=6, lr=0.5, prior=prior,
                                           prior_weight=weight, seed=0, batch=2, steps=4)
        v = _embedding(client, result)
        assert v.shape == (1, table.shape[1])
        best = int(np.argmin(result.history))
        assert result.iterations_run == len(result.history) == 6
        assert result.best_iteration == [best] and result.artifact.iteration == best
        used = client.sample(embedding=result.artifact.id, seed=0, batch=2, steps=4, images=False)
        penalty = 2 * weight * (np.linalg.norm(v.astype(np.float64)) / radius - 1) ** 2
        want = _targeted(_logits(backend, used.x0), 3).sum() + penalty
        assert result.history[best] == pytest.approx(want, rel=1e-4)
        vectors[prior] = v
    off = {k: abs(np.linalg.norm(v) - radius) for k, v in vectors.items()}
    assert off["norm"] < 0.6 * off[""]


def test_embedding_stop_when_loss_below_stops_after_the_first_iteration(client):
    result = client.optimize_embedding([TO_THREE], iterations=6, lr=0.5, seed=0, batch=2, steps=4,
                                       stop_when={"loss_below": 1e9})
    assert result.iterations_run == 1 and len(result.history) == 1
    assert result.best_iteration == [0] and result.artifact.iteration == 0


# ---- 8. FinetuneWeights validation --------------------------------------------------------------

EXAMPLES = [{"seed": k, "label": k} for k in range(2)]
VALIDATION = [{"seed": 100 + k, "label": k} for k in range(3)]


def _check_best_flags(validations):
    """best=True exactly where the loss beats every earlier validation loss."""
    low = math.inf
    for v in validations:
        assert v.best == (v.loss < low)
        low = min(low, v.loss)


def test_validation_agreement_counts_the_verdicts_the_base_model_had(client, rt):
    """``agreement`` is the share of validation images whose class is the base model's: 1 for an
    adapter that has not moved (lr 1e-9); below 1 once a strong push to one class moved them."""
    validation = [{"seed": 300 + k, "label": k} for k in range(4)]
    common = dict(examples=[{"seed": 0, "label": 0}], validation=validation, iterations=2,
                  steps=4, lora_rank=2)
    still = client.finetune_weights(TO_EIGHT, lr=1e-9, **common)
    assert [v.agreement for v in still.validations] == [1.0, 1.0]
    moved = client.finetune_weights(adjointdpm.ServerLoss("classifier", params={"label": 8},
                                                          weight=50.0), lr=0.3, **common)
    base = client.sample(x_T=np.concatenate([client.sample(seed=v["seed"], steps=4, images=False).x_T
                                             for v in validation]), labels=[0, 1, 2, 3], steps=4,
                         images=False)
    tuned = client.sample(x_T=base.x_T, labels=[0, 1, 2, 3], steps=4, images=False,
                          adapter=moved.artifact.id)
    backend = rt.models["digits"]
    with torch.no_grad():
        def verdicts(x0):
            return backend.classify(backend.decode(torch.from_numpy(x0))).argmax(1)
        kept = float((verdicts(tuned.x0) == verdicts(base.x0)).float().mean())
    assert moved.validations[-1].agreement == pytest.approx(kept, abs=1e-6)
    assert kept < 1.0


def test_finetune_validation_records_and_keep_best(client, rt):
    """One Validation per validate_every steps plus the last; agreement a share of 3 examples;
    best flags mark the strictly decreasing losses; keep_best returns the adapter of the last best
    validation, which reproduces that validation loss; the lr follows the schedule."""
    backend = rt.models["digits"]
    result = client.finetune_weights([TO_EIGHT], EXAMPLES, validation=VALIDATION, validate_every=2,
                                     keep_best=True, iterations=5, lr=0.05, steps=4, lora_rank=2,
                                     schedule="linear", warmup=1)
    records = result.validations
    assert [v.iteration for v in records] == [2, 4, 5]
    for v in records:
        assert v.agreement is not None and 0.0 <= v.agreement <= 1.0
        assert round(v.agreement * 3) == pytest.approx(v.agreement * 3, abs=1e-6)  # float on the wire
        assert v.loss_terms == pytest.approx([v.loss]) and len(v.images) == 3
    _check_best_flags(records)
    best = [v for v in records if v.best][-1]
    assert result.artifact.iteration == best.iteration and result.best_iteration == [best.iteration]
    x_T = np.concatenate([backend.noise(1, seed=e["seed"]).numpy() for e in VALIDATION])
    tuned = client.sample(x_T=x_T, labels=[e["label"] for e in VALIDATION], steps=4,
                          adapter=result.artifact.id, images=False)
    assert _targeted(_logits(backend, tuned.x0), 8).sum() == pytest.approx(best.loss, rel=1e-4)
    assert result.iterations_run == 5
    np.testing.assert_allclose([r.lr for r in result.iterations],
                               _expected_lr(0.05, "linear", 1, 5), rtol=1e-12)


def test_finetune_keep_best_and_patience_with_scripted_validation_losses(client):
    """With validation losses 5, 3, 4 (a client loss tells the held-out batch of 3 from the
    training batch of 2), patience 1 stops after the third validation, and keep_best returns the
    adapter of iteration 2: its tensors equal that iteration's checkpoint."""
    scripted = iter([5.0, 3.0, 4.0, 2.0, 1.0, 0.5])

    def brightness(x):
        if len(x) == len(VALIDATION):
            return next(scripted), np.zeros_like(x)
        per_entry = 1.0 / x[0].size
        return float(x.reshape(len(x), -1).mean(1).sum()), np.full_like(x, per_entry)

    loss = adjointdpm.ClientLoss(brightness, autograd=False)
    result = client.finetune_weights([loss], EXAMPLES, validation=VALIDATION, validate_every=1,
                                     keep_best=True, iterations=6, lr=0.05, steps=4, lora_rank=2,
                                     checkpoint_every=1, keep_checkpoints=10,
                                     stop_when={"patience": 1})
    assert [(v.iteration, v.loss, v.best) for v in result.validations] == [
        (1, 5.0, True), (2, 3.0, True), (3, 4.0, False)]
    assert result.iterations_run == 3 and len(result.history) == 3
    assert result.artifact.iteration == 2 and result.best_iteration == [2]
    _, data = client.download_artifact(result.artifact.id)
    adapter = load_safetensors(data)
    (checkpoint,) = [c for c in result.checkpoints if c.iteration == 2]
    _, data = client.download_artifact(checkpoint.id)
    weights = {k: v for k, v in load_safetensors(data).items() if not k.startswith("__optim__/")}
    assert adapter.keys() == weights.keys() and adapter
    for key in adapter:
        np.testing.assert_array_equal(adapter[key], weights[key])
    assert [c.iteration for c in result.checkpoints] == [1, 2, 3]
    _, data = client.download_artifact(result.checkpoints[2].id)
    later = load_safetensors(data)
    assert any(not np.array_equal(adapter[k], later[k]) for k in adapter)  # training went on past 2


def test_finetune_stop_when_loss_below_stops_at_the_first_validation(client):
    result = client.finetune_weights([TO_EIGHT], EXAMPLES, validation=VALIDATION[:2], validate_every=2,
                                     iterations=6, lr=0.05, steps=4, lora_rank=2,
                                     stop_when={"loss_below": 1e9})
    assert result.iterations_run == 2 and len(result.history) == 2
    assert [v.iteration for v in result.validations] == [2] and result.validations[0].best


# ---- 9. per-sample values from client losses ---------------------------------------------------

def test_client_loss_per_sample_values(client, rt):
    """A torch client loss returning (B,) gives sample_losses equal to those values; a numpy one
    returning (value, grad) credits value / B to each sample."""
    backend = rt.models["digits"]
    per_sample = adjointdpm.ClientLoss(lambda img: img.flatten(1).mean(1), name="brightness_torch")
    result = client.compute_gradient(per_sample, labels=[1, 7, 0], seed=4, steps=4)
    with torch.no_grad():
        want = backend.decode(torch.from_numpy(result.x0)).flatten(1).mean(1).double().numpy()
    assert len(set(np.round(want, 4))) == 3  # distinct values: a spread average would not match
    np.testing.assert_allclose(result.sample_losses, want, rtol=1e-5)
    assert result.loss == pytest.approx(float(want.sum()), rel=1e-5)

    def total_only(img):
        return float(img.mean() * len(img)), np.full_like(img, 1.0 / img[0].size)

    numpy_loss = adjointdpm.ClientLoss(total_only, autograd=False)
    flat = client.compute_gradient(numpy_loss, labels=[1, 7, 0], seed=4, steps=4)
    np.testing.assert_allclose(flat.sample_losses, [want.sum() / 3] * 3, rtol=1e-5)
    # and per-sample client values reach OptimizeLatent's iteration records
    run = client.optimize_latent(per_sample, iterations=2, lr=0.2, labels=[1, 7, 0], seed=4, steps=4)
    again = client.sample(x_T=run.iterations[1].x_T, labels=[1, 7, 0], steps=4, images=False)
    with torch.no_grad():
        want = backend.decode(torch.from_numpy(again.x0)).flatten(1).mean(1).double().numpy()
    np.testing.assert_allclose(run.iterations[1].sample_losses, want, rtol=1e-5)


# ---- refusals ----------------------------------------------------------------------------------

MIXTURE_MSE = _mixture_problem()

REFUSALS = {
    "classifier mode": lambda c: c.compute_gradient(
        adjointdpm.ServerLoss("classifier", params={"label": 8, "mode": "sideways"}), seed=0, steps=3),
    "negative kappa": lambda c: c.compute_gradient(
        adjointdpm.ServerLoss("classifier", params={"label": 8, "mode": "margin", "kappa": -1}),
        seed=0, steps=3),
    "schedule name": lambda c: c.optimize_latent(TO_EIGHT, schedule="exponential", seed=0, steps=3),
    "warmup = iterations": lambda c: c.optimize_latent(TO_EIGHT, iterations=3, warmup=3, seed=0, steps=3),
    "finetune schedule": lambda c: c.finetune_weights(TO_EIGHT, EXAMPLES, schedule="step", steps=3),
    "guided step name": lambda c: c.optimize_latent(TO_EIGHT, guided={"every": 2, "step": "big"},
                                                    seed=0, steps=3),
    "guided negative clip": lambda c: c.optimize_latent(TO_EIGHT, guided={"every": 2, "clip": -1.0},
                                                        seed=0, steps=3),
    "stop_when on guided": lambda c: c.optimize_latent(TO_EIGHT, guided={"every": 2}, seed=0, steps=3,
                                                       stop_when={"loss_below": 1.0}),
    "verdict without classifier": lambda c: c.optimize_latent(
        MIXTURE_MSE, model="gaussian-mixture", seed=0, steps=3, stop_when={"verdict_changed": True}),
    "prior without table": lambda c: c.optimize_embedding(
        [MIXTURE_MSE], model="gaussian-mixture", prior="norm", seed=0, steps=3, iterations=2),
    "unknown prior": lambda c: c.optimize_embedding([TO_THREE], prior="laplace", seed=0, steps=3,
                                                    iterations=2),
    "keep_best without validation": lambda c: c.finetune_weights(TO_EIGHT, EXAMPLES, keep_best=True,
                                                                 steps=3, iterations=2),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_application_settings_are_invalid_arguments(client, case):
    assert _refused(lambda: REFUSALS[case](client)) == "INVALID_ARGUMENT"
