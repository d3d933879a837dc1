"""`edgeopt profiles list` and `edgeopt profile validate|show`."""
from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from ..profile import builtin_profile_paths, load_profile, load_profile_file
from .options import emit_json, json_option


@click.group()
def profiles() -> None:
    """List the shipped hardware profiles."""


@profiles.command("list")
@json_option
def list_(as_json: bool) -> None:
    """List shipped profiles: runtime, device, precision, shapes."""
    rows = []
    for name, path in builtin_profile_paths().items():
        p = load_profile_file(path)
        rows.append({
            "name": name, "device": p.target.device.value,
            "runtimes": [r.runtime + (f":{r.device}" if hasattr(r, "device") else "") for r in p.runtimes],
            "precision": p.precision.mode.value, "shapes": p.shapes.policy.value, "batch_size": p.batch_size,
            "description": p.description, "path": str(path),
        })
    if as_json:
        emit_json(rows)
        return
    table = Table(title="hardware profiles")
    for col in ("name", "device", "runtimes", "precision", "shapes", "batch"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["device"], ", ".join(r["runtimes"]), r["precision"], r["shapes"],
                      str(r["batch_size"]))
    Console().print(table)


@click.group()
def profile() -> None:
    """Check or show one hardware profile."""


@profile.command()
@click.argument("file", type=click.Path(dir_okay=False))
@json_option
def validate(file: str, as_json: bool) -> None:
    """Validate a profile FILE (TOML or YAML) and do nothing else."""
    p = load_profile_file(file)
    if as_json:
        emit_json({"valid": True, "profile": p.to_dict()})
    else:
        click.echo(f"{file}: valid profile {p.name!r} ({p.target.device.value}, {p.precision.mode.value})")


@profile.command()
@click.argument("name_or_file")
def show(name_or_file: str) -> None:
    """Print the full, validated content of a profile as JSON."""
    emit_json(load_profile(name_or_file).to_dict())
