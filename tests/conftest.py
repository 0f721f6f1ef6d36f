"""Two rules for the whole suite.

1. A deprecation fails the test that triggers it. pyproject's `filterwarnings` makes FutureWarning and
   DeprecationWarning errors; the ones we accept, each with its reason, are in deprecations.py (one list for this
   process and for the processes the tests start) and are added here as "ignore" entries. Libraries also announce
   deprecations through their loggers (transformers' `logger.warning_once("... deprecated ...")`, "removal in
   v5.28"); those are not Python warnings, so a handler on the libraries' loggers re-raises each such record as a
   FutureWarning, at the call that logged it, where the same filters decide.
2. Under CI (the environment variable `CI` set), nothing may be skipped for want of a tool or package: the dev
   extras install them all. Only the skips in `SKIPS_ALLOWED_IN_CI` pass; any other skip becomes a failure.

And each test gets torch's intra-op thread count back as it found it: the benchmark code sets one thread, and a
matmul's reduction order (so its last bit) depends on the thread count, which exact comparisons with a fresh
process (its default count) see.
"""

import logging
import os
import warnings

import pytest
import torch

from deprecations import ACCEPTED, DEPRECATION, LIBRARIES

# Reasons a test may skip in CI, and why each is legitimate there.
SKIPS_ALLOWED_IN_CI = {
    # test_cuda_refused_without_a_gpu tests the CPU-only refusal; a GPU runner runs the GPU paths instead.
    "a CUDA device is present",
}


_handler_key = pytest.StashKey[logging.Handler]()


class DeprecationLogToWarning(logging.Handler):
    """Re-raises a library's logged deprecation as a FutureWarning (an error unless accepted)."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record):
        message = record.getMessage()
        if DEPRECATION.search(message):
            warnings.warn(f"{message} (logged by {record.name})", FutureWarning, stacklevel=2)


def pytest_configure(config):
    for pattern in ACCEPTED:  # after pyproject's "error" entries, so these win
        config.addinivalue_line("filterwarnings", f"ignore:{pattern}")
    handler = DeprecationLogToWarning()
    config.stash[_handler_key] = handler
    # Each library's top logger: its modules' records propagate to it (transformers' own root logger does not
    # propagate further unless CI is set, so the root logger would miss it).
    for name in LIBRARIES:
        logging.getLogger(name).addHandler(handler)


def pytest_unconfigure(config):
    handler = config.stash.get(_handler_key, None)
    for name in LIBRARIES:
        logging.getLogger(name).removeHandler(handler)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_skip_in_ci(report):
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if reason not in SKIPS_ALLOWED_IN_CI:
            report.outcome = "failed"
            report.longrepr = f"skipped under CI, where the dev extras are installed: {reason}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _fail_skip_in_ci((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    # A module-level `pytest.importorskip` skips the whole file at collection.
    return _fail_skip_in_ci((yield))


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
