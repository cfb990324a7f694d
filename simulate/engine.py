"""The federated job on Flower's simulation engine (Ray): the same ServerApp job and ClientApp, N virtual sites.

What runs is the code of a real federation:

- the coordinator is `server.app.main` (the ServerApp's main: `server.app.Job` with `CancerMoEStrategy`,
  aggregation, checkpoints, MLflow, model registry), given the run config ``cmoe-server`` submits
  (`simulation_server_app`);
- every virtual site is `client.app.app`, the ClientApp with its mods (audit, identity, broken bank), given the
  node config ``cmoe-client`` gives its SuperNode. Flower's simulation names a node only by its
  ``partition-id``; `VirtualSiteApp` looks the site up in its table (site name, bank, workdir) and adds those
  keys to the node's context before the ClientApp runs. The table travels with the app to every Ray worker
  (Flower sends the app with each message). A worker serves many virtual sites in any order and keeps
  nothing of one in memory: a site's state is where a hospital keeps it, in its files (bank, DPS score
  caches and snapshots, audit log under its workdir), so any worker can serve any site in any round.

Ray: a local Ray instance limited to ``cpus`` CPUs (``num_cpus``), or an existing Ray cluster (``address``,
``cmoe-simulate --ray-address``; every node of it must have this package installed and see the banks and the
workdir at the same paths). Each virtual site's message asks for ``cpus_per_site`` CPUs (fractions allowed:
0.5 runs two sites per CPU). Flower shuts Ray down (or disconnects from the cluster) when the job ends.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client.app import app as site_app
from server.app import main as server_main
from simulate.sites import VirtualSite

PARTITION_ID = "partition-id"


class VirtualSiteApp(ClientApp):
    """`client.app.app` for the virtual site of each ``partition-id``: its node config added, then the ClientApp
    (with every one of its mods) handles the message, as it does under a real SuperNode."""

    def __init__(self, sites: Sequence[VirtualSite], device: str = "auto") -> None:
        super().__init__()
        self.sites = tuple(sites)
        self.device = device

    def node_config(self, partition: int) -> dict[str, str]:
        if not 0 <= partition < len(self.sites):
            raise RuntimeError(f"virtual node with partition-id {partition}, but only {len(self.sites)} sites")
        return self.sites[partition].node_config(self.device)

    def __call__(self, message: Message, context: Context) -> Message:
        context.node_config.update(self.node_config(int(context.node_config[PARTITION_ID])))
        return site_app(message=message, context=context)


def simulation_server_app(run_config: dict[str, Any]) -> ServerApp:
    """A ServerApp whose main is `server.app.main` run with ``run_config`` (the keys ``cmoe-server`` submits:
    ``configs``, ``workdir``, ``tracking-uri``, ``experiment``, ``resume``); the simulation's own run config
    is empty (`flwr.simulation.run_simulation` takes none)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        context.run_config.update(run_config)
        server_main(grid, context)

    return app


@dataclass(frozen=True)
class RayResources:
    cpus: float | None = None  # CPUs of the local Ray instance (None: every core); unused with an address
    cpus_per_site: float = 1.0  # each virtual site's message asks for this many CPUs (fractions allowed)
    gpus_per_site: float = 0.0
    address: str | None = None  # an existing Ray cluster ("auto", "HOST:PORT", "ray://HOST:10001")
    object_store_mib: int = 256  # the local instance's object store (messages are a few MB at most)

    def backend_config(self) -> dict[str, Any]:
        """Flower's ``backend_config``: ``init_args`` go to ``ray.init``, ``client_resources`` to each actor."""
        if self.address:
            init_args: dict[str, Any] = {"address": self.address}
        else:
            init_args = {"num_cpus": self.cpus or os.cpu_count() or 1, "num_gpus": 0 if not self.gpus_per_site
                         else None, "object_store_memory": self.object_store_mib * 1024 * 1024}
            init_args = {k: v for k, v in init_args.items() if v is not None}
        return {"init_args": init_args, "client_resources": {"num_cpus": self.cpus_per_site,
                                                             "num_gpus": self.gpus_per_site}}


def run(sites: Sequence[VirtualSite], run_config: dict[str, Any], resources: RayResources,
        device: str = "auto") -> None:
    """The whole job: one virtual SuperNode per site; returns when the ServerApp finishes, raises if it failed."""
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a hospital's or a laptop's machine: nothing sent out
    run_simulation(server_app=simulation_server_app(run_config), client_app=VirtualSiteApp(sites, device),
                   num_supernodes=len(sites), backend_config=resources.backend_config())
