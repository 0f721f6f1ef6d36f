"""What counts as a deprecation notice from the libraries we build on: for the in-process rule (conftest.py) and for
the processes the tests start (their stderr)."""

import re

LIBRARIES = ("transformers", "torch", "peft", "accelerate", "trl")
DEPRECATION = re.compile(r"deprecat|will be removed|removal in v\d", re.IGNORECASE)


def deprecations_in(stderr: str) -> list[str]:
    """Lines of a process's stderr that are a Python FutureWarning/DeprecationWarning as printed
    ("file:line: FutureWarning: ...") or a deprecation that transformers logged ("[transformers] ...")."""
    return [
        line
        for line in stderr.splitlines()
        if re.search(r": (Future|Deprecation|PendingDeprecation)Warning: ", line)
        or (line.startswith("[transformers]") and DEPRECATION.search(line))
    ]
