"""A real Triton Inference Server (PyTriton's bundled one, on CPU) serving loss models for tests.

Run with the ``.venv-triton`` interpreter (scripts/setup_triton.sh)::

    .venv-triton/bin/python tests/triton_peer/serve_mse_loss.py --grpc-port 8001 --http-port 8000 \
        --metrics-port 8002

Models (no batching: x is the whole batch, shape (B, C, H, W), FP32), each answering
``loss`` [1] and ``grad`` shaped like x, the contract of ``adjointdpm_server.losses._triton``:

* ``mse_loss``: loss = mean((x - target)²), grad = 2 (x - target) / x.size.
* ``mse_per_sample``: loss [B] = each sample's mean((x - target)²), grad = that of their sum.
* ``bad_grad``: the right loss, but grad of shape x.shape[1:] (one sample's).
* ``nan_loss``: loss NaN, the right grad.

Prints ``READY`` once the models are loaded, then serves until killed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import sysconfig

import numpy as np
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def use_own_libpython() -> None:
    """Put this interpreter's LIBDIR first on LD_LIBRARY_PATH for tritonserver and its children.

    Triton's Python backend stub links ``libpython3.11.so.1.0``; without this it may load another
    build (e.g. Debian's 3.11.2 beside a pyenv 3.11.7) and fail on the stdlib it then runs
    (``'_thread.RLock' object has no attribute '_recursion_count'``).
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    rest = os.environ.get("LD_LIBRARY_PATH")
    os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{rest}" if rest else libdir


def mse(x: np.ndarray, target: float) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float64)
    diff = x - target
    loss = np.array([np.mean(diff * diff)], dtype=np.float32)
    return loss, (2.0 * diff / diff.size).astype(np.float32)


def mse_per_sample(x: np.ndarray, target: float) -> tuple[np.ndarray, np.ndarray]:
    diff = x.astype(np.float64) - target
    per = diff[0].size
    return ((diff * diff).reshape(len(x), -1).mean(1).astype(np.float32),
            (2.0 * diff / per).astype(np.float32))


def model(answer):
    """A non-batching infer function: each request carries the whole x."""

    def infer(requests):
        return [dict(zip(("loss", "grad"), answer(request["x"]))) for request in requests]

    return infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--target", type=float, default=0.5)
    args = parser.parse_args()

    def good(x):
        return mse(x, args.target)

    def bad_grad(x):
        loss, grad = mse(x, args.target)
        return loss, np.ascontiguousarray(grad[0])

    def nan_loss(x):
        _, grad = mse(x, args.target)
        return np.array([np.nan], dtype=np.float32), grad

    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=args.grpc_port,
                          http_address="127.0.0.1", http_port=args.http_port,
                          metrics_address="127.0.0.1", metrics_port=args.metrics_port,
                          allow_gpu_metrics=False, exit_timeout_secs=5)
    inputs = [Tensor(name="x", dtype=np.float32, shape=(-1, -1, -1, -1))]
    outputs = [Tensor(name="loss", dtype=np.float32, shape=(1,)),
               Tensor(name="grad", dtype=np.float32, shape=(-1, -1, -1, -1))]
    per_sample_outputs = [Tensor(name="loss", dtype=np.float32, shape=(-1,)), outputs[1]]
    bad_outputs = [outputs[0], Tensor(name="grad", dtype=np.float32, shape=(-1, -1, -1))]

    use_own_libpython()
    # SIGTERM → SystemExit, so that leaving the `with` block stops tritonserver and its stubs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with Triton(config=config) as triton:
        for name, answer, outs in [("mse_loss", good, outputs), ("bad_grad", bad_grad, bad_outputs),
                                   ("nan_loss", nan_loss, outputs),
                                   ("mse_per_sample", lambda x: mse_per_sample(x, args.target),
                                    per_sample_outputs)]:
            triton.bind(model_name=name, infer_func=model(answer), inputs=inputs, outputs=outs,
                        config=ModelConfig(batching=False))
        print("READY", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
