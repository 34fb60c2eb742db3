"""``triton``: a loss computed by a model on a Triton Inference Server, which returns ∂L/∂x too.

So a loss can live in any framework Triton serves, on another machine, without the server
importing it. The remote model's contract (no batching, ``max_batch_size: 0``):

* input ``x`` (name: param ``input``), FP32, shape (B, C, H, W): the whole batch, images in [0, 1];
* output ``loss`` (param ``loss_output``), shape [B]: each sample's loss, or [1]: the batch's
  total (each sample is then credited total / B in per-sample figures);
* output ``grad`` (param ``grad_output``), shape (B, C, H, W): ∂(sum of loss)/∂x.

Anything else (another shape, NaN or Inf) is refused with InvalidArgument. tritonclient is
imported only when a loss is built, so that importing this module stays cheap.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..errors import InvalidArgument, NotFound, Unavailable
from ._base import LossContext, LossPlugin
from ._remote import LossAnswer, RemoteLoss, check_reply

__all__ = ["TritonLoss"]


def _text(params: Mapping[str, Any], key: str, default: str | None) -> str | None:
    value = params.get(key, default)
    if value is not None and not isinstance(value, str):
        raise InvalidArgument(f"parameter {key!r} must be a string; got {value!r}")
    return value


class TritonLoss(LossPlugin):
    name = "triton"
    description = ("a model on a Triton Inference Server returns the loss of x and its gradient "
                   "(the server is reached over gRPC)")
    params = {
        "url": "host:port of Triton's gRPC endpoint, one the server allows (default: its triton_url)",
        "model": "the model's name on the Triton server (required)",
        "version": "the model version (default: the server's choice)",
        "input": "the model's input tensor that receives x, FP32 (B, C, H, W) (default 'x')",
        "loss_output": "the output holding the loss, shape [B] or [1] (default 'loss')",
        "grad_output": "the output holding ∂loss/∂x, shaped like x (default 'grad')",
        "timeout": "seconds to wait for one answer (default 30)",
    }
    tensors = {}
    domain = "image"

    def __init__(self, context: LossContext, params: Mapping[str, Any],
                 tensors: Mapping[str, torch.Tensor]):
        super().__init__(context, params, tensors)
        default = context.settings.get("triton_url")
        self.url = _text(params, "url", default)
        if not self.url:
            raise InvalidArgument("loss 'triton' needs a Triton gRPC address: the server has no "
                                  "triton_url configured")
        allowed = {default, *(context.settings.get("triton_allowed_urls") or ())} - {None}
        if self.url not in allowed:  # no request may make the server connect anywhere it likes
            raise InvalidArgument(f"loss 'triton': {self.url!r} is not a Triton address this server "
                                  f"allows (--triton-url / --triton-allow)")
        self.model = _text(params, "model", None)
        if not self.model:
            raise InvalidArgument("loss 'triton' needs the parameter 'model' (the model's name)")
        self.version = _text(params, "version", "")
        self.input = _text(params, "input", "x")
        self.loss_output = _text(params, "loss_output", "loss")
        self.grad_output = _text(params, "grad_output", "grad")
        self.timeout = self.number(params, "timeout", 30.0, low=1e-3)
        self.who = f"Triton model {self.model!r} at {self.url}"

        import tritonclient.grpc as grpcclient

        self._client = grpcclient.InferenceServerClient(self.url)  # connects on first use
        self._loss = RemoteLoss(self._ask)

    @classmethod
    def available(cls, settings: Mapping[str, Any]) -> bool:
        return bool(settings.get("triton_url") or settings.get("triton_allowed_urls"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._loss(x)

    def _ask(self, x: np.ndarray, working: torch.dtype) -> LossAnswer:
        """Triton's answer, checked here where it enters the server."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        x = np.ascontiguousarray(x, dtype=np.float32)
        request = grpcclient.InferInput(self.input, list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        outputs = [grpcclient.InferRequestedOutput(n) for n in (self.loss_output, self.grad_output)]
        try:
            reply = self._client.infer(self.model, [request], model_version=self.version,
                                       outputs=outputs, client_timeout=self.timeout)
        except InferenceServerException as e:
            raise self._error(e) from e
        value, grad = reply.as_numpy(self.loss_output), reply.as_numpy(self.grad_output)
        if value is None or grad is None:
            raise InvalidArgument(f"{self.who} did not return the outputs "
                                  f"{self.loss_output!r} and {self.grad_output!r}")
        if value.shape not in ((1,), (x.shape[0],)):
            raise InvalidArgument(f"{self.who} returned a loss of shape {value.shape}; expected "
                                  f"[1] (the batch's loss) or [{x.shape[0]}] (one per sample)")
        if value.shape == (1,):  # np.array: a writable copy of a read-only view
            return check_reply(float(value[0]), np.array(grad), x.shape, self.who, working)
        return check_reply(float(value.astype(np.float64).sum()), np.array(grad), x.shape, self.who,
                           working, value.astype(np.float64))

    def _error(self, e) -> Exception:
        """The server's status, as the error the user acts on: fix the request or retry later."""
        status, message = str(e.status() or ""), e.message()
        text = f"{self.who}: {message}"
        if status.endswith("NOT_FOUND"):  # no such model or version
            return NotFound(text)
        if status.endswith("INVALID_ARGUMENT"):  # wrong input/output names, x's shape
            return InvalidArgument(text)
        return Unavailable(f"{text} ({status or 'no status'})")
