"""Who may command this agent: signature, target, validity window and replay checks on every ``cmd``.

:class:`CommandVerifier` turns a raw ``cmd`` message into a :class:`CommandPayload` or raises
:class:`CommandRefused`. The stateless checks are the contract's (:func:`edgeopt.sdk.command_signing.
verify_command`); replay protection is here: every accepted command's id and nonce are recorded in
``<state_dir>/control.db`` (SQLite, committed before the command runs) until its expiry plus the allowed
clock skew, so neither a second delivery nor an agent restart reopens the window. After expiry the
signature check refuses the message anyway, which is why forgetting then is safe.

:class:`RefusalReporter` counts refusals by reason and reports them as ``refused`` events, at most one
every ``min_interval_s`` (the next one carries how many were folded into it): a flood of forged commands
must not push real telemetry out of the bounded outbox. A refused command never gets a ``cmd/result``:
its id is unverified, and answering it would let a forger mark a real deployment's command as failed.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..sdk.command_signing import CommandRefused, verify_command
from ..sdk.package import key_id, load_public_key
from ..sdk.telemetry import CommandPayload, EventPayload

log = logging.getLogger(__name__)

MAX_REMEMBERED = 200_000  # commands within their lifetime; beyond it new commands are refused, never forgotten


class ReplayGuard:
    """Ids and nonces of accepted commands, kept on disk until they expire."""

    def __init__(self, path: Path, max_remembered: int = MAX_REMEMBERED):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_remembered = max_remembered
        self._lock = threading.Lock()
        # check_same_thread=False: the MQTT command thread records, tests and stop() may read.
        self._db = sqlite3.connect(str(self.path), timeout=10, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA synchronous=FULL")  # a recorded nonce must survive a power cut
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (nonce TEXT PRIMARY KEY, id TEXT NOT NULL UNIQUE, "
                         "forget_after REAL NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS seen_forget ON seen (forget_after)")

    def record(self, cmd: CommandPayload, forget_after: float, now: float) -> None:
        """Remember ``cmd`` until ``forget_after`` (epoch seconds); CommandRefused if it was seen before."""
        with self._lock:
            self._db.execute("DELETE FROM seen WHERE forget_after < ?", (now,))
            (n,) = self._db.execute("SELECT COUNT(*) FROM seen").fetchone()
            if n >= self.max_remembered:
                raise CommandRefused(f"command {cmd.id} refused: {n} unexpired commands remembered already "
                                     "(replay memory full)", "replayed", cmd.id,
                                     hint="lower the dashboard's command lifetime")
            try:
                self._db.execute("INSERT INTO seen (nonce, id, forget_after) VALUES (?, ?, ?)",
                                 (cmd.nonce, cmd.id, forget_after))
            except sqlite3.IntegrityError:
                raise CommandRefused(f"command {cmd.id} was already received: replay refused", "replayed",
                                     cmd.id) from None

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM seen").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CommandVerifier:
    """Checks a raw ``cmd`` message against the agent's ``[control]`` settings and its replay memory."""

    def __init__(self, config: Any, *, clock: Callable[[], float] = time.time):
        control = config.control
        self.fleet, self.device_id = config.fleet, config.device_id
        self.keys = [load_public_key(p) for p in control.trust_keys]
        self.max_skew_s = control.max_clock_skew_s
        self.max_lifetime_s = control.max_command_lifetime_s
        self.clock = clock
        self.replay = ReplayGuard(Path(config.state_dir) / "control.db")
        if not self.keys:
            log.warning("no [control] trust_keys: every command from the dashboard will be refused")
        else:
            log.info("accepting commands signed by key(s) %s", ", ".join(key_id(k) for k in self.keys))

    def verify(self, raw: bytes) -> CommandPayload:
        """The verified command; records it against replay. Raises CommandRefused."""
        now = self.clock()
        cmd = verify_command(raw, self.keys, fleet=self.fleet, device_id=self.device_id,
                             now=datetime.fromtimestamp(now, timezone.utc), max_skew_s=self.max_skew_s,
                             max_lifetime_s=self.max_lifetime_s)
        self.replay.record(cmd, cmd.expires_at.timestamp() + self.max_skew_s, now)
        return cmd

    def close(self) -> None:
        self.replay.close()


class RefusalReporter:
    """Counts refused commands and reports them as rate-limited ``refused`` events."""

    def __init__(self, envelope: Any, emit: Callable[[str, Any], Any], min_interval_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.envelope, self.emit = envelope, emit
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.by_reason: Counter[str] = Counter()
        self._last = float("-inf")
        self._folded = 0
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def refused(self, exc: CommandRefused) -> None:
        """Count one refusal; report it unless one was reported less than ``min_interval_s`` ago."""
        with self._lock:
            self.by_reason[exc.reason] += 1
            now = self.clock()
            if now - self._last < self.min_interval_s:
                self._folded += 1
                log.warning("command refused (%s): %s", exc.reason, exc.one_line())
                return
            folded, self._folded, self._last = self._folded, 0, now
            counts = dict(self.by_reason)
        log.warning("command refused (%s): %s", exc.reason, exc.one_line())
        # command_id stays empty on purpose: the id is unverified (see the module docstring).
        self.emit("events", self.envelope.make(
            EventPayload, event="refused", ok=False, message=f"command refused: {exc.one_line()}",
            details={"reason": exc.reason, "claimed_command_id": exc.claimed_id, "refused_total": sum(counts.values()),
                     "refused_by_reason": counts, "not_reported_separately": folded}))
