"""``ray`` with a loopback ``--node-ip-address`` kept as given: ``python cluster/ray_loopback.py start ...``.

``ray start --node-ip-address=127.0.0.1`` replaces the address with the machine's outward one
(``resolve_ip_for_localhost``), and a node on an outward address has its GCS, raylet, agents and workers listen on
every interface. ``cluster/local.sh`` runs every node of its one-machine cluster through this, so each stays on
127.0.0.1 and listens there alone; any other address is resolved as Ray does. The script also exports
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, with which the nodes' processes (job drivers included) find their node on
127.0.0.1, and which ``ray start --address`` would take for "no worker nodes": this CLI process alone ignores it.
"""

from __future__ import annotations

import sys

from ray._private import ray_constants, services

ray_constants.ENABLE_RAY_CLUSTER = True
_resolve = services.resolve_ip_for_localhost


def _keep_loopback(host: str) -> str:
    return "127.0.0.1" if host in ("127.0.0.1", "localhost") else _resolve(host)


services.resolve_ip_for_localhost = _keep_loopback

if __name__ == "__main__":
    from ray.scripts.scripts import main

    sys.exit(main())
