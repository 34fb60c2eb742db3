"""``adjointdpm-server`` / ``python -m adjointdpm_server``: load the models and serve.

    adjointdpm-server --model digits --port 50051
    adjointdpm-server --model sd15=diffusers:/models/sd-1.5 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from .config import Limits, ServerConfig


def parse_args(argv=None) -> ServerConfig:
    p = argparse.ArgumentParser(prog="adjointdpm-server", description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", dest="models", metavar="[NAME=]SPEC",
                   help="a model to keep resident (repeatable; the first is the default): digits, "
                        "gaussian-mixture, diffusers:/path (default: digits)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=50051, help="0 = any free port (printed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    p.add_argument("--artifact-dir", type=Path, default=Path("artifacts"))
    p.add_argument("--max-concurrent-jobs", type=int, default=1)
    p.add_argument("--workers", type=int, default=32)
    p.add_argument("--triton-url", help="host:port of a Triton server for the 'triton' loss")
    p.add_argument("--clip-model-dir", type=Path, help="a local CLIP directory for 'clip_similarity'")
    p.add_argument("--max-batch", type=int, default=Limits.max_batch)
    p.add_argument("--max-steps", type=int, default=Limits.max_steps)
    p.add_argument("--max-iterations", type=int, default=Limits.max_iterations)
    a = p.parse_args(argv)
    limits = Limits(max_batch=a.max_batch, max_steps=a.max_steps, max_iterations=a.max_iterations)
    return ServerConfig(models=tuple(a.models or ["digits"]), host=a.host, port=a.port,
                        device=a.device, dtype=a.dtype, artifact_dir=a.artifact_dir,
                        max_concurrent_jobs=a.max_concurrent_jobs, workers=a.workers,
                        triton_url=a.triton_url, clip_model_dir=a.clip_model_dir, limits=limits)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    from .server import build_server

    server = build_server(config)
    print(f"adjointdpm-server listening on {config.host}:{server.port}", flush=True)

    def stop(signum, frame):
        server.stop(grace=10.0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.wait()
    sys.exit(0)


if __name__ == "__main__":
    main()
