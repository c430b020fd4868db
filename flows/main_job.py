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

from flows.pipeline import exit_now, process_incoming
from lifelong_hashing.config import add_params_arguments, load_params, parse_overrides
from lifelong_hashing.engine.batch import save_batch
from lifelong_hashing.engine.runner import build_plan, stage_table
from lifelong_hashing.inference.versions import current_version
from lifelong_hashing.operations.pipeline import recorded_summary
from lifelong_hashing.operations.registry import Registry


def drop(batch, incoming: Path, name: str) -> Path:
    """Write under a hidden name, then rename: the flow never sees half a file."""
    incoming.mkdir(parents=True, exist_ok=True)
    target = incoming / name
    os.replace(save_batch(batch, incoming / f".{name}.partial.npz"), target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_arguments(parser)
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
    print("\n" + stage_table(recorded_summary(registry)))
    print(f"""
served version: {current_version(registry.models_dir)} (lhash serve --models {registry.models_dir})
models:         {registry.versions_dir}  (ONNX encoders, codes.npz, manifest.json per version)
code store:     {registry.state_dir / 'codes.npz'}
metrics:        {registry.metrics_path}  (cd {registry.root} && dvc metrics show; dvc plots show)
reports:        {registry.reports_dir / 'monitoring'} (Evidently)
                {registry.reports_dir / 'validation'} (Great Expectations)
dashboard:      evidently ui --workspace {registry.evidently_workspace}
registry:       gto show -r {registry.root}; gto history -r {registry.root}  (roll back: lhash rollback vN)""")
    return 0


if __name__ == "__main__":
    exit_now(main())
