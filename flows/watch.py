"""Start the pipeline deployment within seconds of an arrival: every file closed after writing,
or renamed into ``pipeline.incoming`` or ``pipeline.deletions``, becomes the Prefect event
``lifelong-hashing.file.arrived``, and the deployment's event trigger (prefect.yaml; debounced,
so one run takes a burst) starts a run. The deployment's interval schedule stays as the safety
net for an event that was missed.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.watch    # make deployment starts it
"""

from __future__ import annotations

import argparse
import queue
import signal
import sys
from pathlib import Path

from prefect.events import emit_event
from prefect.settings import PREFECT_API_URL

from lifelong_hashing.config import ConfigError, add_params_arguments, load_params, parse_overrides
from lifelong_hashing.operations import arrivals, pipeline

EVENT = "lifelong-hashing.file.arrived"
RESOURCE = "lifelong-hashing.arrivals"


def announce(path: Path, kind: str) -> None:
    """The event the deployment's trigger matches; the run scans the folders itself, so the
    event carries only what a person reading the event feed wants."""
    emit_event(event=EVENT, resource={"prefect.resource.id": f"{RESOURCE}.{path.parent.name}",
                                      "prefect.resource.name": pipeline.printable(path.name)[:200]},
               payload={"kind": kind, "folder": str(path.parent)})
    print(f"{kind} arrived: {pipeline.printable(str(path))}", flush=True)


def server_configured(program: str) -> bool:
    """Whether ``PREFECT_API_URL`` names a server; if not, say how to start one."""
    if PREFECT_API_URL.value():
        return True
    print(f"{program}: error: no Prefect server. Start one with `prefect server start --host 127.0.0.1` "
          "and set PREFECT_API_URL=http://127.0.0.1:4200/api (docs/pipeline.md, 'Deployment').", file=sys.stderr)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    try:
        folders = pipeline.arrival_folders(load_params(args.params, parse_overrides(args.set)))
    except ConfigError as err:
        print(f"flows.watch: error: {err}", file=sys.stderr)
        return 2
    if not server_configured("flows.watch"):
        return 2
    arrived: queue.Queue = queue.Queue()  # the observer's thread hands over; events go out from here
    observer = arrivals.watch(folders, lambda path, kind: arrived.put((path, kind)))
    signal.signal(signal.SIGTERM, lambda *_: arrived.put(None))
    for path in arrivals.waiting(folders):  # what came while no watcher ran
        arrived.put((path, folders[path.parent][1]))
    print(f"watching {', '.join(str(f) for f in folders)}", flush=True)
    try:
        while (item := arrived.get()) is not None:
            announce(*item)
    except KeyboardInterrupt:
        pass
    finally:
        observer.stop()
        observer.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
