"""Helpers shared by the CLI commands: input loading and error formatting."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import yaml
from pydantic import BaseModel, ValidationError


def load_structured(path: str) -> Any:
    """YAML or JSON (JSON is YAML) from a file, or '-' for standard input."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise click.ClickException(f"cannot read {path}: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise click.ClickException(f"{path} is not valid YAML or JSON: {e}") from None


def parse_model(model: type[BaseModel], data: Any, source: str) -> Any:
    """Validate, turning pydantic's errors into one line per bad key."""
    if data is None:
        data = {}
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg'].removeprefix('Value error, ')}")
        raise click.ClickException(f"{source} is invalid ({len(lines)} error(s)):\n" + "\n".join(lines)) from None


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))
