"""The bidi loss protocol: the servicer sends LossQuery events and the SDK answers each with a
LossReply (term, value, grad, per-sample values) from the client-side loss it names; an unknown
term or a failing loss cancels the call."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

import adjointdpm
import adjointdpm.aio
from adjointdpm import decode_tensor
from adjointdpm.v1 import adjointdpm_pb2 as pb

from ._fake import BIDI, Query, event, result_event

X1 = np.linspace(0, 1, 2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
METHOD = {"ComputeGradient": "compute_gradient", "OptimizeLatent": "optimize_latent",
          "FinetuneWeights": "finetune_weights", "OptimizeEmbedding": "optimize_embedding"}


def _cancelled_before_close(fake, seen: list):
    """A ``_before_close``: whether the fake saw the call cancelled while the channel was open."""
    return lambda: seen.append(fake.cancelled.wait(5))


def _args(rpc, losses):
    return (losses, [{"seed": 0}]) if rpc == "FinetuneWeights" else (losses,)


class Recorder:
    """A numpy loss ``sum(w * x²)`` that records what it was called with."""

    def __init__(self, weight=1.0, per_sample=False):
        self.weight, self.per_sample, self.seen = weight, per_sample, []

    def __call__(self, x):
        self.seen.append(np.array(x))
        per = (self.weight * x.astype(np.float64) ** 2).reshape(x.shape[0], -1).sum(axis=1)
        return (per if self.per_sample else float(per.sum())), 2 * self.weight * x


@pytest.mark.parametrize("rpc", BIDI)
def test_a_numpy_loss_answers_the_query(sdk, fake, rpc):
    fn = Recorder(weight=3.0)
    loss = adjointdpm.ClientLoss(fn, name="sq", autograd=False)
    fake.script(rpc, [Query(term=1, x=X1, name="sq", iteration=0), result_event(rpc)])
    sdk.call(METHOD[rpc], *_args(rpc, [adjointdpm.ServerLoss("other"), loss]))
    received = fake.only(rpc)
    assert received.reply_kinds == ["loss_reply"]
    (reply,) = received.replies
    assert reply.term == 1
    assert reply.value == pytest.approx(3.0 * float(np.sum(X1.astype(np.float64) ** 2)), rel=1e-6)
    grad = decode_tensor(reply.grad)
    assert grad.dtype == np.float32 and grad.shape == X1.shape
    np.testing.assert_allclose(grad, 6.0 * X1, rtol=1e-6)
    assert list(reply.values) == []       # a scalar loss: no per-sample values
    assert len(fn.seen) == 1 and isinstance(fn.seen[0], np.ndarray)
    np.testing.assert_array_equal(fn.seen[0], X1)


def test_per_sample_values_are_sent(sdk, fake):
    fn = Recorder(per_sample=True)
    fake.script("ComputeGradient", [Query(term=0, x=X1), result_event("ComputeGradient")])
    sdk.call("compute_gradient", adjointdpm.ClientLoss(fn, autograd=False))
    (reply,) = fake.only("ComputeGradient").replies
    per = (X1.astype(np.float64) ** 2).reshape(2, -1).sum(axis=1)
    assert list(reply.values) == pytest.approx(per.tolist(), rel=1e-9)
    assert reply.value == pytest.approx(per.sum(), rel=1e-9)  # the term is their sum


def test_many_queries_each_answered_by_its_own_term_in_order(sdk, fake):
    a, b = Recorder(weight=1.0), Recorder(weight=10.0, per_sample=True)
    xs = [X1 * (k + 1) for k in range(3)]
    script = []
    for k, x in enumerate(xs):
        script += [event(progress=pb.Progress(phase="forward", step=1, total=1, iteration=k)),
                   Query(term=0, x=x, iteration=k), Query(term=2, x=x + 1, iteration=k, domain=pb.DOMAIN_LATENT)]
    fake.script("OptimizeLatent", script + [result_event("OptimizeLatent")])
    losses = [adjointdpm.ClientLoss(a, name="a", autograd=False), adjointdpm.ServerLoss("s"),
              adjointdpm.ClientLoss(b, name="b", domain="latent", autograd=False)]
    sdk.call("optimize_latent", losses, iterations=3)
    replies = fake.only("OptimizeLatent").replies
    assert [r.term for r in replies] == [0, 2] * 3
    for k, x in enumerate(xs):
        ra, rb = replies[2 * k], replies[2 * k + 1]
        np.testing.assert_allclose(decode_tensor(ra.grad), 2 * x, rtol=1e-6)
        np.testing.assert_allclose(decode_tensor(rb.grad), 20 * (x + 1), rtol=1e-6)
        assert ra.value == pytest.approx(float(np.sum(x.astype(np.float64) ** 2)), rel=1e-6)
        assert len(rb.values) == 2 and rb.value == pytest.approx(sum(rb.values))
    assert len(a.seen) == len(b.seen) == 3


def test_an_async_loss_in_aio(fake, fake_server):
    calls = []

    async def fn(x):
        await asyncio.sleep(0.001)
        calls.append(x.shape)
        return x.astype(np.float64).reshape(x.shape[0], -1).sum(axis=1), np.full_like(x, 0.5)

    fake.script("ComputeGradient", [Query(term=0, x=X1), Query(term=0, x=2 * X1), result_event("ComputeGradient")])

    async def main():
        async with adjointdpm.aio.Client(fake_server.target) as c:
            return await c.compute_gradient(adjointdpm.ClientLoss(fn, autograd=False))

    assert isinstance(asyncio.run(main()), adjointdpm.GradientResult)
    replies = fake.only("ComputeGradient").replies
    assert len(replies) == 2 and calls == [X1.shape, X1.shape]
    for r, x in zip(replies, (X1, 2 * X1)):
        assert r.term == 0
        assert list(r.values) == pytest.approx(x.astype(np.float64).reshape(2, -1).sum(axis=1).tolist(), rel=1e-6)
        np.testing.assert_array_equal(decode_tensor(r.grad), np.full_like(X1, 0.5))


@pytest.mark.parametrize("term", [0, 1, 7], ids=["server-term", "next-index", "out-of-range"])
def test_an_unknown_term_cancels_and_raises_failed_precondition(sdk, fake, term):
    """Term 0 is a server loss, 1 is no term at all: neither can be answered."""
    fn = Recorder()
    fake.script("ComputeGradient", [Query(term=term, x=X1), result_event("ComputeGradient")])
    losses = [adjointdpm.ServerLoss("s")] if term == 1 else [adjointdpm.ServerLoss("s"),
                                                              adjointdpm.ClientLoss(fn, autograd=False)]
    seen = []
    with pytest.raises(adjointdpm.AdjointDPMError) as err:
        sdk.call("compute_gradient", losses, _before_close=_cancelled_before_close(fake, seen))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details == f"the server asked for unknown client loss term {term}"
    assert seen == [True], "the SDK did not cancel the call"
    assert fake.only("ComputeGradient").replies == [] and fn.seen == []


def test_a_failing_loss_cancels_and_raises_its_error(sdk, fake):
    def broken(x):
        raise ValueError("the loss broke")

    fake.script("OptimizeLatent", [Query(term=0, x=X1), result_event("OptimizeLatent")])
    seen = []
    with pytest.raises(ValueError, match="the loss broke"):
        sdk.call("optimize_latent", adjointdpm.ClientLoss(broken, autograd=False),
                 _before_close=_cancelled_before_close(fake, seen))
    assert seen == [True], "the SDK did not cancel the call"
    assert fake.only("OptimizeLatent").replies == []


def test_a_loss_of_the_wrong_shape_is_a_type_error(sdk, fake):
    fake.script("ComputeGradient", [Query(term=0, x=X1), result_event("ComputeGradient")])
    seen = []
    with pytest.raises(TypeError, match="one value per sample"):
        sdk.call("compute_gradient", adjointdpm.ClientLoss(lambda x: (np.ones(3), x), autograd=False),
                 _before_close=_cancelled_before_close(fake, seen))
    assert seen == [True]


def test_a_registered_loss_is_named_in_the_request_and_answered(sdk, fake):
    @adjointdpm.loss("sdk_test_registered", domain="latent", autograd=False)
    def registered(x):
        return 2.0, np.zeros_like(x)

    fake.script("ComputeGradient", [Query(term=0, x=X1, domain=pb.DOMAIN_LATENT), result_event("ComputeGradient")])
    sdk.call("compute_gradient", "sdk_test_registered")
    received = fake.only("ComputeGradient")
    assert received.request.losses[0] == pb.LossTerm(weight=1.0, client="sdk_test_registered", domain=pb.DOMAIN_LATENT)
    assert received.replies[0].value == 2.0
