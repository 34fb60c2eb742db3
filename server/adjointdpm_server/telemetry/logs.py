"""Logs as JSON lines that a cluster's log pipeline can index, each carrying the request ID, the
call's tenant and the trace ID of the request it belongs to (task threads included: they copy
the request's context).
"""

from __future__ import annotations

import contextvars
import json
import logging

from . import tracing

__all__ = ["REQUEST_ID", "TENANT", "configure_logging", "JsonFormatter"]

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# The call's tenant (from its bearer token; "default" without auth; None: not authenticated),
# set here for the handler and its task threads: logs carry it, the service scopes by it.
TENANT: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                 "msg": record.getMessage(), "request_id": REQUEST_ID.get(),
                 "tenant": TENANT.get() or "-", "trace_id": tracing.trace_id()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: int = logging.INFO, json_lines: bool = True) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
