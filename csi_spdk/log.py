"""Structured (JSON lines) logging and secret redaction.

Each log record becomes one JSON object; fields passed with ``extra={"f": {...}}``
are merged in, so one CSI call is one greppable line. Secrets never reach the
log: ``redact`` blanks every protobuf field that the CSI spec marks
``csi_secret`` (and map values under keys that look like secrets).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from .proto import csi_pb2

_SECRET_HINTS = ("secret", "password", "passwd", "token", "key", "psk", "dhchap")
REDACTED = "***"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "f", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, sort_keys=False)


def setup(level: str = "info") -> None:
    """Configure the root logger once for a process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _is_repeated(field) -> bool:
    # FieldDescriptor.label is gone from newer protobuf; is_repeated replaces it.
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return field.label == field.LABEL_REPEATED


def _is_secret_field(field) -> bool:
    opts = field.GetOptions()
    return opts.HasExtension(csi_pb2.csi_secret) and opts.Extensions[csi_pb2.csi_secret]


def redact(msg: Message) -> dict[str, Any]:
    """Return the message as a dict with every csi_secret field blanked."""
    data = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    _redact_into(msg, data)
    return data


def _redact_into(msg: Message, data: dict[str, Any]) -> None:
    for field, value in msg.ListFields():
        name = field.name
        if name not in data:
            continue
        if _is_secret_field(field):
            data[name] = {k: REDACTED for k in data[name]} if isinstance(data[name], dict) \
                else REDACTED
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if _is_repeated(field):
                for sub, sub_data in zip(value, data[name], strict=False):
                    _redact_into(sub, sub_data)
            else:
                _redact_into(value, data[name])
        elif isinstance(data[name], dict):
            data[name] = redact_mapping(data[name])


def redact_mapping(values: dict[str, Any]) -> dict[str, Any]:
    """Blank map entries whose key looks like a secret (parameters, contexts)."""
    return {
        k: (REDACTED if any(h in k.lower() for h in _SECRET_HINTS) else v)
        for k, v in values.items()
    }
