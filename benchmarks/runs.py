"""A resumable runner for long studies: many independent runs, one JSON line per finished run.

    results = run_jobs(jobs, fn, "benchmarks/results/study.jsonl", workers=2)

Each job is a dict of JSON values (str, int, float, bool, None, lists of them) that *is* its key: two jobs with the
same fields are the same run. `fn(job)` returns a JSON-serialisable dict. When a run finishes, the line
`{"key": <job>, "result": <its result>, "finished_utc": ...}` is appended to `results_path` and flushed to disk, so
a study killed at any point loses only the runs in flight; rerunning the same command skips every job whose key is
already in the file. A torn last line (a process killed while writing) is ignored when reading. Jobs run in list
order, `workers` at a time in forked processes (each sets one torch thread), and a progress line reports
done/total, elapsed time and an ETA after each run; `cost(job)`, if given, estimates a run's time (seconds or any
relative unit) and the ETA weighs the remaining runs by it. `deadline_s` stops launching new runs that many seconds
after the start (the runs in flight finish and are recorded), for a fixed time budget.

`load_results(path)` returns the finished runs as a list of {"key", "result", "finished_utc"} (the order they
finished); `finished_keys` the set of their canonical keys.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path


def canonical(job: dict) -> str:
    """The job's stable key: its fields as sorted, compact JSON."""
    return json.dumps(job, sort_keys=True, separators=(",", ":"))


def load_results(path: str | os.PathLike) -> list[dict]:
    """Every finished run in `path` (one JSON object per line), skipping a torn or empty line; [] if no file."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "key" in record and "result" in record:
            out.append(record)
    return out


def finished_keys(path: str | os.PathLike) -> set[str]:
    return {canonical(record["key"]) for record in load_results(path)}


def _log(msg: str) -> None:
    print(f"[runs {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _die_with_parent() -> None:
    """In a worker: end when the parent process ends (Linux), so a stopped study leaves no orphan runs behind."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _call(fn_and_job):
    if "torch" in sys.modules:  # one thread per run (a run's own work may set it again)
        sys.modules["torch"].set_num_threads(1)
    fn, job = fn_and_job
    return job, fn(job)


def run_jobs(
    jobs: Iterable[dict],
    fn: Callable[[dict], dict],
    results_path: str | os.PathLike,
    workers: int = 1,
    log: Callable[[str], None] = _log,
    describe: Callable[[dict, dict], str] | None = None,
    cost: Callable[[dict], float] | None = None,
    deadline_s: float | None = None,
) -> list[dict]:
    """Run every job not yet in `results_path`, appending each result as it finishes; return all records of
    `jobs` (finished before or now) in job order. `fn` must be importable by name (a module-level function) when
    `workers` > 1. `describe(job, result)` makes the per-run part of the progress line."""
    jobs = list(jobs)
    keys = [canonical(job) for job in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("run_jobs: two jobs have the same key (identical fields)")
    path = Path(results_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = finished_keys(path)
    todo = [job for job, key in zip(jobs, keys, strict=True) if key not in done]
    cost = cost or (lambda job: 1.0)
    total_cost = sum(map(cost, todo)) or 1.0
    log(f"{len(jobs) - len(todo)}/{len(jobs)} runs already in {path}; {len(todo)} to run, {workers} at a time")
    start, cost_done = time.perf_counter(), 0.0
    deadline = None if deadline_s is None else start + deadline_s
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with path.open("a", encoding="utf-8") as out:  # a torn last line stays torn: start on a fresh line
            out.write("\n")
    with path.open("a", encoding="utf-8") as out:
        for n, (job, result) in enumerate(_imap(fn, todo, workers, deadline), 1):
            record = {"key": job, "result": result, "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())
            cost_done += cost(job)
            elapsed = time.perf_counter() - start
            eta = elapsed * (total_cost - cost_done) / cost_done
            what = describe(job, result) if describe else canonical(job)
            log(
                f"{len(jobs) - len(todo) + n}/{len(jobs)} done, elapsed {_duration(elapsed)}, "
                f"ETA {_duration(eta)}: {what}"
            )
    by_key = {canonical(record["key"]): record for record in load_results(path)}
    return [by_key[key] for key in keys if key in by_key]


def _imap(fn, jobs: list[dict], workers: int, deadline: float | None):
    """(job, fn(job)) in completion order, `workers` at a time (in this process if 1; else each in a fresh forked
    process), none started after `deadline` (a time.perf_counter() value)."""
    started = lambda: deadline is None or time.perf_counter() <= deadline  # noqa: E731
    if workers <= 1:
        for job in jobs:
            if not started():
                return
            yield _call((fn, job))
        return
    context, queue, running = multiprocessing.get_context("fork"), list(jobs), {}
    try:
        while queue or running:
            while queue and len(running) < workers and started():
                job = queue.pop(0)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_child, args=(fn, job, send), daemon=True)
                process.start()
                send.close()
                running[receive] = (process, job)
            if not running:
                return
            for receive in multiprocessing.connection.wait(list(running)):
                process, job = running.pop(receive)
                try:
                    status, value = receive.recv()
                except EOFError:
                    status, value = "error", "the process ended without a result"
                process.join()
                if status == "error":
                    raise RuntimeError(f"run {canonical(job)} failed (exit code {process.exitcode}):\n{value}")
                yield value
    finally:
        for process, _ in running.values():
            process.terminate()


def _child(fn, job: dict, send) -> None:
    _die_with_parent()
    try:
        send.send(("ok", _call((fn, job))))
    except BaseException:
        send.send(("error", traceback.format_exc()))
