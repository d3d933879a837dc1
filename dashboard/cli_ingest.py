"""``edgeopt-dashboard dead-letters ...`` and ``edgeopt-dashboard ingest-status``: what the ingest set
aside, and whether its processes are alive (registered on the main group in ``cli.py``)."""
from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone

import click

from edgeopt.sdk.cli.options import emit_json, json_option
from edgeopt.sdk.errors import InputError, UnavailableError

database_option = click.option(
    "--database-url", envvar="EDGEOPT_DATABASE_URL", default=None, metavar="URL",
    help="sqlite:///path.db or postgresql+psycopg://user@host/db (default: EDGEOPT_DATABASE_URL, "
         "else SQLite in the data directory).")


def _engine(url: str | None):
    from .cli import _engine as engine, _require_schema

    eng = engine(url)
    _require_schema(eng)
    return eng


@click.group("dead-letters")
def dead_letters_group() -> None:
    """Messages the ingest could not accept, kept for inspection (malformed, too deep, NUL, timestamp out
    of window, refused by the database)."""


@dead_letters_group.command("list")
@click.option("--reason", default=None, help="Only this reason (e.g. too_deep, bad_json, ts_out_of_window).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000), help="At most this many.")
@click.option("--before-id", default=None, type=click.IntRange(1), help="Older than this id (paging).")
@database_option
@json_option
def list_cmd(reason, limit, before_id, database_url, as_json) -> None:
    """List dead letters, newest first, with a count per reason."""
    from sqlalchemy.orm import Session

    from . import dead_letters

    with Session(_engine(database_url)) as session:
        rows = dead_letters.list_letters(session, reason=reason, limit=limit, before_id=before_id)
        totals = dead_letters.summary(session)
    if as_json:
        emit_json({"totals": totals, "items": rows})
        return
    for r in rows:
        click.echo(f"{r['id']}  {r['received_at']}  {r['reason']}  {r['topic']}  {r['payload_bytes']} bytes  "
                   f"{r['error']}")
    click.echo("totals: " + (", ".join(f"{k}={v}" for k, v in totals.items()) or "none"), err=True)


@dead_letters_group.command("show")
@click.argument("letter_id", type=click.IntRange(1))
@click.option("--raw", is_flag=True, help="Write the payload bytes as received to stdout, nothing else.")
@database_option
@json_option
def show_cmd(letter_id, raw, database_url, as_json) -> None:
    """Show one dead letter and its payload (escaped; --raw for the bytes)."""
    from sqlalchemy.orm import Session

    from . import dead_letters

    with Session(_engine(database_url)) as session:
        d = dead_letters.get(session, letter_id)
        if d is None:
            raise InputError(f"no dead letter with id {letter_id}", hint="list them: edgeopt-dashboard dead-letters list")
        doc = dict(id=d.id, received_at=d.received_at.isoformat(), reason=d.reason, error=d.error, topic=d.topic,
                   ingest=d.ingest, payload_bytes=d.payload_bytes, payload_kept=len(d.payload),
                   payload=d.payload.decode("utf-8", "backslashreplace"))
    if raw:
        sys.stdout.buffer.write(d.payload)
    elif as_json:
        emit_json(doc)
    else:
        for k, v in doc.items():
            click.echo(f"{k}: {v}")


@dead_letters_group.command("purge")
@click.option("--older-than-days", default=None, type=click.FloatRange(0), help="Only those older than this.")
@click.option("--reason", default=None, help="Only this reason.")
@click.option("--all", "purge_all", is_flag=True, help="Every dead letter (needed when no filter is given).")
@database_option
@json_option
def purge_cmd(older_than_days, reason, purge_all, database_url, as_json) -> None:
    """Delete dead letters (retention also deletes them after --dead-letter-days)."""
    from sqlalchemy.orm import Session

    from . import dead_letters

    if older_than_days is None and reason is None and not purge_all:
        raise click.UsageError("give --older-than-days, --reason or --all")
    before = datetime.now(timezone.utc) - timedelta(days=older_than_days) if older_than_days is not None else None
    with Session(_engine(database_url)) as session, session.begin():
        n = dead_letters.purge(session, before=before, reason=reason)
    if as_json:
        emit_json({"deleted": n})
    else:
        click.echo(f"deleted {n} dead letters")


@click.command("ingest-status")
@database_option
@json_option
def ingest_status(database_url, as_json) -> None:
    """Health of the ingest processes (their own reports); exits 8 unless every one is alive and healthy."""
    from sqlalchemy.orm import Session

    from .ingest_health import summary

    with Session(_engine(database_url)) as session:
        doc = summary(session, datetime.now(timezone.utc), details=True)
    if as_json:
        emit_json(doc)
    else:
        for p in doc["list"]:
            d = p["details"]
            state = "healthy" if p["healthy"] else "STALE" if p["stale"] else "UNHEALTHY"
            click.echo(f"{p['client_id']}  pid {p['pid']}  {state}  beat {p['beat_age_s']} s ago  "
                       f"connected={d.get('connected')} database={d.get('database')} in_hand={d.get('in_hand')} "
                       f"restarts={sum(d.get('restarts', {}).values())}")
    if doc["status"] != "ok":
        raise UnavailableError(f"ingest is {doc['status']}: {doc['healthy']} of {doc['processes']} processes healthy",
                               hint="see the ingest logs; edgeopt-dashboard ingest-status --json for details")
