"""`edgeopt agent ...`: write a config, install or roll back locally, list installed models, probe.

Local installs take the state directory's lock, so they never interleave with an install the running
daemon performs; the daemon notices the changed pointer (see ``Store.pointers``).
"""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import click

from ..sdk.cli.options import emit_json, json_option
from ..sdk.errors import InputError

config_option = click.option("--config", "-c", "config_path", required=True,
                             type=click.Path(dir_okay=False, path_type=Path),
                             help="Agent config file (see `edgeopt agent init`).")


@click.group()
def agent() -> None:
    """On-device agent: configure, install packages safely, roll back, inspect."""


@agent.command("init")
@click.option("--device-id", required=True, help="This device's id (one MQTT topic level).")
@click.option("--fleet", required=True, help="Fleet id (one MQTT topic level).")
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True,
              help="mqtt://host:port or mqtts://host:port.")
@click.option("--state-dir", default="/var/lib/edgeopt", show_default=True,
              help="Where packages, pointers and the outbox live.")
@click.option("--api-host", default="127.0.0.1", show_default=True, help="Bind address of the local API.")
@click.option("--api-port", default=8470, show_default=True, type=click.IntRange(0, 65535),
              help="Port of the local API.")
@click.option("--trust-key", "trust_keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PEM public key whose signatures are accepted (repeatable).")
@click.option("--telemetry-interval", default=10.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds between telemetry messages.")
@click.option("--allow-unsigned", is_flag=True, help="Accept unsigned packages (development only).")
@click.option("--group", "groups", multiple=True, help="Deployment group (repeatable).")
@click.option("--command-key", "command_keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The dashboard's command-signing public key (edgeopt-dashboard command-key; repeatable).")
@click.option("--package-url", "package_urls", multiple=True,
              help="Base URL deploy commands may download from: the dashboard's EDGEOPT_PUBLIC_URL + /dl/ "
                   "(repeatable).")
@click.option("--broker-ca", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PEM CA that signed the broker's certificate (mqtts).")
@click.option("--broker-username", default=None, help="This device's broker user name (edgeopt-dashboard "
              "broker-config writes it).")
@click.option("--broker-password", default=None, help="This device's broker password.")
@json_option
def init(device_id, fleet, broker, state_dir, api_host, api_port, trust_keys, telemetry_interval,
         allow_unsigned, groups, command_keys, package_urls, broker_ca, broker_username, broker_password,
         as_json) -> None:
    """Print a commented agent config (TOML) to stdout: edgeopt agent init ... > agent.toml"""
    from .config import render_config

    for key in trust_keys:
        if not key.is_file():
            raise InputError(f"--trust-key {key}: file not found", hint="pass the signer's .pub file")
        from ..sdk.package import load_public_key

        load_public_key(key)  # refuse a private key or garbage now, not at the first install
    for key in command_keys:
        if not key.is_file():
            raise InputError(f"--command-key {key}: file not found",
                             hint="edgeopt-dashboard command-key prints the dashboard's public key")
        from ..sdk.package import load_public_key

        load_public_key(key)
    if broker_ca is not None and not broker_ca.is_file():
        raise InputError(f"--broker-ca {broker_ca}: file not found")
    if not trust_keys and not allow_unsigned:
        raise click.UsageError("give at least one --trust-key (or --allow-unsigned for development)")
    text = render_config(device_id=device_id, fleet=fleet, broker=broker, state_dir=state_dir,
                         trusted_keys=list(trust_keys), api_host=api_host, api_port=api_port,
                         telemetry_interval_s=telemetry_interval, allow_unsigned=allow_unsigned,
                         groups=list(groups), command_keys=list(command_keys), package_urls=list(package_urls),
                         broker_ca=broker_ca, broker_username=broker_username, broker_password=broker_password)
    if as_json:
        import tomllib

        emit_json(tomllib.loads(text))
    else:
        sys.stdout.write(text)


def _events_printer(as_json: bool):
    def show(event: dict) -> None:
        if as_json or not event["ok"]:
            return  # a failure ends the command with its one-line error; printing it here too would repeat it
        mark = "ok" if event["ok"] else "FAILED"
        click.echo(f"{event['event']:<9} {mark:<6} {event['message']}", err=True)

    return show


def _fleet_reporter(config):
    """Queue a local install's events in the agent's outbox, so the fleet sees them too.

    The daemon sends the outbox in order when it is (or next is) connected. Each CLI run is its own
    session, so the dashboard's (device, session, seq) deduplication keeps its events apart.
    """
    from ..sdk import topics
    from ..sdk.telemetry import EventPayload
    from .mqtt import Envelope
    from .outbox import Outbox

    Path(config.state_dir).mkdir(parents=True, exist_ok=True)
    outbox = Outbox(Path(config.state_dir), config.outbox.max_messages)
    envelope = Envelope(config.device_id, session_id=f"cli-{uuid.uuid4().hex[:12]}")
    topic = topics.topic(config.fleet, config.device_id, "events")

    def report(event: dict) -> None:
        fields = {k: v for k, v in event.items() if k in EventPayload.model_fields and k != "kind"}
        fields["details"] = {**(fields.get("details") or {}), "source": "edgeopt agent (local command)"}
        outbox.put(topic, envelope.make(EventPayload, **fields).to_json())

    return report


def _installer(config_path: Path, as_json: bool):
    from .config import load_config
    from .installer import Installer
    from .store import Store

    config = load_config(config_path)
    store = Store(config.state_dir)
    events: list[dict] = []
    printer = _events_printer(as_json)
    report = _fleet_reporter(config)

    def sink(event: dict) -> None:
        events.append(event)
        printer(event)
        report(event)

    return Installer(store, config, on_event=sink), events


def _installed_doc(model) -> dict:
    m = model.manifest
    return {"name": model.name, "version": model.version, "previous_version": model.previous_version,
            "profile": m.profile_name, "runtime": m.runtime, "device": m.device, "precision": m.precision,
            "path": str(model.path)}


@agent.command("install")
@click.argument("package", type=click.Path(dir_okay=False, path_type=Path))
@config_option
@click.option("--rollback", "allow_lower", is_flag=True,
              help="Explicit rollback: allow a version lower than the installed one.")
@json_option
def install(package: Path, config_path: Path, allow_lower: bool, as_json: bool) -> None:
    """Install a package file locally: verify, stage, load, self-test, switch."""
    installer, events = _installer(config_path, as_json)
    installer.store.recover()
    model = installer.install_file(package, rollback=allow_lower)
    if as_json:
        emit_json({"installed": _installed_doc(model), "events": events})
    else:
        click.echo(f"installed {model.name} {model.version}"
                   + (f" (previous {model.previous_version})" if model.previous_version else ""))


@agent.command("rollback")
@click.argument("model")
@config_option
@click.option("--version", "version", default=None, help="Version to return to (default: the previous one).")
@json_option
def rollback(model: str, config_path: Path, version: str | None, as_json: bool) -> None:
    """Return MODEL to its previous installed version (re-verified and self-tested first)."""
    installer, events = _installer(config_path, as_json)
    installer.store.recover()
    result = installer.rollback(model, version)
    if as_json:
        emit_json({"installed": _installed_doc(result), "events": events})
    else:
        click.echo(f"{result.name} now at {result.version}")


@agent.command("list")
@config_option
@json_option
def list_(config_path: Path, as_json: bool) -> None:
    """Installed models: current version, previous version and the versions kept on disk."""
    from .config import load_config
    from .store import Store

    store = Store(load_config(config_path).state_dir)
    rows = []
    for name, model in sorted(store.installed().items()):
        doc = _installed_doc(model)
        doc["versions"] = store.versions(name)
        rows.append(doc)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no models installed")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "current", "previous", "on disk", "profile", "runtime", "device", "precision")
    for r in rows:
        table.add_row(r["name"], r["version"], r["previous_version"] or "-", ", ".join(r["versions"]),
                      r["profile"], r["runtime"], r["device"], r["precision"])
    Console().print(table)


@agent.command("probe")
@json_option
def probe_cmd(as_json: bool) -> None:
    """What this device is and which runtimes and devices it has (as the agent reports it)."""
    from .probe import probe

    caps = probe()
    if as_json:
        emit_json(caps)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("item", "value", show_header=False)
    mem = caps.get("memory_bytes")
    table.add_row("os", f"{caps['os']} {caps['os_release']}")
    table.add_row("arch", str(caps["arch"]))
    table.add_row("cpu", str(caps["cpu_model"]))
    table.add_row("cores", f"{caps['cores_logical']} logical, {caps['cores_physical']} physical")
    table.add_row("memory", f"{mem / 1024**3:.1f} GiB" if mem else "?")
    table.add_row("cpu flags", f"{len(caps['cpu_flags'])} (avx2: {'yes' if 'avx2' in caps['cpu_flags'] else 'no'}, "
                               f"avx512f: {'yes' if 'avx512f' in caps['cpu_flags'] else 'no'})")
    from rich.markup import escape

    for name, rt in caps["runtimes"].items():
        value = f"{rt['version']}: {', '.join(rt['devices'])}" if rt.get("available") else f"unavailable ({rt['reason']})"
        # escaped: rich would take "[agent-openvino]" in the install hint for markup and drop it
        table.add_row(name, escape(value))
    Console().print(table)
    if json.dumps(caps["openvino_devices"]) == '["CPU"]':
        click.echo("OpenVINO sees only the CPU here: packages for the igpu or npu profiles are refused.", err=True)


@agent.command("profile")
@click.argument("model")
@config_option
@click.option("--runs", type=click.IntRange(min=1, max=200), default=30, show_default=True,
              help="Profiled runs on the golden input (each layer's time is the median).")
@click.option("--deadline", "deadline_s", type=click.FloatRange(min=0.1, max=600), default=20.0, show_default=True,
              help="Stop profiling after this many seconds (after at least one run).")
@click.option("--trace", type=click.Path(dir_okay=False, path_type=Path), help="Write a Chrome trace JSON here.")
@click.option("--send", is_flag=True, help="Also queue the result as a 'profile' event for the dashboard.")
@click.option("--top", type=click.IntRange(min=1), default=15, show_default=True, help="Layers shown.")
@json_option
def profile_cmd(model: str, config_path: Path, runs: int, deadline_s: float, trace: Path | None, send: bool,
                top: int, as_json: bool) -> None:
    """Per-layer profile of MODEL's current version on this device, while the agent keeps serving it.

    Runs on a second load of the model with one inference thread, on the package's golden input, for at most
    --runs runs and --deadline seconds; compares with the host profile in the package's manifest.
    """
    from ..sdk.errors import InputError
    from ..sdk.layers import chrome_trace, compare, fmt_flops, top_layers
    from .config import load_config
    from .profile import artifact, profile_installed
    from .store import Store

    config = load_config(config_path)
    installed = Store(config.state_dir).current(model)
    if installed is None:
        raise InputError(f"model {model!r} is not installed here", hint="see installed models with: edgeopt agent list")
    doc, raw = profile_installed(installed, config, runs=runs, deadline_s=deadline_s)
    host = installed.manifest.host_profile
    comparison = compare(doc, host) if host else None
    if trace is not None:
        from ..sdk.cli.bench_cmd import _write_atomic

        _write_atomic(trace, json.dumps(chrome_trace(doc, raw)))
    if send:
        details = artifact(doc, raw, host)
        _fleet_reporter(config)({"event": "profile", "ok": True, "model": installed.name,
                                 "version": installed.version, "from_version": None, "command_id": None,
                                 "deployment_id": None, "details": details,
                                 "message": f"profile: {doc['layer_sum_ms']:.3f} ms over {doc['runs']} runs"})
    if as_json:
        emit_json({"profile": doc, "comparison": comparison})
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    table = Table(title=f"{installed.name} {installed.version} on this device: top {top} of {len(doc['layers'])} "
                        f"layers ({doc['runtime']} {doc['device']}, {doc['runs']} runs)")
    for col in ("layer", "op type", "ran in", "median µs", "share", "FLOPs"):
        table.add_column(col, justify="left" if col in ("layer", "op type", "ran in") else "right")
    for r in top_layers(doc, top):
        table.add_row(r["name"][:48], r["op_type"], r["precision"], f"{r['median_us']:.1f}", f"{r['share']:.1%}",
                      fmt_flops(r["flops"]))
    con.print(table)
    con.print(f"sum of layer medians {doc['layer_sum_ms']:.3f} ms", highlight=False)
    if comparison:
        con.print(f"host profile in the manifest: {comparison['baseline_total_ms']} ms; here {comparison['total_ms']} "
                  f"ms", highlight=False)
        for key in ("precision_changed", "silent_precision"):
            if comparison[key]:
                con.print(f"{key.replace('_', ' ')}: {', '.join(comparison[key][:8])}", highlight=False)
    else:
        con.print("the package's manifest has no host profile to compare with", highlight=False)
    if trace is not None:
        con.print(f"trace: {trace}", highlight=False)
