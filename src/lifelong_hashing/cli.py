"""``lhash``: the command line. A thin layer over ``runner``; every error becomes one clear line."""

from __future__ import annotations

import argparse
import sys

import yaml

from .batch import BatchError
from .codestore import CodeStoreError
from .config import METHOD_NAMES, ConfigError, load_params
from .methods import MethodError
from .stages import StagePlanError
from .state import StateError

USER_ERRORS = (BatchError, CodeStoreError, ConfigError, MethodError, StagePlanError, StateError)


def _overrides(pairs: list[str]) -> dict:
    """``-S model.bits=32`` style overrides, values parsed as YAML (numbers, lists, strings)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r} must look like section.key=value")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lhash", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -S method.name=dlch -S model.bits=32")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole stage sequence of params.yaml")
    run.add_argument("--out", help="output folder (default: run.out_dir)")
    stage = sub.add_parser("stage", help="run the next stage from a state folder, in a fresh process")
    stage.add_argument("--state", required=True, help="state folder (created at stage 0)")
    cmp_ = sub.add_parser("compare", help="several methods on the same stages, one table")
    cmp_.add_argument("--methods", nargs="+", choices=METHOD_NAMES, help="default: compare.methods")
    cmp_.add_argument("--out", help="output folder (default: compare.out_dir)")
    args = parser.parse_args(argv)

    from . import runner  # torch import deferred so --help stays fast

    try:
        params = load_params(args.params, _overrides(args.set))
        if args.command == "run":
            out = args.out or params.run.out_dir
            summary = runner.run_sequence(params, out)
            print(runner.stage_table(summary))
            print(f"\nmetrics: {out}/metrics.json  table: {out}/table.md  state: {out}/state")
        elif args.command == "stage":
            rec = runner.resume_stage(params, args.state)
            print(f"stage {rec['stage']}: {rec['items_added']} items, {rec['train_seconds']:.1f} s, "
                  f"mAP I→T {rec['i2t']['map_all']:.4f}, T→I {rec['t2i']['map_all']:.4f}; saved to {args.state}")
        elif args.command == "compare":
            out = args.out or params.compare.out_dir
            result = runner.compare(params, args.methods or params.compare.methods, out)
            print(result["table"])
            print(f"\ntable: {out}/compare.md  per-method metrics: {out}/<method>/metrics.json")
    except USER_ERRORS as err:
        print(f"lhash: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
