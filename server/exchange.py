"""One exchange with the sites: push the messages, collect the replies at sub-second intervals.

Flower 1.42's `Grid.send_and_receive` over a real SuperLink (``superlink/grid/http_grid.py``) sleeps a fixed 3 s
between pulls, so every exchange waited up to 3 s after the last reply had arrived. Its public
``push_messages`` / ``pull_messages`` let us pull every `POLL_SECONDS` instead, with the same semantics: replies
are collected until each message has one or ``timeout`` seconds have passed (a site that stays silent is then left
out by the strategy, as before). A grid without them (the in-process stand-ins of the tests and benchmarks, which
answer at once) is asked through ``send_and_receive``.

Over the real transport each message's weights travel as one array (`fedcommon.packing`): packed here before the
push, unpacked here after the pull, so the strategy only ever sees named arrays. A reply whose packing does not
unpack is passed on as it came: its weights then fail the coordinator's checks like any malformed reply.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message

from fedcommon.packing import pack, unpack

POLL_SECONDS = 0.1  # one small HTTP request to the SuperLink on loopback; 3 sites' replies arrive within it


def exchange(grid: Any, messages: Iterable[Message], timeout: float, poll: float = POLL_SECONDS) -> list[Message]:
    """The replies to ``messages`` that arrived within ``timeout`` seconds, in arrival order."""
    messages = list(messages)
    if not messages:
        return []
    if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
        return list(grid.send_and_receive(messages, timeout=timeout))
    for message in messages:
        if message.has_content():
            message.content = pack(message.content)
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        arrived = list(grid.pull_messages(waiting))
        for reply in arrived:
            if reply.has_content():
                try:
                    reply.content = unpack(reply.content)
                except ValueError:
                    pass  # left packed: admission refuses its weights (wrong names) as a malformed reply
        replies.extend(arrived)
        waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return replies
