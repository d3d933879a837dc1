"""The generated secret key is shared by workers that start at the same moment on a fresh instance folder."""
import multiprocessing as mp

from edgeopt.dashboard import _secret_key


def _worker(folder, barrier, out):
    barrier.wait()
    out.put(_secret_key(folder))


def test_concurrent_workers_agree_on_one_key(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEOPT_SECRET_KEY", raising=False)
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(tmp_path / "inst", barrier, out)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    keys = {out.get(timeout=5) for _ in procs}
    assert len(keys) == 1 and len(next(iter(keys))) == 64
    assert (tmp_path / "inst" / "secret_key").read_text() == next(iter(keys))
    assert [p.name for p in (tmp_path / "inst").iterdir()] == ["secret_key"]  # no temp files left
