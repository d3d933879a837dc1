"""`edgeopt inspect` and `edgeopt verify`."""
from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from ..package import PackageReader, load_public_key
from .options import emit_json, json_option


@click.command("inspect")
@click.argument("package", type=click.Path(dir_okay=False))
@json_option
def inspect_(package: str, as_json: bool) -> None:
    """Summarize a package (without verifying it); --json prints the manifest."""
    with PackageReader(package) as pkg:
        m = pkg.manifest
        signed = pkg.signature_bytes is not None
    if as_json:
        emit_json(m.model_dump(mode="json"))
        return
    con = Console()
    con.print(f"[bold]{m.name}[/] {m.version}  profile [bold]{m.profile_name}[/]  runtime {m.runtime} "
              f"{m.runtime_version} on {m.device}  precision {m.precision}  {'signed' if signed else 'UNSIGNED'}")
    io = Table(title="tensors")
    for col in ("kind", "name", "dtype", "shape", "layout"):
        io.add_column(col)
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for t in specs:
            io.add_row(kind, t.name, t.dtype, "x".join(map(str, t.shape)), t.layout or "")
    con.print(io)
    if m.validation:
        from .package_cmd import accuracy_summary

        v = m.validation
        con.print("accuracy: " + accuracy_summary(v).replace("\n", "\n  ")
                  + (f"\n  float layers: {len(v.float_layers)}" if v.float_layers else ""), highlight=False)
    if m.benchmark:
        b = m.benchmark
        con.print(f"benchmark (batch {b.batch_size}): p50 {b.optimized.p50_ms:.3f} ms, p99 {b.optimized.p99_ms:.3f} ms, "
                  f"{b.optimized.throughput_ips:.1f}/s, {b.speedup:.2f}x vs fp32"
                  + (f"  [yellow]measured on the host CPU as a proxy for {b.target_device}[/]" if b.host_proxy else ""))
    if m.pruning:
        p = m.pruning
        con.print(f"pruning: {p.ratio:.0%} ({p.importance}{', global' if p.global_pruning else ''}), channels "
                  f"{p.channels_before:,} -> {p.channels_after:,}, parameters {p.params_before:,} -> "
                  f"{p.params_after:,}, FLOPs {p.flops_before:,} -> {p.flops_after:,}; recovery {p.recovery}"
                  + (f", {p.recovery_steps} steps, loss {p.recovery_loss_first:.4f} -> {p.recovery_loss_last:.4f}"
                     if p.recovery_loss_first is not None else ""), highlight=False)
    files = Table(title="files")
    files.add_column("file")
    files.add_column("bytes", justify="right")
    files.add_column("sha256")
    for name, e in m.files.items():
        files.add_row(name, f"{e.size:,}", e.sha256[:16] + "…")
    con.print(files)
    for d in m.decisions:
        con.print(f"- {d}")


@click.command()
@click.argument("package", type=click.Path(dir_okay=False))
@click.option("--public-key", "public_keys", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="Trusted Ed25519 public key (PEM); repeat for several.")
@json_option
def verify(package: str, public_keys: tuple[str, ...], as_json: bool) -> None:
    """Check a package's signature and every file's sha256."""
    keys = [load_public_key(k) for k in public_keys]
    with PackageReader(package) as pkg:
        signer = pkg.verify(keys)
        m = pkg.manifest
    if as_json:
        emit_json({"valid": True, "signer_key_id": signer, "name": m.name, "version": m.version,
                   "files": len(m.files)})
    else:
        click.echo(f"{package}: OK — signature by key {signer}, {len(m.files)} files match their sha256")
