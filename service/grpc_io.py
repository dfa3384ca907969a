"""Which of gRPC's I/O stacks the service runs on: chosen before gRPC loads, since gRPC reads its
``GRPC_EXPERIMENTS`` once, as it is imported (set later, it changes nothing).

grpcio 1.85 reads a socket on its EventEngine's own threads, which hand each event on to the
completion queue that the asyncio API's poller thread waits on: one more thread hop per message
received than gRPC's older I/O manager, where that poller reads the sockets itself. With many
streams on few cores every hop waits for a core: at 200 streams with two workers on this project's
2-core machine, the older stack took about 6% less CPU per turn, with a lower p99 first-audio
overhead in 6 of 7 pairs of runs (``README.md``, *Configuration*). So the service turns the
EventEngine's listener and endpoints off, unless ``GRPC_EXPERIMENTS`` is set already (even empty:
gRPC's defaults), which is the operator's choice. The workers inherit the variable.

Nothing here imports gRPC: this module must be imported before anything that does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

__all__ = ["EXPERIMENTS", "choose_io_stack"]

EXPERIMENTS = "-event_engine_listener,-event_engine_client,-event_engine_for_all_other_endpoints"
"""gRPC's experiments turned off: its EventEngine's listener, client and endpoints (the pinned grpcio
knows all three; a release that no longer does logs "Unknown experiment" once and goes on)."""


def choose_io_stack(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set ``GRPC_EXPERIMENTS`` to :data:`EXPERIMENTS` unless it is set, or gRPC is loaded already (in
    a process that embeds the service: too late to matter); whether it was set here. A test runs
    ``python -m service`` and checks which stack carries its calls."""
    if "GRPC_EXPERIMENTS" in environ or "grpc" in sys.modules:
        return False
    environ["GRPC_EXPERIMENTS"] = EXPERIMENTS
    return True
