"""A real server on a loopback port, with the embedded digits model and the analytic mixture."""

from __future__ import annotations

import pytest

import adjointdpm
from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.wire import build_server


def serve(tmp_path_factory, models=("digits", "gaussian-mixture")):
    """A loopback server with the test limits; the caller stops it."""
    config = ServerConfig(models=models, host="127.0.0.1", port=0,
                          artifact_dir=tmp_path_factory.mktemp("artifacts"), max_active_jobs=2,
                          limits=Limits(max_batch=16, max_steps=200, max_iterations=50,
                                        max_tensor_elements=2**20, client_loss_timeout_s=20))
    return build_server(config)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = serve(tmp_path_factory)
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def client(server):
    with adjointdpm.Client(f"127.0.0.1:{server.port}", timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def rt(server):
    """The server's own runtime: in-process references use the very same resident models."""
    return server.runtime
