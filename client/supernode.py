"""Flower's ``flower-supernode``, with its two fixed waits shortened: what cmoe-client runs as the site's SuperNode.

    python -m client.supernode <flower-supernode flags>

Why: Flower 1.42's SuperNode loop (``flwr/supernode/start_client_internal.py``) asks the SuperLink for a
message and, when there is none, sleeps a fixed 3 s (``time.sleep(3)`` in `start_client_internal`); while a
message is being handled it looks for the ClientApp's reply every 0.5 s (``time.sleep(0.5)`` in
`_push_messages`). Neither is a flag or an environment variable. With a round of a few seconds of training,
the 3 s idle wait alone was a large share of the round (README, "Federation" benchmark). Everything else is
Flower's own program, unchanged: its flags, TLS, node authentication, the Runtime API, the SuperExec secret.

How: the module's ``time`` is replaced by `FastSleeps`, which forwards everything to the real ``time`` and maps
exactly those two sleep constants to `IDLE_SECONDS` and `REPLY_SECONDS` (the 0.5 s wait for a reply's object
contents in `_push_messages` is the same constant, and shortened with it). The idle poll is one small HTTP
request to the SuperLink; at 0.5 s, three sites make six a second. The SuperNode also pulls each message's
objects with Flower's 1 s-and-doubling retry; `fedcommon.flower_internals.quick_object_pulls` shortens it.

Because this depends on Flower's source, `check_flower` runs first and refuses to start, naming the installed
Flower version, unless it is 1.42.* and both sleeps are still where we patch them. `cmoe-client` runs the same
check at start-up, before it starts anything.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

from fedcommon.flower_internals import FlowerMoved, moved, object_pull_problems, quick_object_pulls, version_problems

SUPERNODE_LOOP = "flwr.supernode.start_client_internal"
IDLE_SECONDS = 0.5  # was 3 s: between two asks for a message when the last ask found none
REPLY_SECONDS = 0.05  # was 0.5 s: between two looks for the ClientApp's reply (in memory, no request)
_SHORTENED = {3: IDLE_SECONDS, 0.5: REPLY_SECONDS}


class FastSleeps:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: only ``sleep(3)`` and ``sleep(0.5)``
    change."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(_SHORTENED.get(seconds, seconds))


def check_flower() -> None:
    """`FlowerMoved` naming the installed Flower version unless the SuperNode loop is the one we patch."""
    from flwr.supernode import start_client_internal as loop

    problems = version_problems()
    for function, needle in (("start_client_internal", "time.sleep(3)"), ("_push_messages", "time.sleep(0.5)")):
        source = inspect.getsource(getattr(loop, function)) if hasattr(loop, function) else ""
        if needle not in source:
            problems.append(f"flwr.supernode.start_client_internal.{function} no longer calls {needle}")
    if not inspect.ismodule(getattr(loop, "time", None)) and not isinstance(getattr(loop, "time", None), FastSleeps):
        problems.append("flwr.supernode.start_client_internal no longer imports the time module")
    problems += object_pull_problems(SUPERNODE_LOOP)
    if problems:
        raise moved(problems, "cmoe-client's SuperNode (client/supernode.py)")


def patch() -> None:
    """Shorten the SuperNode loop's two waits and its object-pull retries (after `check_flower`)."""
    from flwr.supernode import start_client_internal as loop

    check_flower()
    loop.time = FastSleeps()  # type: ignore[assignment]
    quick_object_pulls(SUPERNODE_LOOP)


def main() -> None:
    try:
        patch()
    except FlowerMoved as problem:
        raise SystemExit(f"error: {problem}") from None
    from flwr.supernode.cli.flower_supernode import flower_supernode

    flower_supernode()


if __name__ == "__main__":
    main()
