"""Fault injection for the command-line tests: run `default-moe` in a subprocess, freeze it (SIGSTOP) the moment the
file system shows a chosen state, look at that state, then deliver SIGKILL or SIGTERM. Every wait is bounded."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TIMEOUT = 120  # seconds, for any one wait


class Command:
    """`python -m default_moe.cli ARGV...` in a subprocess, its stdout and stderr in files (readable while it runs)."""

    def __init__(self, argv: list, logs: Path, name: str):
        logs.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.stderr_path = logs / f"{name}.err"
        env = {k: v for k, v in os.environ.items() if k != "DEFAULT_MOE_DEBUG"}  # one-line errors, no tracebacks
        env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        with open(logs / f"{name}.out", "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "default_moe.cli", *map(str, argv)], stdout=out, stderr=err, env=env
            )

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def freeze_when(self, condition, timeout: float = TIMEOUT) -> None:
        """Stop the process (SIGSTOP) as soon as `condition()` is true."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.process.returncode}) first:\n{self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"{self.name}: the kill point never came")
            time.sleep(0.0002)
        os.kill(self.process.pid, signal.SIGSTOP)
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} had exited ({self.process.returncode}) before the kill point")

    def go_on(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def send(self, signum: int) -> None:
        """Deliver `signum` to the (frozen) process and let it run to handle it."""
        os.kill(self.process.pid, signum)
        if signum != signal.SIGKILL:
            self.go_on()

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"{self.name} did not finish:\n{self.stderr()[-3000:]}") from None


def hidden(folder: Path) -> list[str]:
    """The hidden entries of `folder`: what an interrupted write leaves (`.NAME.tmp-*` and the like)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
