"""The main job (``make run``): the embedded Wikipedia stages arrive one by one as batch files in
the incoming folder, and the pipeline flow processes each (validate, train, export, monitor,
version, promote) on Prefect's temporary local server. Ends with the table of stages and where
everything is. Running it again finds every batch already processed and only prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flows.pipeline import process_incoming
from lifelong_hashing.batch import save_batch
from lifelong_hashing.cli import parse_overrides
from lifelong_hashing.config import load_params
from lifelong_hashing.pipeline import recorded_summary
from lifelong_hashing.registry import Registry
from lifelong_hashing.runner import build_plan, stage_table
from lifelong_hashing.versions import current_version


def drop(batch, incoming: Path, name: str) -> Path:
    """Write under a hidden name, then rename: the flow never sees half a file."""
    incoming.mkdir(parents=True, exist_ok=True)
    target = incoming / name
    os.replace(save_batch(batch, incoming / f".{name}.partial.npz"), target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    params = load_params(args.params, overrides)
    registry = Registry.from_params(params)
    plan = build_plan(params)
    for stage in plan.stages:
        name = f"{params.dataset.name}-stage-{stage.index}.npz"
        drop(stage.batch, Path(params.pipeline.incoming), name)
        print(f"dropped {name}: {len(stage.batch)} items, new categories {', '.join(stage.new_categories)}")
        state = process_incoming(args.params, overrides, return_state=True)
        if not state.is_completed():
            print(f"the pipeline stopped at {name}: {state.message}", file=sys.stderr)
            return 1
    root = registry.root
    print("\n" + stage_table(recorded_summary(registry)))
    print(f"""
served version: {current_version(registry.models_dir)} (lhash serve --models {root / 'models'})
models:         {root / 'models' / 'versions'}  (ONNX encoders, codes.npz, manifest.json per version)
code store:     {root / 'state' / 'codes.npz'}
metrics:        {root / 'metrics.json'}  (cd {root} && dvc metrics show; dvc plots show)
reports:        {root / 'reports' / 'monitoring'} (Evidently), {root / 'reports' / 'validation'} (Great Expectations)
dashboard:      evidently ui --workspace {root / 'reports' / 'workspace'}
versions:       git -C {root} tag  (roll back: lhash rollback model-vN)""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
