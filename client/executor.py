"""The site's executor: one long-lived process that runs every message of the federation through our ClientApp.

    python -m client.executor --runtime-api 127.0.0.1:PORT --secret-file SECRET --served-log LOG

`cmoe-client` starts it beside the SuperNode (``--isolation process``), supervises it and restarts it if it
exits. With Flower's default isolation, the SuperNode's SuperExec starts a fresh ``flwr-clientapp`` process for
every message, which imports torch, Flower and this package and reopens the bank before any work (~7 s on a
loaded 2-core machine, twice a round). This process imports them once and loops, as Flower's SuperExec and
``flwr-clientapp`` (``flwr/supercore/superexec/run_superexec.py``, ``flwr/supernode/runtime/run_clientapp.py``)
do between them:

1. claim a pending task from the SuperNode's Runtime API (``AcquireTask``, signed with the SuperExec secret that
   cmoe-client wrote for this SuperNode, so no other local process can claim the site's tasks);
2. with the task's token: send heartbeats while it runs, pull the message, the context and the app bundle (FAB);
3. the first time a bundle hash is seen, check the bundle (`client.fab_guard`: our code-free shim at our version,
   else refused, recorded in the refusal log, never installed), install it and load its ClientApp; later
   messages of the same bundle reuse the loaded app;
4. run the ClientApp (mods and handlers of `client.app`), push the reply and the task's final status and context.

A failure in one message (a refused bundle, a handler that raises) becomes that message's error reply, as with
``flwr-clientapp``, and the loop goes on. If this process dies mid-message, the SuperNode answers that message
with Flower's own error once the task's heartbeat lapses; cmoe-client starts a new executor for what follows.
Every served message is two lines in ``--served-log`` (JSON: pid, task, run, message type, round, status), one
when it starts (status ``running``) and one when its reply has left (``completed`` or ``failed``).

These are Flower's internal APIs: `check_flower` refuses to start unless the installed Flower is 1.42.* and has
them (cmoe-client runs it at start-up, before starting anything).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from fedcommon.flower_internals import PULL_SETTINGS, FlowerMoved, moved, version_problems

ACQUIRE_SECONDS = 0.05  # between two asks for a task while none is pending (in memory at the SuperNode)
UNREACHABLE_SECONDS = 1.0  # between two asks while the SuperNode's Runtime API does not answer (it restarts)
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
MESSAGE_WAIT_SECONDS = 60.0  # a claimed task's message is stored by the SuperNode within moments of the task

# What this module takes from Flower besides its public API (module -> names), checked at start-up.
FLOWER_INTERNALS = {
    "flwr.supernode.runtime.run_clientapp": ("push_message", "push_task_output", "install_from_fab"),
    "flwr.common.serde": ("context_from_proto", "run_from_proto", "fab_from_proto"),
    "flwr.proto.node_pb2": ("Node",),
    "flwr.supercore.inflatable.inflatable_protobuf_utils": ("make_pull_object_fn_protobuf",
                                                            "make_confirm_message_received_fn_protobuf"),
    "flwr.supercore.inflatable.inflatable_utils": ("pull_and_inflate_object_from_tree",),
    "flwr.supercore.task_identity": ("TaskIdentity",),
    "flwr.supercore.runtime": ("RuntimeHttpClient",),
    "flwr.supercore.interceptors": ("RuntimeTokenHttpInterceptor", "RuntimeVersionHttpInterceptor",
                                    "SuperExecAuthHttpInterceptor"),
    "flwr.supercore.retry": ("make_simple_http_retry_invoker",),
    "flwr.supercore.heartbeat": ("HeartbeatSender", "make_task_heartbeat_fn_http"),
    "flwr.supercore.auth": ("load_superexec_auth_secret",),
    "flwr.clientapp.utils": ("get_load_client_app_fn",),
    "flwr.clientapp.client_app": ("LoadClientAppError",),
    "flwr.proto.runtime_pb2": ("AcquireTaskRequest", "PullTaskInputRequest", "PullAppMessagesRequest"),
    "flwr.supercore.constant": ("TaskType",),
}


def check_flower() -> None:
    """`FlowerMoved` naming the installed Flower version unless it is 1.42.* with every internal we use."""
    import importlib

    problems = version_problems()
    for module_name, names in FLOWER_INTERNALS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            problems.append(f"no module {module_name}")
            continue
        problems += [f"no {module_name}.{name}" for name in names if not hasattr(module, name)]
    if problems:
        raise moved(problems, "the site's executor (client/executor.py)")


class Executor:
    """Claims the SuperNode's tasks one at a time and runs each through the ClientApp of its bundle."""

    def __init__(self, runtime_api: str, secret: bytes, served_log: Path | None = None) -> None:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime import run_clientapp

        from client.fab_guard import guarded
        from fedcommon.app_bundle import installed_version

        self.runtime_api = runtime_api
        self.served_log = served_log
        self.apps: dict[str, Any] = {}  # bundle hash -> its loaded ClientApp
        # The app-bundle gate in front of Flower's installer, as in the guarded flwr-clientapp it replaces.
        self.install = guarded(run_clientapp.install_from_fab, installed_version())
        self.acquirer = RuntimeHttpClient.from_server_address(
            server_address=runtime_api, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                          SuperExecAuthHttpInterceptor(master_secret=secret,
                                                       protected_methods=frozenset({ACQUIRE_METHOD}))],
            retry_invoker=make_simple_http_retry_invoker())

    def acquire(self) -> str | None:
        """The token of a claimed ClientApp task, or None when none is pending."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        response = self.acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        return response.token if response.HasField("task") and response.token else None

    def run_forever(self) -> None:
        import httpx

        while True:
            try:
                token = self.acquire()
            except httpx.HTTPError:  # the SuperNode is (re)starting; its restarts are cmoe-client's business
                time.sleep(UNREACHABLE_SECONDS)
                continue
            if token is None:
                time.sleep(ACQUIRE_SECONDS)
                continue
            self.serve(token)

    def serve(self, token: str) -> None:
        """One task: what ``flwr-clientapp --token`` does, with the app loaded once per bundle."""
        from flwr.app import Error, Message
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.task_identity import TaskIdentity
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        retry = make_simple_http_retry_invoker()
        client = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=retry)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        message = reply = context = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            heartbeat.start()
            message, context, run, fab = pull_task_input(client)
            self.note_served(message, "running")
            app = self.app_of(run, fab)
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as error:  # as flwr-clientapp: the coordinator gets the reason as this site's error
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = f"{type(error)}:<'{error}'>"
            if isinstance(error, LoadClientAppError):
                code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "An exception was raised when attempting to " \
                                                                    "load `ClientApp`"
            print(f"executor: task {TaskIdentity.task_id}: {reason}", file=sys.stderr, flush=True)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            finally:
                retry.max_tries = 1
                push_task_output(client=client, context=context, sub_status=status, details=details)
                if heartbeat.is_running:
                    heartbeat.stop()
                client.close()
        self.note_served(message, status)

    def app_of(self, run: Any, fab: Any) -> Any:
        """The ClientApp of a bundle: checked (fab_guard), installed and loaded the first time its hash is seen."""
        if fab.hash_str not in self.apps:
            from flwr.clientapp.utils import get_load_client_app_fn

            self.install(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        return self.apps[fab.hash_str]

    def note_served(self, message: Any, status: str) -> None:
        """One JSON line: which process serves which message, and how far (the real-process test reads them)."""
        if self.served_log is None:
            return
        from flwr.supercore.task_identity import TaskIdentity

        entry: dict[str, Any] = {"time": _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"),
                                 "pid": os.getpid(), "task": TaskIdentity.task_id, "run": TaskIdentity.run_id,
                                 "status": status}
        if message is not None:
            entry["type"] = message.metadata.message_type
            config = message.content.get("config") if message.has_content() else None
            if config is not None and "server-round" in config:
                entry["round"] = int(config["server-round"])
        with open(self.served_log, "a") as log:
            log.write(json.dumps(entry) + "\n")


def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """Flower's ``run_clientapp.pull_task_input`` (message, context, run, bundle of the claimed task), except that
    it waits for the message instead of failing when there is none yet, and pulls its objects with the quick
    retries of `fedcommon.flower_internals`. The SuperNode creates a task before it has stored the task's message
    and its objects (``_pull_and_store_message``); a ``flwr-clientapp`` that starts seconds later never sees that
    gap, an executor that claims the task within `ACQUIRE_SECONDS` can."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    task_input = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = task_input.task_id
    TaskIdentity.run_id = task_input.run.run_id
    TaskIdentity.node_id = task_input.context.node_id
    context = context_from_proto(task_input.context)
    run = run_from_proto(task_input.run)
    fab = fab_from_proto(task_input.fab)
    deadline = time.monotonic() + MESSAGE_WAIT_SECONDS
    while not (pulled := client.PullMessages(PullAppMessagesRequest())).messages_list:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no message for task {task_input.task_id} within {MESSAGE_WAIT_SECONDS:.0f} s")
        time.sleep(ACQUIRE_SECONDS)
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, **PULL_SETTINGS)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: not part of the object
    return message, context, run, fab


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="cmoe-client's long-lived ClientApp executor (started by it)")
    parser.add_argument("--runtime-api", required=True, help="the SuperNode's Runtime API, HOST:PORT (loopback)")
    parser.add_argument("--secret-file", type=Path, required=True, help="the SuperNode's SuperExec secret")
    parser.add_argument("--served-log", type=Path, default=None, help="append one JSON line per served message")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        check_flower()
    except FlowerMoved as problem:
        raise SystemExit(f"error: {problem}") from None
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.auth import load_superexec_auth_secret

    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    import client.app  # noqa: F401 - torch, Flower and our code, imported once, before the first task

    executor = Executor(args.runtime_api, load_superexec_auth_secret(str(args.secret_file)), args.served_log)
    print(f"executor: pid {os.getpid()} serving the SuperNode at {args.runtime_api}", flush=True)
    executor.run_forever()


if __name__ == "__main__":
    main()
