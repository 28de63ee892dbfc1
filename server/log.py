"""Structured logs: one JSON object a line (orjson) off a tty, readable text on one.

The text lines are ``HH:MM:SS level logger: message key=value ...``, the
fields written the logfmt way so logfmt readers (and ``grep key=value``)
split them right: a value that is empty or holds a space, a quote, an ``=``
or a control character is double-quoted, with ``"``, ``\\`` and control
characters backslash-escaped (as JSON and Go's strconv.Quote do); any other
value is written bare.

Never log message bodies, one-time codes or secrets: callers pass only
addresses, ids, counts and codes of errors.
"""

from __future__ import annotations

import logging
import re
import sys
import time

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        obj.update(getattr(record, "fields", {}))
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(obj, default=str).decode()


# What makes a logfmt value need quotes: nothing at all, or a space (or any
# character up to it), a quote, an equals sign, DEL.
_NEEDS_QUOTES = re.compile(r'^$|[\x00-\x20"=\x7f]')


def logfmt_value(v) -> str:
    """``v`` as a logfmt value: bare when it can be, else quoted and escaped."""
    if isinstance(v, bool):
        text = "true" if v else "false"
    elif v is None:
        text = "null"
    else:
        text = str(v)
    if _NEEDS_QUOTES.search(text) is None:
        return text
    return orjson.dumps(text).decode()  # JSON escapes: \" \\ \n \u0001 ...


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{k}={logfmt_value(v)}" for k, v in fields.items())
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname.lower():7s} {record.name}: {record.getMessage()}"
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: str = "info", fmt: str = "auto", stream=None) -> None:
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger("pigeon")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def event(logger: logging.Logger, level: int, msg: str, **fields) -> None:
    """Log ``msg`` with structured ``fields`` (never bodies, codes or secrets)."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"fields": fields})
