"""Generated gRPC code for the versioned API ``adjointdpm.v1`` (``scripts/gen_proto.py``)."""
