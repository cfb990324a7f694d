"""The site's refusal log: one line per thing the site refused to do, for its operator.

The checks that refuse (the app-bundle gate, the identity check) run inside Flower's ClientApp processes,
whose output ends up deep in the SuperNode's log. They append one line here instead; `cmoe-client` watches
this file, prints each new line as ``error: ...`` and stops (client.cli.supervise).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REFUSALS_FILE = "refusals.log"  # in the site's --workdir
REFUSAL_LOG_ENV = "CMOE_REFUSAL_LOG"  # cmoe-client sets it for processes that do not know the workdir


def refusal_log(workdir: Path | None = None) -> Path | None:
    """The log of ``workdir``, else the one cmoe-client named in the environment, else None."""
    if workdir is not None:
        return workdir / REFUSALS_FILE
    named = os.environ.get(REFUSAL_LOG_ENV)
    return Path(named) if named else None


def record_refusal(line: str, workdir: Path | None = None) -> None:
    print(f"cmoe-client: {line}", file=sys.stderr, flush=True)
    log = refusal_log(workdir)
    if log is not None:
        with open(log, "a") as handle:
            handle.write(line + "\n")


def new_refusals(log: Path, seen: int) -> list[str]:
    """Lines of ``log`` after the first ``seen`` (none if it does not exist yet)."""
    try:
        return log.read_text().splitlines()[seen:]
    except FileNotFoundError:
        return []
