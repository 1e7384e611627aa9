"""How the ``ipcfw`` command logs: ``--log-level``, ``--log-format text|json`` and
``--log-file PATH`` (default: stderr, where systemd's journal picks it up).

The JSON format is one object per line, for log shippers: ``time`` (ISO 8601, UTC, with
milliseconds), ``level``, ``logger``, ``pid``, ``message``, and ``exception`` (the formatted
traceback) when there is one.
"""

from __future__ import annotations

import datetime
import json
import logging

__all__ = ["FORMATS", "JsonFormatter", "configure"]

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON (see the module)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, form: str = "text", path: str | None = None) -> None:
    """Log at `level` (a name: debug, info, ...), in `form`, to `path` (appended to) or
    stderr. Raises OSError if `path` cannot be opened."""
    handler: logging.Handler = (
        logging.StreamHandler() if path is None else logging.FileHandler(path, encoding="utf-8")
    )
    handler.setFormatter(JsonFormatter() if form == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
