"""`edgeopt bench`: latency and throughput of a package on this host."""
from __future__ import annotations

from pathlib import Path

import click

from .options import emit_json, json_option


@click.command("bench")
@click.argument("package", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--iterations", type=click.IntRange(min=5), default=200, show_default=True, help="Timed runs.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Batch size (default: the package's profile).")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs first.")
@click.option("--public-key", "public_keys", multiple=True, type=click.Path(dir_okay=False),
              help="Also check the signature against this key (repeatable).")
@json_option
def bench(package: Path, iterations: int, batch_size: int | None, warmup: int, public_keys: tuple[str, ...],
          as_json: bool) -> None:
    """Verify PACKAGE's hashes, load it with its runtime and print p50/p90/p99 latency and throughput."""
    from ..pipeline.hostbench import bench_package

    report = bench_package(package, iterations=iterations, batch_size=batch_size, warmup=warmup,
                           public_keys=list(public_keys))
    if as_json:
        emit_json(report)
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    s = report["latency"]
    table = Table(title=f"{report['name']} {report['version']} ({report['runtime']} {report['precision']}, "
                        f"batch {report['batch_size']})")
    for col in ("p50 ms", "p90 ms", "p99 ms", "mean ms", "throughput/s", "iterations"):
        table.add_column(col, justify="right")
    table.add_row(f"{s['p50_ms']:.3f}", f"{s['p90_ms']:.3f}", f"{s['p99_ms']:.3f}", f"{s['mean_ms']:.3f}",
                  f"{s['throughput_ips']:.1f}", str(s["iterations"]))
    con.print(table)
    con.print(report["where"], highlight=False)
