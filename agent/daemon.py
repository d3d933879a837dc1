"""`edgeopt-agent --config FILE`: the on-device daemon (foreground; systemd runs it).

Start: validate the config, bind the local API port (a port in use is fatal, with one clear line),
recover the state directory after any crash, load every model its ``current`` pointer names, start
serving, connect to the broker (an unreachable broker is NOT fatal: the agent serves and buffers
telemetry in its outbox until the broker returns), then report telemetry every interval and take
commands. A pointer changed by ``edgeopt agent install`` from a shell is noticed and hot-swapped.

Stop (SIGTERM or SIGINT): not ready, last telemetry, ``stopped`` event, outbox flushed (best effort),
retained ``offline`` status, requests already accepted finished.
"""
from __future__ import annotations

import errno
import json
import logging
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import click

from ..sdk.errors import ConfigError, EdgeoptError, ExitCode, InputError, UnavailableError
from ..sdk.telemetry import EventPayload, InstalledPackage
from .commands import CommandHandler
from .config import AgentConfig, load_config
from .control import CommandVerifier
from .metrics import Metrics
from .mqtt import Envelope, MqttLink
from .outbox import Outbox
from .reporter import TelemetryReporter
from .server import AGENT_VERSION, BatchLimits, InferenceServer, ModelRegistry

log = logging.getLogger(__name__)

POINTER_POLL_S = 2.0


class Agent:
    """Everything the daemon runs, wired together; :meth:`start` and :meth:`stop` are the lifecycle."""

    def __init__(self, config: AgentConfig, *, capabilities: dict[str, Any] | None = None):
        from .store import Store

        self.config = config
        self.store = Store(config.state_dir)
        self.metrics = Metrics()
        self.registry = ModelRegistry(self.metrics, BatchLimits.from_config(config.batching))
        self.envelope = Envelope(config.device_id)
        try:
            self.outbox = Outbox(Path(config.state_dir), config.outbox.max_messages)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"state_dir {config.state_dir}: cannot open the outbox: {exc}",
                              hint="check that the folder is writable by the agent's user") from None
        self.metrics.extra_gauges["edgeopt_outbox_pending"] = lambda: len(self.outbox)
        self.metrics.extra_gauges["edgeopt_outbox_dropped"] = lambda: self.outbox.dropped
        # 1 while the state directory's disk is (nearly) full and the outbox drops its oldest messages
        self.metrics.extra_gauges["edgeopt_outbox_disk_full"] = lambda: int(self.outbox.disk_full)
        self.capabilities = capabilities
        self.server: InferenceServer | None = None
        self.link: MqttLink | None = None
        self.installer: Any = None
        self.commands: CommandHandler | None = None
        self.verifier: CommandVerifier | None = None
        self.reporter: TelemetryReporter | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._unloadable: dict[str, str] = {}  # model -> version that failed to load (not retried)

    # ------------------------------------------------------------------ callbacks
    def emit(self, kind: str, payload: Any) -> None:
        assert self.link is not None
        self.link.emit(kind, payload)

    def on_event(self, doc: dict[str, Any]) -> None:
        """Installer events -> EventPayload (with the envelope) -> outbox."""
        self.emit("events", self.envelope.make(EventPayload, **doc))

    def on_switch(self, installed: Any, loaded: Any) -> None:
        """The installer switched a model: new requests go to it, accepted ones finish on the old one."""
        self.registry.swap(installed.name, installed.version, loaded, installed.manifest)
        if self.link is not None and self.link.connected.is_set():
            self.link.publish_status()

    def profile_model(self, model: str, *, runs: int, deadline_s: float, command_id: str | None = None) -> dict:
        """The ``profile`` command: per-layer profile of the current version on a second load (service goes on),
        sent as a ``profile`` event whose details carry the artifact (edgeopt.agent.profile)."""
        from .profile import artifact, profile_installed

        installed = self.store.current(model)
        if installed is None:
            raise InputError(f"model {model!r} is not installed here")
        doc, raw = profile_installed(installed, self.config, runs=runs, deadline_s=deadline_s)
        details = artifact(doc, raw, installed.manifest.host_profile)
        self.on_event({"event": "profile", "ok": True, "model": model, "version": installed.version,
                       "from_version": None, "command_id": command_id, "deployment_id": None, "details": details,
                       "message": f"profile of {model} {installed.version}: layer sum {doc['layer_sum_ms']:.3f} ms, "
                                  f"{doc['runs']} runs"})
        return {"model": model, "version": installed.version, "layer_sum_ms": doc["layer_sum_ms"],
                "runs": doc["runs"]}

    def status_fields(self) -> dict[str, Any]:
        packages = []
        for name, inst in sorted(self.store.installed().items()):
            m = inst.manifest
            packages.append(InstalledPackage(name=name, version=inst.version, profile=m.profile_name,
                                             runtime=m.runtime, precision=m.precision,
                                             previous_version=inst.previous_version))
        return {"agent_version": AGENT_VERSION, "capabilities": self.capabilities or {}, "packages": packages,
                "groups": list(self.config.groups), "tags": list(self.config.tags)}

    # ------------------------------------------------------------------ lifecycle
    def _bind(self) -> InferenceServer:
        host, port = self.config.api.host, self.config.api.port
        try:
            return InferenceServer(self.registry, host, port, self.config.api.event_loop,
                                   limits=self.config.api.http_limits())
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UnavailableError(f"local API port {host}:{port} is already in use",
                                       hint="stop the other process or set [api] port in the config") from None
            raise UnavailableError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                                   hint="check [api] host in the config") from None

    def _load(self, installed: Any) -> None:
        """A version another process switched to, loaded under the start-up crash guard (a load that kills the
        daemon is counted like one at start, and skipped after two)."""
        from .loader import guarded_load, load_installed, skipped_at_start, warm_up

        skip = skipped_at_start(self.store, installed.name, installed.version)
        if skip is not None:
            raise UnavailableError(skip)

        def load() -> Any:
            loaded = load_installed(installed, self.config)
            warm_up(loaded, package_dir=installed.path, manifest=installed.manifest)
            return loaded

        loaded = guarded_load(self.store, installed.name, installed.version, load)
        self.registry.swap(installed.name, installed.version, loaded, installed.manifest)

    def start(self) -> "Agent":
        from .installer import Installer
        self.server = self._bind()  # first: a port in use must fail before anything else happens
        Path(self.config.state_dir).mkdir(parents=True, exist_ok=True)
        if self.capabilities is None:
            self.capabilities = probe_capabilities()
        self.link = MqttLink(self.config, self.envelope, self.outbox, status_fields=self.status_fields)
        self.link.start()
        recovered = self.store.recover()
        self.on_event({"event": "started", "message": f"agent {AGENT_VERSION} started",
                       "details": {"recovered": recovered, "outbox_pending": len(self.outbox)}})
        # Every current version, each under the start-up crash guard; one that does not load (or killed the
        # agent at its last two starts) falls back to its previous version with an error event, and one broken
        # model never keeps the others from serving.
        from .loader import load_serving

        serving = load_serving(self.store, self.config, on_event=self.on_event, recover=False)
        for name, current in sorted(self.store.pointers().items()):
            if name in serving:
                installed, loaded = serving[name]
                self.registry.swap(name, installed.version, loaded, installed.manifest)
            if name not in serving or serving[name][0].version != current:
                self._unloadable[name] = current  # reported by load_serving; retried when the pointer moves
        self.server.start(ready=True)
        log.info("local inference API on %s (%d model(s))", self.server.url, len(self.registry.entries()))
        self.installer = Installer(self.store, self.config, on_event=self.on_event, on_switch=self.on_switch,
                                   capabilities=self.capabilities)
        self.reporter = TelemetryReporter(self.metrics, self.envelope, self.emit, self.config.telemetry_interval_s,
                                          dropped=lambda: self.outbox.dropped).start()
        self.verifier = CommandVerifier(self.config)
        self.commands = CommandHandler(self.envelope, self.emit, verifier=self.verifier,
                                       allowed_urls=self.config.download.allowed_urls, installer=self.installer,
                                       set_interval=self.reporter.set_interval,
                                       set_batching=self.registry.reconfigure,
                                       pending_dir=Path(self.config.state_dir) / "commands",
                                       profiler=self.profile_model)
        interrupted = self.commands.fail_interrupted(
            lambda name: (self.store.current(name).version if self.store.current(name) else None))
        if interrupted:
            log.warning("answered %d command(s) interrupted by the last stop as failed", interrupted)
        self.metrics.extra_gauges["edgeopt_commands_refused_total"] = lambda: self.commands.refusals.total
        self.link.on_command = self.commands.handle
        self._watcher = threading.Thread(target=self._watch_pointers, name="pointer-watch", daemon=True)
        self._watcher.start()
        return self

    def _watch_pointers(self) -> None:
        """Hot-swap models whose pointer another process (`edgeopt agent install`) changed."""
        while not self._stop.wait(POINTER_POLL_S):
            try:
                with self.store.locked(timeout=0):  # an install in progress holds the lock: look next time
                    for name, version in self.store.pointers().items():
                        entry = self.registry.get(name)
                        if version in (entry.version if entry else None, self._unloadable.get(name)):
                            continue  # already serving it, or it failed to load (reported once)
                        installed = self.store.current(name)
                        if installed is None:
                            continue
                        log.info("pointer for %s now names %s: loading it", name, version)
                        try:
                            self._load(installed)
                        except Exception as exc:  # noqa: BLE001 - any failure: reported once, not retried
                            message = (exc.one_line() if isinstance(exc, EdgeoptError)
                                       else f"{type(exc).__name__}: {exc}")
                            self._unloadable[name] = version  # retried when the pointer moves
                            self.on_event({"event": "error", "ok": False, "model": name, "version": version,
                                           "message": f"cannot load {name} {version}: {message}"})
                            continue
                        self.on_event({"event": "switch", "model": name, "version": version,
                                       "from_version": entry.version if entry else None,
                                       "message": f"serving {name} {version} (installed by another process)"})
                        if self.link is not None and self.link.connected.is_set():
                            self.link.publish_status()
            except UnavailableError:
                continue
            except Exception:  # keep watching; a transient read error must not stop hot swaps for good
                log.exception("pointer watch failed")

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Graceful stop: see the module docstring."""
        self._stop.set()
        if self.server is not None:
            self.server.set_ready(False)
        if self.reporter is not None:
            self.reporter.stop()
            try:
                self.reporter.report()
            except Exception:
                log.exception("final telemetry failed")
        if self.commands is not None:
            self.commands.stop()
        if self.link is not None:
            self.on_event({"event": "stopped", "message": "agent stopping"})
            self.link.stop(flush_timeout)
        if self.server is not None:
            self.server.stop()
        self.registry.close()
        if self.verifier is not None:
            self.verifier.close()
        self.outbox.close()


def probe_capabilities() -> dict[str, Any]:
    """The hardware probe, run in a child interpreter.

    Probing imports every runtime (OpenVINO, ONNX Runtime, LiteRT) to list its devices; doing that in
    the daemon would keep ~40 MB of runtimes it may never use resident (measured in BENCHMARKS.md).
    Falls back to probing in-process if the child fails.
    """
    code = "import json; from edgeopt.agent.probe import probe; print(json.dumps(probe(), default=str))"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.warning("probe in a child process failed (%s); probing in-process", exc)
        from .probe import probe

        return probe()


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "-c", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Agent config file (write one with `edgeopt agent init`).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False), help="Log verbosity.")
@click.option("--check", is_flag=True, help="Validate the config and exit (nothing is started).")
def cli(config_path: Path, log_level: str, check: bool) -> None:
    """Run the edgeopt agent in the foreground: local inference API, installs, MQTT telemetry and commands.

    Stop it with SIGTERM or Ctrl-C: it publishes `offline`, flushes its outbox and finishes accepted requests.
    """
    _setup_logging(log_level)
    config = load_config(config_path)
    if check:
        click.echo(f"{config_path}: ok (device {config.device_id}, fleet {config.fleet}, broker {config.broker.url})")
        return
    agent = Agent(config)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    agent.start()
    try:
        agent.wait()
    finally:
        agent.stop()


def main(argv: list[str] | None = None) -> int:
    """Console script entry point: one line and a non-zero exit code for any user-facing error."""
    try:
        cli.main(args=argv, prog_name="edgeopt-agent", standalone_mode=False)
    except click.exceptions.Abort:
        return 130
    except click.ClickException as exc:
        exc.show()
        return ExitCode.USAGE
    except EdgeoptError as exc:
        click.echo(f"edgeopt-agent: error: {exc.one_line()}", err=True)
        return int(exc.exit_code)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
