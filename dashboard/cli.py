"""``edgeopt-dashboard``: database setup, users and tokens, the ingest process, rollups and the web server.

Every command takes ``--database-url`` (default ``EDGEOPT_DATABASE_URL``, else SQLite in the data
directory). Errors print one line and exit with the code of :class:`edgeopt.sdk.errors.ExitCode`.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from edgeopt.sdk.cli import run_cli
from edgeopt.sdk.cli.options import emit_json, json_option
from edgeopt.sdk.errors import ConfigError, InputError

log = logging.getLogger(__name__)

database_option = click.option(
    "--database-url", envvar="EDGEOPT_DATABASE_URL", default=None, metavar="URL",
    help="sqlite:///path.db or postgresql+psycopg://user@host/db (default: EDGEOPT_DATABASE_URL, "
         "else SQLite in the data directory).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--traceback", is_flag=True, help="Show the full Python traceback on errors.")
def cli(verbose: int, traceback: bool) -> None:
    """edgeopt fleet dashboard: database, users, MQTT ingest, rollups and the web app."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _engine(url: str | None):
    from .db import check_connection, make_engine

    engine = make_engine(url)
    check_connection(engine)
    return engine


def _require_schema(engine) -> None:
    from .db import current_revision, head_revision, redact

    rev = current_revision(engine)
    if rev != head_revision():
        raise ConfigError(f"database {redact(str(engine.url))} is at schema revision {rev or 'none'}, "
                          f"expected {head_revision()}", hint="run: edgeopt-dashboard init-db")


@cli.command("init-db")
@database_option
@json_option
def init_db_cmd(database_url: str | None, as_json: bool) -> None:
    """Create the database schema or upgrade it to this version (alembic upgrade head)."""
    from .db import database_url as resolve, init_db, redact

    url = resolve(database_url)
    rev = init_db(url)
    if as_json:
        emit_json({"database": redact(url), "revision": rev})
    else:
        click.echo(f"database {redact(url)} is at revision {rev}")


def _read_password(password: str | None) -> str:
    if password is None:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


@cli.command("create-user")
@click.argument("username")
@click.option("--role", type=click.Choice(["viewer", "operator", "admin"]), default="viewer", show_default=True,
              help="viewer reads; operator also deploys and edits alert rules; admin also manages users.")
@click.option("--password", default=None, help="The password (prompted for when omitted; at least 8 characters).")
@click.option("--update", is_flag=True, help="Change the password and role of an existing user.")
@database_option
@json_option
def create_user(username: str, role: str, password: str | None, update: bool, database_url: str | None,
                as_json: bool) -> None:
    """Create a dashboard user (or change one with --update, which also ends the user's browser sessions)."""
    from sqlalchemy import delete, select
    from sqlalchemy.orm import Session

    from . import models as m
    from .security import MIN_PASSWORD_LENGTH, hash_password

    if not username or len(username) > 64 or not username.isprintable() or username.strip() != username:
        raise InputError(f"invalid user name {username!r}", hint="use 1-64 printable characters, no spaces around")
    engine = _engine(database_url)
    _require_schema(engine)
    with Session(engine) as session, session.begin():
        user = session.scalars(select(m.User).where(m.User.username == username)).first()
        if user is not None and not update:
            raise InputError(f"user {username!r} already exists", hint="pass --update to change it")
        if user is None and update:
            raise InputError(f"user {username!r} does not exist", hint="leave out --update to create it")
        pw = _read_password(password)
        if len(pw) < MIN_PASSWORD_LENGTH:
            raise InputError(f"password too short: expected at least {MIN_PASSWORD_LENGTH} characters, "
                             f"found {len(pw)}", hint="choose a longer password")
        if user is None:
            user = m.User(username=username, role=role, password_hash=hash_password(pw))
            session.add(user)
        else:
            user.role, user.password_hash = role, hash_password(pw)
            # the old password's browser sessions end with it
            session.execute(delete(m.LoginSession).where(m.LoginSession.user_id == user.id))
    if as_json:
        emit_json({"username": username, "role": role, "updated": update})
    else:
        click.echo(f"user {username} ({role}) {'updated' if update else 'created'}")


@cli.command("create-token")
@click.argument("username")
@click.option("--name", default="", help="A label for the token (e.g. the script that uses it).")
@database_option
@json_option
def create_token(username: str, name: str, database_url: str | None, as_json: bool) -> None:
    """Create an API token for USERNAME and print it once (only its hash is stored)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from . import models as m
    from .security import new_token

    engine = _engine(database_url)
    _require_schema(engine)
    with Session(engine) as session, session.begin():
        user = session.scalars(select(m.User).where(m.User.username == username)).first()
        if user is None:
            raise InputError(f"user {username!r} does not exist",
                             hint=f"create it first: edgeopt-dashboard create-user {username} --role viewer")
        plain, hashed = new_token()
        session.add(m.ApiToken(user_id=user.id, token_hash=hashed, name=name))
    if as_json:
        emit_json({"username": username, "name": name, "token": plain})
    else:
        click.echo(plain)
        click.echo("Store this token now: it is not shown again. Use it as 'Authorization: Bearer <token>'.",
                   err=True)


def retention_options(f):
    """--raw-hours/--minute-days/--hour-days, shared by `rollup` and `ingest` (which rolls up as it runs)."""
    for opt in reversed([
        click.option("--raw-hours", default=48.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                     help="Keep raw telemetry this many hours."),
        click.option("--minute-days", default=30.0, show_default=True,
                     type=click.FloatRange(min=0, min_open=True), help="Keep 1-minute rollups this many days."),
        click.option("--hour-days", default=400.0, show_default=True,
                     type=click.FloatRange(min=0, min_open=True), help="Keep 1-hour rollups this many days."),
    ]):
        f = opt(f)
    return f


@cli.command()
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True, envvar="EDGEOPT_BROKER",
              help="MQTT broker URL of the ingest account: mqtt://host:port or mqtts://user:password@host:8883.")
@click.option("--broker-ca", default=None, envvar="EDGEOPT_BROKER_CA", type=click.Path(dir_okay=False),
              help="PEM CA of the broker's certificate (mqtts; default: the system's CAs).")
@click.option("--command-broker", default=None, envvar="EDGEOPT_BROKER_URL",
              help="Broker URL of the dashboard account, used to publish later rollout stages (default: "
                   "EDGEOPT_BROKER_URL, else the ingest connection).")
@click.option("--group", default="edgeopt-ingest", show_default=True,
              help="Shared subscription group: processes of one group split the messages ('' = no sharing).")
@click.option("--client-id", default=None,
              help="MQTT client id of this process's persistent session (default: edgeopt-ingest-<host>-<slot>, "
                   "the lowest slot free on this host, so a restarted process resumes its session).")
@click.option("--session-expiry", default=3600, show_default=True, type=click.IntRange(0),
              help="Seconds the broker keeps this process's session (its unacknowledged messages) while it is "
                   "away (0: no persistent session: a kill -9 then loses the messages in hand).")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 50_000),
              help="Write after this many messages...")
@click.option("--flush-ms", default=200, show_default=True, type=click.IntRange(1, 60_000),
              help="...or after this many milliseconds.")
@click.option("--max-buffer", default=100_000, show_default=True, type=click.IntRange(100),
              help="Messages held in memory while the database is unavailable.")
@click.option("--rollup-every", default=30.0, show_default=True, type=click.FloatRange(0),
              help="Seconds between rollups in this process (0: never; run `rollup` separately).")
@click.option("--heartbeat-check", default=5.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds between heartbeat-timeout checks.")
@click.option("--max-ts-ahead", default=86400.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Refuse (dead-letter) payloads whose ts is more than this many seconds ahead of their receipt.")
@click.option("--max-ts-age", default=7 * 86400.0, show_default=True, type=click.FloatRange(0),
              help="Refuse telemetry/events/results whose ts is older than this many seconds at receipt (0: any).")
@click.option("--health-every", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds between this process's health rows (read by /healthz and ingest-status).")
@retention_options
@database_option
def ingest(broker, broker_ca, command_broker, group, client_id, session_expiry, batch_size, flush_ms, max_buffer,
           rollup_every, heartbeat_check, max_ts_ahead, max_ts_age, health_every, raw_hours, minute_days, hour_days,
           database_url) -> None:
    """Run an ingest process: MQTT telemetry, events, results and status into the database.

    Messages are acknowledged to the broker only once committed (or dead-lettered), in a persistent
    session under a stable client id, so a killed process loses nothing: restart it on the same host
    (same data directory) or with the same --client-id. It also advances deployments, signing later stages
    with the dashboard's command key (EDGEOPT_COMMAND_KEY, else the instance folder's): the web processes
    and the ingest must use the same key.
    """
    from .command_signing import load_signer
    from .ingest import IngestService, IngestSettings
    from .rollup import RetentionSettings

    if logging.getLogger().level > logging.INFO:
        logging.getLogger("edgeopt").setLevel(logging.INFO)
    settings = IngestSettings(broker=broker, ca_file=broker_ca, command_broker=command_broker, group=group,
                              client_id=client_id, session_expiry_s=session_expiry,
                              batch_size=batch_size,
                              flush_ms=flush_ms, max_buffer=max_buffer, rollup_every_s=rollup_every,
                              heartbeat_check_s=heartbeat_check, database_url=database_url,
                              max_ts_ahead_s=max_ts_ahead, max_ts_age_s=max_ts_age, health_every_s=health_every,
                              retention=RetentionSettings(raw_hours=raw_hours, rollup_1m_days=minute_days,
                                                          rollup_1h_days=hour_days))
    settings.broker_address()
    signer = load_signer()
    engine = _engine(database_url)
    _require_schema(engine)
    engine.dispose()
    IngestService(settings, signer=signer).run_forever()


@cli.command("broker-config")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write mosquitto.conf, passwd, acl, credentials.json and devices/ into.")
@click.option("--device", "devices", multiple=True, metavar="[FLEET/]DEVICE",
              help="A device account to create (repeatable).")
@click.option("--devices-file", type=click.File("r"), default=None,
              help="A file of [FLEET/]DEVICE lines ('#' comments allowed).")
@click.option("--known-devices", is_flag=True,
              help="Also every device the dashboard database knows (needs --database-url or EDGEOPT_DATABASE_URL).")
@click.option("--fleet", default=None, envvar="EDGEOPT_FLEET", help="Fleet of devices given without one.")
@click.option("--port", default=8883, show_default=True, type=click.IntRange(1, 65535), help="Listener port.")
@click.option("--bind", default="0.0.0.0", show_default=True, help="Listener address.")
@click.option("--public-host", default="localhost", show_default=True,
              help="Host name devices reach the broker by (goes into devices/*.toml).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="PEM server certificate of the listener.")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="PEM private key of --tls-cert.")
@click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="PEM CA that devices verify the broker with (and that signs client certificates).")
@click.option("--tls-generate", "tls_generate", multiple=True, metavar="NAME",
              help="Generate a private CA and a server certificate for NAME (host name or IP; repeatable).")
@click.option("--require-certificate", is_flag=True,
              help="Clients must also present a certificate signed by --tls-ca (in addition to passwords).")
@click.option("--no-tls", is_flag=True, help="Plain MQTT (loopback or tests only: passwords travel in clear).")
@click.option("--rotate", multiple=True, metavar="ACCOUNT",
              help="Give this account a new password (edgeopt-ingest, edgeopt-dashboard or FLEET/DEVICE; repeatable).")
@database_option
@json_option
def broker_config_cmd(out_dir, devices, devices_file, known_devices, fleet, port, bind, public_host, tls_cert, tls_key,
                      tls_ca, tls_generate, require_certificate, no_tls, rotate, database_url, as_json) -> None:
    """Write a Mosquitto configuration: TLS listener, one account per device, ingest and dashboard, and an
    ACL where a device publishes only its own status/telemetry/events/cmd/result and reads only its own cmd.

    Run it again to add devices (existing passwords are kept), revoke the ones left out, or --rotate a
    password; then reload Mosquitto with SIGHUP.
    """
    from .broker_config import TlsFiles, parse_device, write_broker_config

    if tls_generate and (tls_cert or tls_key):
        raise click.UsageError("--tls-generate and --tls-cert/--tls-key exclude each other: pick one")
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if no_tls and (tls_generate or tls_cert):
        raise click.UsageError("--no-tls and --tls-* exclude each other")
    if not (no_tls or tls_generate or tls_cert):
        raise click.UsageError("give --tls-cert/--tls-key, or --tls-generate HOST, or --no-tls (loopback only)")
    if require_certificate and not tls_ca:
        raise click.UsageError("--require-certificate needs --tls-ca (the CA of the client certificates)")
    specs = list(devices)
    if devices_file is not None:
        specs += [ln.split("#", 1)[0].strip() for ln in devices_file if ln.split("#", 1)[0].strip()]
    pairs = [parse_device(spec, fleet) for spec in specs]
    if known_devices:
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from . import models as m

        engine = _engine(database_url)
        _require_schema(engine)
        with Session(engine) as session:
            pairs += [(f, d) for f, d in session.execute(select(m.Device.fleet, m.Device.device_id))]
    if not pairs:
        raise click.UsageError("no device given: use --device, --devices-file or --known-devices")
    tls = TlsFiles(tls_cert, tls_key, tls_ca) if tls_cert else None
    result = write_broker_config(out_dir, pairs, port=port, bind=bind, public_host=public_host, tls=tls,
                                 tls_generate=list(tls_generate) or None, require_certificate=require_certificate,
                                 rotate=list(rotate))
    if as_json:
        emit_json(result.as_dict())
        return
    click.echo(f"wrote {result.conf} ({len(pairs)} device account(s) plus edgeopt-ingest and edgeopt-dashboard); "
               f"added {len(result.added)}, rotated {len(result.rotated)}, revoked {len(result.revoked)}")
    click.echo(f"passwords are in {result.out_dir / 'credentials.json'}; each device's [broker] section in "
               f"{result.out_dir / 'devices'}/", err=True)


@cli.command("command-key")
@click.option("--pem", is_flag=True, help="Print the public key (PEM) instead of its path.")
@json_option
def command_key(pem: bool, as_json: bool) -> None:
    """Show the dashboard's command-signing public key (generated on first use) for the agents'
    [control] trust_keys. The key is EDGEOPT_COMMAND_KEY, else command-signing.key in the instance folder."""
    from cryptography.hazmat.primitives import serialization

    from .command_signing import load_signer

    signer = load_signer()
    public = signer.private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    pub_path = signer.public_path if signer.public_path.is_file() else None
    if as_json:
        emit_json({"key_id": signer.key_id, "private_key": str(signer.path),
                   "public_key": str(pub_path) if pub_path else None, "public_pem": public, "ttl_s": signer.ttl_s})
    elif pem or pub_path is None:
        click.echo(public, nl=False)
    else:
        click.echo(str(pub_path))
        click.echo(f"key id {signer.key_id}: copy this file to each agent and list it in [control] trust_keys",
                   err=True)


@cli.command()
@retention_options
@database_option
@json_option
def rollup(raw_hours, minute_days, hour_days, database_url, as_json) -> None:
    """Roll raw telemetry up into 1-minute and 1-hour buckets and apply retention (idempotent)."""
    from .rollup import RetentionSettings, run_rollup

    engine = _engine(database_url)
    _require_schema(engine)
    stats = run_rollup(engine, retention=RetentionSettings(raw_hours=raw_hours, rollup_1m_days=minute_days,
                                                           rollup_1h_days=hour_days))
    if as_json:
        emit_json(stats.as_dict())
    else:
        click.echo(f"rolled up {stats.raw_rows_scanned} raw rows into {stats.buckets_1m} 1-minute and "
                   f"{stats.buckets_1h} 1-hour buckets; deleted {stats.deleted} expired rows "
                   f"({stats.seconds} s)")


@cli.command()
@database_option
@json_option
def counters(database_url, as_json) -> None:
    """Show the ingest counters (accepted messages by kind, rejections by reason)."""
    from sqlalchemy.orm import Session

    from .stats import ingest_counters

    engine = _engine(database_url)
    _require_schema(engine)
    with Session(engine) as session:
        data = ingest_counters(session)
    if as_json:
        emit_json(data)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("reason", "count")
    for k, v in data.items():
        table.add_row(k, str(v))
    Console().print(table)


@cli.command("seed-demo")
@click.option("--devices", default=20, show_default=True, type=click.IntRange(1, 100_000), help="Simulated devices.")
@click.option("--hours", default=6.0, show_default=True, type=click.FloatRange(min=0, min_open=True, max=48),
              help="History to generate, ending now.")
@click.option("--interval", default=60.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds between telemetry messages of a device.")
@click.option("--fleet", default="demo", show_default=True, help="Fleet name of the simulated devices.")
@database_option
@json_option
def seed_demo(devices, hours, interval, fleet, database_url, as_json) -> None:
    """Fill the database with a simulated fleet (status, telemetry, events) for a demo, then roll it up.

    The payloads are built with the contracts and go through the ingest's own validation and writer.
    """
    from datetime import datetime, timedelta, timezone

    from edgeopt.sdk.telemetry import EventPayload

    from .ingest_writer import BatchWriter, Incoming, prepare
    from .rollup import run_rollup
    from .simulate import SimDevice

    engine = _engine(database_url)
    _require_schema(engine)
    now = datetime.now(timezone.utc)
    start = now - timedelta(hours=hours)
    profiles = ["cpu", "npu", "igpu", "gpu", "arm"]
    # every fifth device (the second first) also serves a small language model, "chat", with text figures
    sims = [SimDevice(f"{fleet}-{i:03d}", fleet=fleet,
                      models=(("digits",) if i % 3 else ("digits", "detector")) + (("chat",) if i % 5 == 1 else ()),
                      median_ms=2.0 + (i % 7), profile=profiles[i % len(profiles)], groups=(f"line-{i % 3 + 1}",),
                      tags=("canary",) if i % 10 == 0 else (), seed=i, text=("chat",) if i % 5 == 1 else ())
            for i in range(devices)]
    writer = BatchWriter(engine)
    items = []
    for d in sims:
        items.append(Incoming(d.topic("status"), d.status("online", ts=start).to_json(), start))
        ev = EventPayload(device_id=d.device_id, session_id=d.session_id, seq=d.next_seq(), ts=start,
                          event="started", message="agent started")
        items.append(Incoming(d.topic("events"), ev.to_json(), start))
    steps = int(hours * 3600 // interval)
    written = 0
    for k in range(steps + 1):
        ts = start + timedelta(seconds=k * interval)
        for d in sims:
            p, _ = d.telemetry(ts=ts, interval_s=interval, requests=20)
            items.append(Incoming(d.topic("telemetry"), p.to_json(), ts))
        if len(items) >= 2000 or k == steps:
            writer.write(prepare(items), now)
            written += len(items)
            items = []
    stats = run_rollup(engine, now=now)
    doc = {"devices": devices, "messages": written, "rollup": stats.as_dict()}
    if as_json:
        emit_json(doc)
    else:
        click.echo(f"seeded {devices} devices with {written} messages over {hours} h; "
                   f"{stats.buckets_1m} 1-minute buckets rolled up")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535), help="Port.")
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 256), help="Worker threads.")
@database_option
def serve(host: str, port: int, threads: int, database_url: str | None) -> None:
    """Run the web app with waitress (use gunicorn for several worker processes)."""
    from . import create_app

    try:
        import waitress
    except ImportError:
        from edgeopt.sdk.errors import missing_extra

        raise missing_extra("waitress", "dashboard") from None
    engine = _engine(database_url)
    _require_schema(engine)
    engine.dispose()
    app = create_app({"DATABASE_URL": database_url} if database_url else None)
    try:
        server = waitress.create_server(app, host=host, port=port, threads=threads, ident="edgeopt")
    except OSError as exc:
        from edgeopt.sdk.errors import UnavailableError

        raise UnavailableError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                               hint="choose another --port, or stop what uses it") from None
    click.echo(f"serving on http://{host}:{port}", err=True)
    server.run()


def _register_ingest_commands() -> None:
    from .cli_ingest import dead_letters_group, ingest_status

    cli.add_command(dead_letters_group)
    cli.add_command(ingest_status)


_register_ingest_commands()


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_cli(cli, argv, prog_name="edgeopt-dashboard"))


if __name__ == "__main__":
    main()
