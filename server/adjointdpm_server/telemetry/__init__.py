"""What the server tells its operators: JSON log lines (``logs``), Prometheus metrics on their
own port (``metrics``) and optional OpenTelemetry spans (``tracing``). No gRPC here: the
request interceptor that feeds them lives at the edge (``wire.telemetry``)."""
