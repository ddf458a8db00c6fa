"""Structured logs: one JSON object per line on stderr."""
from __future__ import annotations

import json
import logging
import sys
import time

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for k, v in vars(record).items():
            if k not in _RESERVED and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def setup(level: str = "info") -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(level.upper())


def get(name: str) -> logging.Logger:
    return logging.getLogger(name)


_ABSL = __import__("re").compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]]+)\] (.*)$")
_LEVELS = {"I": "info", "W": "warning", "E": "error", "F": "critical"}


def capture_native_stderr():
    """gRPC's C core writes its own lines (TLS handshake failures among them)
    to fd 2. Route fd 2 through a thread that passes JSON lines through and
    wraps everything else as a JSON record, so stderr stays one JSON object
    per line."""
    import os
    import threading

    real = os.dup(2)
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler):
            h.setStream(sys.stderr)

    def pump() -> None:
        with os.fdopen(r, "rb") as src:
            for raw in src:
                line = raw.decode(errors="replace").rstrip("\n")
                if not line.startswith("{"):
                    m = _ABSL.match(line)
                    rec = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "level": _LEVELS.get(m.group(1), "info") if m else "info",
                           "logger": "grpc", "msg": m.group(3) if m else line}
                    if m:
                        rec["source"] = m.group(2)
                    if "Handshake failed" in rec["msg"]:
                        rec["level"] = "warning"
                        rec["hint"] = ("a client's TLS handshake failed: it presented no certificate, one not issued "
                                       "by this control plane's CA, or an expired / not yet valid one")
                    line = json.dumps(rec, separators=(",", ":"))
                os.write(real, (line + "\n").encode())

    t = threading.Thread(target=pump, name="stderr-json", daemon=True)
    t.start()

    def finish() -> None:
        """Flush and restore fd 2 (the pump sees EOF and drains)."""
        try:
            sys.stderr.flush()
        except OSError:
            pass
        os.dup2(real, 2)
        t.join(5)

    return finish
