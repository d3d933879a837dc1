"""Options shared by several commands (pip-tools `scripts/options.py` style)."""
from __future__ import annotations

import json
import sys
from typing import Any

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")

profile_option = click.option(
    "--profile", "-p", "profile", default="cpu", show_default=True,
    help="Hardware profile: a shipped name (see `edgeopt profiles list`) or a profile file path.",
)


def emit_json(doc: Any) -> None:
    """Write one JSON document to stdout."""
    json.dump(doc, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def conflicting(flag_a: str, flag_b: str) -> click.UsageError:
    """A usage error that names both flags."""
    return click.UsageError(f"{flag_a} and {flag_b} cannot be used together")
