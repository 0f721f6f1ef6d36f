"""A resumable runner for long studies: many independent runs, one JSON line per finished run.

    results = run_jobs(jobs, fn, "benchmarks/results/study.jsonl", workers=2)

Each job is a dict of JSON values (str, int, float, bool, None, lists of them) that *is* its key: two jobs with the
same fields are the same run. `fn(job)` returns a JSON-serialisable dict. When a run finishes, the line
`{"key": <job>, "result": <its result>, "finished_utc": ...}` is appended to `results_path` and flushed to disk, so
a study killed at any point loses only the runs in flight; rerunning the same command skips every job whose key is
already in the file. A torn last line (a process killed while writing) is ignored when reading. Jobs run in list
order, `workers` at a time, each in a fresh forked process (with `workers=1`, in this process), one torch thread
each; a run that raises stops the study with its traceback (the finished runs stay). A progress line reports
done/total, elapsed time and an ETA after each run; `cost(job)`, if given, estimates a run's time (seconds or any
relative unit) and the ETA weighs the remaining runs by it. `deadline_s` stops launching new runs that many seconds
after the start (the runs in flight finish and are recorded), for a fixed time budget.

`run_as_ready(next_job, fn, results_path, ...)` is the same runner for a study whose later runs depend on earlier
results: whenever a worker is free it asks `next_job(running)` (the jobs in flight) for the next run, and ends when
that returns None with nothing running, so a free worker never waits for a stage to end if any known run is left.

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
    `jobs` (finished before or now) in job order. `fn` may be any callable (forked processes inherit it); its
    result goes back through a pipe, so it must pickle. `describe(job, result)` makes the per-run part of the
    progress line."""
    jobs = list(jobs)
    keys = [canonical(job) for job in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("run_jobs: two jobs have the same key (identical fields)")
    path = Path(results_path)
    done = finished_keys(path)
    todo = [job for job, key in zip(jobs, keys, strict=True) if key not in done]
    cost = cost or (lambda job: 1.0)
    total_cost = sum(map(cost, todo)) or 1.0
    log(f"{len(jobs) - len(todo)}/{len(jobs)} runs already in {path}; {len(todo)} to run, {workers} at a time")
    start, cost_done, already = time.perf_counter(), 0.0, len(jobs) - len(todo)
    queue = list(todo)
    next_job = lambda running: queue.pop(0) if queue else None  # noqa: E731
    for n, (job, result) in enumerate(_append(fn, next_job, path, workers, deadline_s), 1):
        cost_done += cost(job)
        elapsed = time.perf_counter() - start
        eta = elapsed * (total_cost - cost_done) / cost_done
        what = describe(job, result) if describe else canonical(job)
        log(f"{already + n}/{len(jobs)} done, elapsed {_duration(elapsed)}, ETA {_duration(eta)}: {what}")
    by_key = {canonical(record["key"]): record for record in load_results(path)}
    return [by_key[key] for key in keys if key in by_key]


def run_as_ready(
    next_job: Callable[[list[dict]], dict | None],
    fn: Callable[[dict], dict],
    results_path: str | os.PathLike,
    workers: int = 1,
    log: Callable[[str], None] = _log,
    describe: Callable[[dict, dict], str] | None = None,
    deadline_s: float | None = None,
) -> int:
    """Run `next_job(running)`'s jobs until it returns None with nothing in flight, `workers` at a time, appending
    each result to `results_path` as it finishes; return how many ran. `next_job` sees the jobs in flight and may
    read `results_path` (every finished run is in it), so it can choose runs from results that arrived meanwhile;
    it must not return a job in flight or finished."""
    start, n = time.perf_counter(), 0
    for n, (job, result) in enumerate(_append(fn, next_job, results_path, workers, deadline_s), 1):
        what = describe(job, result) if describe else canonical(job)
        log(f"{n} done, elapsed {_duration(time.perf_counter() - start)}: {what}")
    return n


def _append(fn, next_job, results_path, workers: int, deadline_s: float | None):
    """(job, fn(job)) of `next_job`'s jobs in completion order (`_imap`), each appended to `results_path` (flushed
    and synced) before it is yielded."""
    path = Path(results_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with path.open("a", encoding="utf-8") as out:  # a torn last line stays torn: start on a fresh line
            out.write("\n")
    deadline = None if deadline_s is None else time.perf_counter() + deadline_s
    with path.open("a", encoding="utf-8") as out:
        for job, result in _imap(fn, next_job, workers, deadline):
            record = {"key": job, "result": result, "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())
            yield job, result


def _imap(fn, next_job, workers: int, deadline: float | None):
    """(job, fn(job)) in completion order for the jobs `next_job(running)` gives while a worker is free, `workers`
    at a time (in this process if 1; else each in a fresh forked process), none started after `deadline` (a
    time.perf_counter() value)."""
    started = lambda: deadline is None or time.perf_counter() <= deadline  # noqa: E731
    if workers <= 1:
        while started() and (job := next_job([])) is not None:
            yield _call((fn, job))
        return
    # fork is cheap, but a forked child cannot use CUDA once the parent has touched it: spawn where there is a GPU.
    method = "spawn" if "torch" in sys.modules and sys.modules["torch"].cuda.is_available() else "fork"
    context, running = multiprocessing.get_context(method), {}
    try:
        while True:
            while len(running) < workers and started():
                job = next_job([job for _, job in running.values()])
                if job is None:
                    break
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
