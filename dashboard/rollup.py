"""Rollups: raw telemetry -> 1-minute buckets -> 1-hour buckets (per device and model) and fleet-wide
buckets per model, plus retention.

A bucket is always RECOMPUTED from the level below (never incremented), so a rerun, an overlap, or two
processes running it give the same rows (rows are read in key order: float sums then come out identical
bit for bit, whatever order an update left the rows in on disk). Which buckets to recompute is found from the raw rows added since
the last run (a watermark on the raw id, rescanned with some overlap because concurrent transactions may
commit ids out of order); late data (an agent draining its outbox) therefore lands in the right bucket.
Histograms (the contract's DDSketch layout, stored packed: :mod:`.histograms`) are merged by adding
the counts of equal keys, so percentiles of any rollup keep the sketch's 1% relative accuracy. The
text-generation figures of language models (TTFT and time-per-output-token sketches, tokens, KV cache) go
the same way, merged by :class:`_TextAgg`, which says how each one is combined.
Run by the ingest process every ``--rollup-every`` seconds and by ``edgeopt-dashboard rollup``.

No stored row can stop it: a row whose ts is more than :data:`MAX_AHEAD` ahead of now (written before
the ingest refused such timestamps: 9999-12-31 made every run fail with OverflowError and the watermark
never moved again) and a row whose histogram or batch sizes are malformed are skipped and counted
(``RollupStats.skipped_rows``), and the watermark moves past them.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import histograms, partitions
from . import models as m

log = logging.getLogger(__name__)

WATERMARK = "rollup_raw_id"
ADVISORY_LOCK = 0x6564676F  # "edgo": one rollup at a time across ingest processes (PostgreSQL)
CHUNK = 1000
MAX_AHEAD = timedelta(days=1)  # raw rows further ahead of now than this are not rolled up


class RetentionSettings(BaseModel):
    """How long each level is kept. Raw rows older than ``raw_hours`` are also never rolled up again."""

    model_config = ConfigDict(extra="forbid")
    raw_hours: float = Field(48, gt=0, description="Raw telemetry kept this many hours.")
    rollup_1m_days: float = Field(30, gt=0, description="1-minute rollups kept this many days.")
    rollup_1h_days: float = Field(400, gt=0, description="1-hour rollups kept this many days.")
    events_days: float = Field(400, gt=0, description="Events and command results kept this many days.")
    dead_letters_days: float = Field(14, gt=0, description="Dead letters (messages the ingest set aside) kept "
                                     "this many days.")


@dataclass
class RollupStats:
    raw_rows_scanned: int = 0
    buckets_1m: int = 0
    buckets_1h: int = 0
    fleet_buckets: int = 0
    skipped_rows: int = 0
    deleted: int = 0
    partitions_created: int = 0
    partitions_dropped: int = 0
    skipped_locked: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def floor_minute(ts: datetime) -> datetime:
    return ts.replace(second=0, microsecond=0)


def floor_hour(ts: datetime) -> datetime:
    return ts.replace(minute=0, second=0, microsecond=0)


def _upsert(session: Session, model, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    table = model.__table__
    ins = postgresql.insert(table) if session.bind.dialect.name == "postgresql" else sqlite.insert(table)
    keys = [c.name for c in table.primary_key.columns]
    stmt = ins.on_conflict_do_update(index_elements=keys, set_={
        c.name: ins.excluded[c.name] for c in table.columns if c.name not in keys})
    for i in range(0, len(rows), CHUNK):
        session.execute(stmt, rows[i:i + CHUNK])


class _TextAgg:
    """A bucket's text-generation figures (issue 14), merged from the rows below that had any:

    - ``ttft`` / ``tpot`` sketches by adding the counts of equal keys (as the latency histogram), so every
      rollup's TTFT and TPOT percentiles keep the sketch's 1% relative accuracy;
    - ``prompt_tokens``, ``generated_tokens`` and ``cancelled`` summed; ``preemptions`` summed over the rows
      that reported them (None when none did: the runtime does not count them);
    - KV cache use: the AVERAGE of the end-of-interval values, weighted by the raw rows behind each (one
      end-of-interval sample says little about a minute; the mean is what the cache held over it), and the
      peak the MAX of the peaks; ``running`` / ``waiting``: the most reported (as queue depth).
    """

    __slots__ = ("ttft", "ttft_ms", "tpot", "tpot_ms", "prompt", "generated", "kv_sum", "kv_n", "kv_peak",
                 "running", "waiting", "cancelled", "preemptions")

    def __init__(self) -> None:
        self.ttft: dict[int, int] = {}
        self.tpot: dict[int, int] = {}
        self.ttft_ms = self.tpot_ms = self.kv_sum = 0.0
        self.prompt = self.generated = self.cancelled = self.kv_n = 0
        self.kv_peak: float | None = None
        self.running: int | None = None
        self.waiting: int | None = None
        self.preemptions: int | None = None

    def add(self, ttft, ttft_ms, tpot, tpot_ms, prompt, generated, kv, kv_peak, running, waiting, cancelled,
            preemptions, weight: int) -> None:
        for pairs, bins in ((ttft, self.ttft), (tpot, self.tpot)):
            for i in range(0, len(pairs), 2):
                bins[pairs[i]] = bins.get(pairs[i], 0) + pairs[i + 1]
        self.ttft_ms += ttft_ms
        self.tpot_ms += tpot_ms
        self.prompt += prompt
        self.generated += generated
        self.cancelled += cancelled
        if kv is not None:
            self.kv_sum += kv * weight
            self.kv_n += weight
        self.kv_peak = _most(self.kv_peak, kv_peak)
        self.running = _most(self.running, running)
        self.waiting = _most(self.waiting, waiting)
        if preemptions is not None:
            self.preemptions = (self.preemptions or 0) + preemptions

    def columns(self, fleet: bool = False) -> dict[str, Any]:
        out = dict(ttft_counts=histograms.pack_pairs(_pairs(self.ttft)), ttft_sum_ms=self.ttft_ms,
                   tpot_counts=histograms.pack_pairs(_pairs(self.tpot)), tpot_sum_ms=self.tpot_ms,
                   prompt_tokens=self.prompt, generated_tokens=self.generated,
                   kv_cache_usage_avg=self.kv_sum / self.kv_n if self.kv_n else None,
                   kv_cache_peak_max=self.kv_peak, cancelled=self.cancelled, preemptions=self.preemptions)
        if not fleet:
            out.update(running_max=self.running, waiting_max=self.waiting)
        return out


NO_TEXT_ROLLUP: dict[str, Any] = dict(ttft_counts=None, ttft_sum_ms=None, tpot_counts=None, tpot_sum_ms=None,
                                      prompt_tokens=None, generated_tokens=None, kv_cache_usage_avg=None,
                                      kv_cache_peak_max=None, running_max=None, waiting_max=None, cancelled=None,
                                      preemptions=None)
NO_TEXT_FLEET = {k: v for k, v in NO_TEXT_ROLLUP.items() if k not in ("running_max", "waiting_max")}


def _most(a, b):
    return b if a is None else a if b is None else max(a, b)


def _pairs(bins: dict[int, int]) -> list[int]:
    out: list[int] = []
    for k in sorted(bins):
        if bins[k]:
            out += (k, bins[k])
    return out


def _clean_text(text):
    """A row's text columns (the ``_TEXT_*`` selections below, in order) checked and converted, or None for a
    row without text figures (``generated_tokens`` NULL). Raises like :func:`_clean_row` for malformed ones."""
    if text is None or text[5] is None:
        return None
    ttft, ttft_ms, tpot, tpot_ms, prompt, generated, kv, kv_peak, running, waiting, cancelled, preempt = text

    def opt(v, kind):
        return None if v is None else kind(v)
    return (histograms.unpack_pairs(ttft), float(ttft_ms or 0.0), histograms.unpack_pairs(tpot),
            float(tpot_ms or 0.0), int(prompt or 0), int(generated), opt(kv, float), opt(kv_peak, float),
            opt(running, int), opt(waiting, int), int(cancelled or 0), opt(preempt, int))


class _Agg:
    __slots__ = ("requests", "errors", "samples", "counts", "sum_ms", "cpu_sum", "cpu_n", "rss_sum", "rss_n",
                 "queue", "batch", "live", "text")

    def __init__(self) -> None:
        self.requests = self.errors = self.samples = self.queue = 0
        self.live: int | None = None  # most live sequences reported (stateful models); None when none was
        self.counts: dict[int, int] = {}
        self.sum_ms = self.cpu_sum = self.rss_sum = 0.0
        self.cpu_n = self.rss_n = 0
        self.batch: dict[str, int] = defaultdict(int)
        self.text: _TextAgg | None = None  # None while no row had text figures

    def add(self, requests, errors, samples, counts, sum_ms, cpu, rss, queue, batch, live=None, text=None,
            weight: int = 1) -> bool:
        """Add one row (``text``: its text-generation columns, see :func:`_clean_text`); False (and nothing
        added) for a row whose values are malformed."""
        try:
            clean = _clean_row(requests, errors, samples, counts, sum_ms, cpu, rss, queue, batch, live, weight)
            clean_text = _clean_text(text)
        except (TypeError, ValueError, AttributeError, OverflowError):
            return False
        self._add(*clean)
        if clean_text is not None:
            if self.text is None:
                self.text = _TextAgg()
            self.text.add(*clean_text, weight=clean[-1])
        return True

    def _add(self, requests, errors, samples, counts, sum_ms, cpu, rss, queue, batch, live, weight) -> None:
        self.requests += requests or 0
        self.errors += errors or 0
        self.samples += samples
        bins = self.counts
        for i in range(0, len(counts), 2):
            k = counts[i]
            bins[k] = bins.get(k, 0) + counts[i + 1]
        self.sum_ms += sum_ms or 0.0
        # Averages of averages are weighted by the rows behind them, so 1 h = mean of every raw sample.
        if cpu is not None:
            self.cpu_sum += cpu * weight
            self.cpu_n += weight
        if rss is not None:
            self.rss_sum += rss * weight
            self.rss_n += weight
        self.queue = max(self.queue, queue or 0)
        if live is not None:
            self.live = live if self.live is None else max(self.live, live)
        for k, v in (batch or {}).items():
            self.batch[str(k)] += int(v)

    def pairs(self) -> list[int]:
        return _pairs(self.counts)

    def row(self, **keys) -> dict[str, Any]:
        return dict(keys, requests=self.requests, errors=self.errors, samples=self.samples,
                    hist_counts=histograms.pack_pairs(self.pairs()), hist_sum_ms=self.sum_ms,
                    cpu_avg=self.cpu_sum / self.cpu_n if self.cpu_n else None,
                    rss_avg=self.rss_sum / self.rss_n if self.rss_n else None,
                    queue_depth_max=self.queue, batch_sizes=dict(self.batch), live_sequences_max=self.live,
                    **(self.text.columns() if self.text else NO_TEXT_ROLLUP))

    def text_columns(self) -> dict[str, Any]:
        """The text columns of a fleet rollup row."""
        return self.text.columns(fleet=True) if self.text else NO_TEXT_FLEET


def _clean_row(requests, errors, samples, counts, sum_ms, cpu, rss, queue, batch, live, weight):
    """A row's values checked and converted before they touch an aggregate (rows are JSON from the database:
    anything written by an older version, or by hand, must not break a whole rollup)."""
    counts = histograms.unpack_pairs(counts)  # ValueError for bytes that are not a valid histogram
    batch = {str(k): int(v) for k, v in (batch or {}).items()}
    return (int(requests or 0), int(errors or 0), int(samples), counts, float(sum_ms or 0.0),
            None if cpu is None else float(cpu), None if rss is None else float(rss), int(queue or 0), batch,
            None if live is None else int(live), int(weight))


def _add(aggs: dict, key, *row, weight: int = 1) -> bool:
    """Add a row to ``aggs[key]``, creating it only for a well-formed row (no empty bucket from a bad one)."""
    agg = aggs.get(key) or _Agg()
    if not agg.add(*row, weight=weight):
        return False
    aggs[key] = agg
    return True


def _lock(session: Session) -> bool:
    if session.bind.dialect.name != "postgresql":
        return True  # SQLite serializes writers itself
    return bool(session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK}))


def _chunks(seq: list, n: int = CHUNK) -> Iterable[list]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def run_rollup(engine: Engine, now: datetime | None = None, retention: RetentionSettings | None = None,
               overlap_ids: int = 10_000, max_raw_rows: int = 500_000) -> RollupStats:
    """Roll up the raw rows added since the last run, then apply retention. Safe to run concurrently."""
    t0 = time.perf_counter()
    now = now or datetime.now(timezone.utc)
    retention = retention or RetentionSettings()
    raw_cutoff = now - timedelta(hours=retention.raw_hours)
    stats = RollupStats()
    with Session(engine) as session, session.begin():
        if not _lock(session):
            stats.skipped_locked = True
            return stats
        state = session.get(m.RollupState, WATERMARK)
        mark = state.value if state else 0
        r = m.TelemetryRaw
        rows = session.execute(select(r.id, r.device_pk, r.model, r.ts)
                               .where(r.id > max(0, mark - overlap_ids)).order_by(r.id).limit(max_raw_rows)).all()
        stats.raw_rows_scanned = len(rows)
        # minute -> devices touched in it (recomputed for every model of those devices)
        minutes: dict[datetime, set[int]] = defaultdict(set)
        ahead = now + MAX_AHEAD
        for _id, dpk, _model, ts in rows:
            if ts > ahead:
                stats.skipped_rows += 1
            elif ts >= raw_cutoff:
                minutes[floor_minute(ts)].add(dpk)
        if stats.skipped_rows:
            log.warning("rollup: %d raw rows with a ts more than %s ahead of now skipped", stats.skipped_rows, MAX_AHEAD)
        hours: dict[datetime, set[int]] = defaultdict(set)
        for minute, devs in sorted(minutes.items()):
            stats.buckets_1m += _recompute_minute(session, minute, sorted(devs))
            hours[floor_hour(minute)].update(devs)
        for hour, devs in sorted(hours.items()):
            stats.buckets_1h += _recompute_hour(session, hour, sorted(devs))
        for minute in sorted(minutes):
            stats.fleet_buckets += _recompute_fleet(session, "1m", minute)
        for hour in sorted(hours):
            stats.fleet_buckets += _recompute_fleet(session, "1h", hour)
        if rows:
            new_mark = max(mark, rows[-1][0])
            if state is None:
                session.add(m.RollupState(name=WATERMARK, value=new_mark, updated_at=now))
            else:
                state.value, state.updated_at = new_mark, now
        if partitions.is_partitioned(session):
            made, dropped, deleted = partitions.maintain(session, now, raw_cutoff)
            stats.partitions_created, stats.partitions_dropped = made, dropped
            stats.deleted = deleted + apply_retention(session, now, retention, raw=False)
        else:
            stats.deleted = apply_retention(session, now, retention)
    stats.seconds = round(time.perf_counter() - t0, 3)
    log.debug("rollup: %s", stats)
    return stats


def _text_cols(r) -> tuple:
    """The text-generation columns of a table, in :func:`_clean_text`'s order."""
    if r is m.TelemetryRaw:
        kv, peak, running, waiting = r.kv_cache_usage, r.kv_cache_peak, r.running_requests, r.waiting_requests
    elif r is m.FleetRollup:
        raise ValueError("fleet rollups are read by the pages, never rolled up further")
    else:
        kv, peak, running, waiting = r.kv_cache_usage_avg, r.kv_cache_peak_max, r.running_max, r.waiting_max
    return (r.ttft_counts, r.ttft_sum_ms, r.tpot_counts, r.tpot_sum_ms, r.prompt_tokens, r.generated_tokens,
            kv, peak, running, waiting, r.cancelled, r.preemptions)


_NT = 12  # len(_text_cols(...))


def _recompute_minute(session: Session, minute: datetime, devices: list[int]) -> int:
    r = m.TelemetryRaw
    aggs: dict[tuple[int, str], _Agg] = {}
    end = minute + timedelta(minutes=1)
    for chunk in _chunks(devices):
        q = select(r.device_pk, r.model, r.requests, r.errors, r.hist_counts, r.hist_sum_ms, r.cpu_percent,
                   r.rss_bytes, r.queue_depth, r.batch_sizes, r.live_sequences, *_text_cols(r)).where(
            r.ts >= minute, r.ts < end, r.device_pk.in_(chunk)).order_by(r.id)
        for row in session.execute(q):
            dpk, model, req, err, counts, sum_ms, cpu, rss, queue, batch, live = row[:-_NT]
            if not _add(aggs, (dpk, model), req, err, 1, counts, sum_ms, cpu, rss, queue, batch, live,
                        tuple(row[-_NT:])):
                log.warning("rollup: malformed raw row of device %s model %r at %s skipped", dpk, model, minute)
    _upsert(session, m.Rollup1m, [a.row(device_pk=d, model=mo, bucket_start=minute)
                                  for (d, mo), a in aggs.items()])
    return len(aggs)


def _recompute_hour(session: Session, hour: datetime, devices: list[int]) -> int:
    r = m.Rollup1m
    aggs: dict[tuple[int, str], _Agg] = {}
    end = hour + timedelta(hours=1)
    for chunk in _chunks(devices):
        q = select(r.device_pk, r.model, r.requests, r.errors, r.samples, r.hist_counts, r.hist_sum_ms,
                   r.cpu_avg, r.rss_avg, r.queue_depth_max, r.batch_sizes, r.live_sequences_max,
                   *_text_cols(r)).where(
            r.bucket_start >= hour, r.bucket_start < end, r.device_pk.in_(chunk)).order_by(
            r.device_pk, r.model, r.bucket_start)
        for row in session.execute(q):
            dpk, model, req, err, n, counts, sum_ms, cpu, rss, queue, batch, live = row[:-_NT]
            if not _add(aggs, (dpk, model), req, err, n, counts, sum_ms, cpu, rss, queue, batch, live,
                        tuple(row[-_NT:]), weight=n):
                log.warning("rollup: malformed 1-minute row of device %s model %r in %s skipped", dpk, model, hour)
    _upsert(session, m.Rollup1h, [a.row(device_pk=d, model=mo, bucket_start=hour)
                                  for (d, mo), a in aggs.items()])
    return len(aggs)


def _recompute_fleet(session: Session, resolution: str, bucket: datetime) -> int:
    r = m.Rollup1m if resolution == "1m" else m.Rollup1h
    aggs: dict[str, _Agg] = {}
    devices: dict[str, set[int]] = defaultdict(set)
    q = select(r.device_pk, r.model, r.requests, r.errors, r.hist_counts, r.hist_sum_ms, *_text_cols(r)).where(
        r.bucket_start == bucket, r.model != "").order_by(r.device_pk, r.model)
    for row in session.execute(q):
        dpk, model, req, err, counts, sum_ms = row[:-_NT]
        # weight 1 per device: the fleet's KV cache use is the mean over its devices
        if _add(aggs, model, req, err, 0, counts, sum_ms, None, None, 0, None, None, tuple(row[-_NT:])):
            devices[model].add(dpk)
    _upsert(session, m.FleetRollup, [dict(resolution=resolution, model=mo, bucket_start=bucket,
                                          devices=len(devices[mo]), requests=a.requests, errors=a.errors,
                                          hist_counts=histograms.pack_pairs(a.pairs()),
                                          hist_sum_ms=a.sum_ms, **a.text_columns())
                                     for mo, a in aggs.items()])
    return len(aggs)


def apply_retention(session: Session, now: datetime, retention: RetentionSettings, raw: bool = True) -> int:
    """Delete rows older than the retention settings; returns how many. ``raw=False`` leaves raw telemetry
    to :func:`partitions.drop_expired` (PostgreSQL drops whole days instead)."""
    n = 0
    cut_raw = now - timedelta(hours=retention.raw_hours)
    cut_1m = now - timedelta(days=retention.rollup_1m_days)
    cut_1h = now - timedelta(days=retention.rollup_1h_days)
    cut_ev = now - timedelta(days=retention.events_days)
    cut_dl = now - timedelta(days=retention.dead_letters_days)
    raw_stmt = [delete(m.TelemetryRaw).where(m.TelemetryRaw.ts < cut_raw)] if raw else []
    for stmt in (*raw_stmt,
                 delete(m.Rollup1m).where(m.Rollup1m.bucket_start < cut_1m),
                 delete(m.Rollup1h).where(m.Rollup1h.bucket_start < cut_1h),
                 delete(m.FleetRollup).where(m.FleetRollup.resolution == "1m", m.FleetRollup.bucket_start < cut_1m),
                 delete(m.FleetRollup).where(m.FleetRollup.resolution == "1h", m.FleetRollup.bucket_start < cut_1h),
                 delete(m.Event).where(m.Event.ts < cut_ev),
                 delete(m.CommandResult).where(m.CommandResult.ts < cut_ev),
                 delete(m.DeadLetter).where(m.DeadLetter.received_at < cut_dl)):
        n += session.execute(stmt.execution_options(synchronize_session=False)).rowcount or 0
    return n
