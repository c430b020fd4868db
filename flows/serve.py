"""Serve the pipeline flow as a scheduled Prefect deployment: each scheduled run scans the
incoming folder and processes what is new, so a dropped batch is picked up by the next run.
The schedule is ``pipeline.schedule`` in params.yaml (an interval, or a cron expression).

Schedules need a real Prefect server (the temporary one refuses them):

    prefect server start --host 127.0.0.1 --port 4200                  # make prefect-server
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve     # make schedule
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect.settings import PREFECT_API_URL

from flows.pipeline import process_incoming
from lifelong_hashing.config import ConfigError, add_params_arguments, load_params, parse_overrides

DEPLOYMENT = "scan-incoming"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        schedule = load_params(args.params, overrides).pipeline.schedule
    except ConfigError as err:
        print(f"flows.serve: error: {err}", file=sys.stderr)
        return 2
    if not PREFECT_API_URL.value():
        print("flows.serve: error: no Prefect server. Start one with `prefect server start --host 127.0.0.1` "
              "and set PREFECT_API_URL=http://127.0.0.1:4200/api (docs/pipeline.md, 'Schedules').", file=sys.stderr)
        return 2
    process_incoming.serve(
        name=DEPLOYMENT,
        cron=schedule.cron,
        interval=None if schedule.cron else schedule.interval_seconds,
        parameters={"params_path": str(Path(args.params).resolve()), "overrides": overrides},
        description="Process the batches dropped into pipeline.incoming: validate, train, export, monitor, "
                    "version, promote.",
        tags=["lifelong-hashing"],
        limit=1,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
