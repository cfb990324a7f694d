"""The Flower internals both ends adjust, and the start-up check that they are still where we adjust them.

`flwr` is pinned to the 1.42 series (pyproject.toml). Whatever relies on more than its public API goes through
here or checks itself at start-up (`client.supernode`, `client.executor`) and refuses to run with a
`FlowerMoved` naming the installed version, rather than run with an adjustment that silently stopped applying.

Object pulls. A message travels as a tree of objects (its ArrayRecord's arrays are objects of their own), and a
receiver sees the message before the sender has finished uploading its objects. Flower's ``pull_objects``
(``flwr/supercore/inflatable/inflatable_utils.py``) then retries each missing object after 1, 2, 4, 8, 10, 10 ...
seconds: a reply that is complete a moment after the first try is only read seconds later (we measured 5-17 s
per exchange on a loaded 2-core machine). `quick_object_pulls` makes the caller's ``pull_objects`` retry after
0.05 s, doubling to at most `PULL_BACKOFF_CAP` s, with as many tries per object as give Flower's own total
patience (500 tries x 10 s). Applied where messages are received: the ServerApp's grid (replies, `server.app`)
and the SuperNode (messages for its site, `client.supernode`); the site's executor passes the same settings
itself (`client.executor`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

SUPPORTED_FLOWER = "1.42."
PULL_INITIAL_BACKOFF = 0.05  # seconds before the second try of an object not uploaded yet (Flower: 1 s)
PULL_BACKOFF_CAP = 1.0  # seconds between tries at most (Flower: 10 s)
PULL_SETTINGS = {"initial_backoff": PULL_INITIAL_BACKOFF, "backoff_cap": PULL_BACKOFF_CAP,
                 "max_tries_per_object": 5000}


class FlowerMoved(RuntimeError):
    """The installed Flower is not the one whose internals this project relies on."""


def flower_version() -> str:
    from flwr.supercore.version import package_version

    return str(package_version)


def version_problems() -> list[str]:
    version = flower_version()
    return [] if version.startswith(SUPPORTED_FLOWER) else [f"this project supports flwr {SUPPORTED_FLOWER}*"]


def moved(problems: list[str], where: str) -> FlowerMoved:
    return FlowerMoved(f"installed flwr {flower_version()}: {'; '.join(problems)} (relied on by {where})")


def object_pull_problems(module_name: str) -> list[str]:
    """Why `quick_object_pulls` cannot apply to ``module_name`` (empty: it can)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return [f"no module {module_name}"]
    pull = getattr(module, "pull_objects", None)
    original = getattr(pull, "func", pull)  # already adjusted: the partial's function
    if not callable(original):
        return [f"{module_name} no longer uses pull_objects"]
    parameters = inspect.signature(original).parameters
    missing = [name for name in PULL_SETTINGS if name not in parameters]
    return [f"{module_name}.pull_objects has no {', '.join(missing)}"] if missing else []


def quick_object_pulls(module_name: str) -> None:
    """Make ``module_name``'s ``pull_objects`` retry a missing object quickly (`PULL_SETTINGS`); `FlowerMoved`
    if the module no longer looks as in flwr 1.42. Applying it twice changes nothing."""
    problems = version_problems() + object_pull_problems(module_name)
    if problems:
        raise moved(problems, "fedcommon/flower_internals.py")
    module: Any = importlib.import_module(module_name)
    if not isinstance(module.pull_objects, functools.partial):
        module.pull_objects = functools.partial(module.pull_objects, **PULL_SETTINGS)
