"""``lhash``: the command line. A thin layer over ``runner``; every error becomes one clear line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from lifelong_hashing.config import METHOD_NAMES, ConfigError, add_params_arguments, load_params, parse_overrides
from lifelong_hashing.engine.batch import BatchError
from lifelong_hashing.engine.codestore import CodeStoreError
from lifelong_hashing.engine.stages import StagePlanError
from lifelong_hashing.operations.registry import STAGES


def _user_errors() -> tuple[type[Exception], ...]:
    """The error types that mean "bad input"; imported only now so that ``--help`` loads
    neither PyTorch nor ONNX."""
    from lifelong_hashing.engine.backbone import BackboneError
    from lifelong_hashing.engine.methods import MethodError
    from lifelong_hashing.engine.state import StateError
    from lifelong_hashing.inference.export import ExportError
    from lifelong_hashing.inference.retrieval import ModelLoadError, QueryError
    from lifelong_hashing.inference.versions import VersionError
    from lifelong_hashing.operations.registry import RegistryError

    return (BackboneError, BatchError, CodeStoreError, ConfigError, MethodError, StagePlanError, StateError,
            ExportError, ModelLoadError, QueryError, VersionError, RegistryError)


def build_parser() -> argparse.ArgumentParser:
    """Every command and its arguments."""
    parser = argparse.ArgumentParser(prog="lhash", description=__doc__)
    add_params_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole stage sequence of params.yaml")
    run.add_argument("--out", help="output folder (default: run.out_dir)")
    stage = sub.add_parser("stage", help="run the next stage from a state folder, in a fresh process")
    stage.add_argument("--state", required=True, help="state folder (created at stage 0)")
    cmp_ = sub.add_parser("compare", help="several methods on the same stages, one table")
    cmp_.add_argument("--methods", nargs="+", choices=METHOD_NAMES, help="default: compare.methods")
    cmp_.add_argument("--out", help="output folder (default: compare.out_dir)")
    exp = sub.add_parser("export", help="export a state's encoders to ONNX as a new model version")
    exp.add_argument("--state", required=True, help="state folder, e.g. runs/wikipedia/state")
    exp.add_argument("--models", help="models folder (default: export.models_dir)")
    exp.add_argument("--promote", action="store_true", help="serve the new version right away")
    prom = sub.add_parser("promote", help="point serving at a published version; with --stage, assign a pipeline "
                                          "version a registry stage (prod: and serve it)")
    prom.add_argument("version", help="e.g. v0003 (with --stage also v1.3.0)")
    prom.add_argument("--models", help="models folder (default: export.models_dir)")
    prom.add_argument("--stage", choices=STAGES, help="a stage of the registry in pipeline.workspace")
    serve = sub.add_parser("serve", help="start the retrieval service on the promoted version")
    serve.add_argument("--models", help="models folder (default: export.models_dir)")
    serve.add_argument("--host", help="default: serving.host")
    serve.add_argument("--port", type=int, help="default: serving.port")
    val = sub.add_parser("validate", help="check an incoming batch file against the current model (exit 1: rejected)")
    val.add_argument("batch", help="batch .npz (docs/data.md, 'Batch format')")
    val.add_argument("--state", help="state folder of the current model (default: structure checks only)")
    val.add_argument("--out", help="folder for validation.json and the data docs "
                                   "(default: validation.reports_dir/<name>-<hash>)")
    mon = sub.add_parser("monitor", help="Evidently report of a state's increment, added to the workspace "
                                         "(exit 1: alerts)")
    mon.add_argument("--state", required=True, help="state folder, e.g. runs/wikipedia/state")
    mon.add_argument("--stage", type=int, help="which increment (default: the latest)")
    mon.add_argument("--out", help="report folder (default: monitoring.reports_dir/stage-NN)")
    mon.add_argument("--workspace", help="Evidently workspace (default: monitoring.workspace)")
    erase = sub.add_parser("delete", help="erase items: a request the next pipeline run carries out (into "
                                          "pipeline.deletions), or with --state from a state folder now")
    erase.add_argument("--state", help="a state folder: erase from its code store, memory, kept batches and "
                                       "reference samples now (then lhash export publishes the version without them)")
    which = erase.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", nargs="+", help="item ids")
    which.add_argument("--ids-file", help="a text file of item ids, one a line")
    back = sub.add_parser("rollback", help="make an earlier pipeline version current again: its model, code store "
                                           "and history (dvc checkout), assigned prod and served; not one "
                                           "recorded before an erasure")
    back.add_argument("version", help="e.g. v0002 or v1.2.0 (gto show in pipeline.workspace)")
    name = sub.add_parser("name", help="answer a pipeline version's proposed new categories later (the run's "
                                       "Prefect form timed out): the accepted ones become a batch in incoming")
    name.add_argument("version", help="e.g. v0004 (reports/discovery/v0004.json in pipeline.workspace)")
    name.add_argument("--answers", required=True, help='a JSON list: [{"proposal": 0, "decision": "accept", '
                                                       '"name": "night"}, {"proposal": 1, "decision": "reject"}]')
    sub.add_parser("purge", help="after an erasure: remove from the workspace's DVC cache and remote every object "
                                 "the commits since the latest erasure do not use (irreversible)")
    find = sub.add_parser("search", help="query a running service, a models folder or a state folder")
    where = find.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running service, e.g. http://127.0.0.1:8000")
    where.add_argument("--models", help="a models folder (its promoted version, through ONNX Runtime)")
    where.add_argument("--state", help="a training state folder (through PyTorch)")
    find.add_argument("--modality", choices=["image", "text"], help="the query's modality (photos: image)")
    what = find.add_mutually_exclusive_group(required=True)
    what.add_argument("--features-file", help=".npy or .json file with one feature row per query")
    what.add_argument("--words", nargs="+", help="a text query as words (models with a text vocabulary)")
    what.add_argument("--image", nargs="+", metavar="PHOTO",
                      help="JPEG or PNG photos, one query each (models whose image encoder takes photos)")
    find.add_argument("--k", type=int, default=10)
    find.add_argument("--radius", type=int)
    only = find.add_argument_group("filter (the top k is exact within it)")
    only.add_argument("--any-of", nargs="+", default=[], metavar="CATEGORY", help="items with one of these")
    only.add_argument("--all-of", nargs="+", default=[], metavar="CATEGORY", help="items with all of these")
    only.add_argument("--stages", type=_stage_range, metavar="FIRST:LAST", help="items of these stages, inclusive")
    only.add_argument("--id-prefix", default="", help="items whose id starts with this")
    return parser


def _stage_range(text: str) -> tuple[int, int]:
    first, sep, last = text.partition(":")
    try:
        bounds = (int(first), int(last if sep else first))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIRST:LAST, e.g. 2:3") from None
    if bounds[0] > bounds[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: the first stage is after the last")
    return bounds


def _item_filter(args):
    from lifelong_hashing.engine.codestore import ItemFilter

    return ItemFilter(tuple(args.any_of), tuple(args.all_of), args.stages, args.id_prefix)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "search":
        if args.image and args.modality == "text":
            parser.error("--image queries are of the image modality")
        args.modality = args.modality or ("image" if args.image else None)
        if args.modality is None:
            parser.error("search needs --modality (image or text)")
    if not sys.stderr.isatty():  # a log file or a pipe gets a line per stage; a terminal gets progress bars
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    from lifelong_hashing.engine import runner  # PyTorch loads here, after argument parsing

    try:
        params = load_params(args.params, parse_overrides(args.set))
        if args.command in ("export", "promote", "serve", "search") and not getattr(args, "stage", None):
            return _production_command(args, params)
        if args.command in ("rollback", "purge", "name", "promote"):
            return _workspace_command(args, params)
        if args.command in ("validate", "monitor", "delete"):
            return _data_command(args, params)
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
    except _user_errors() as err:
        print(f"lhash: error: {err}", file=sys.stderr)
        return 2
    return 0


def _data_command(args, params) -> int:
    from lifelong_hashing.engine.state import load_state

    if args.command == "delete":
        return _delete(args, params)
    if args.command == "validate":
        from lifelong_hashing.engine.images import PhotoReader
        from lifelong_hashing.operations.validation import BatchExpectations, validate_batch

        expected = (BatchExpectations.from_state(load_state(args.state), params.pipeline.repeated_ids) if args.state
                    else BatchExpectations.none(PhotoReader.from_params(params)))
        result = validate_batch(args.batch, expected, params.validation, args.out)
        print(result.summary())
        return 0 if result.accepted else 1
    from lifelong_hashing.operations.monitoring import monitor_state

    report = monitor_state(load_state(args.state), params.monitoring, stage=args.stage, out_dir=args.out,
                           workspace=args.workspace)
    print(report.summary())
    return 0 if report.ok else 1


def _workspace_command(args, params) -> int:
    """rollback, promote --stage, purge and name, on the pipeline's workspace, with its lock held."""
    from lifelong_hashing.operations import erasure
    from lifelong_hashing.operations.registry import Registry

    registry = Registry.from_params(params)
    with registry.acquire(params.pipeline.lock_timeout_seconds):
        recovered = registry.recover()  # a run that stopped midway leaves nothing to act over
        if recovered:
            print(f"{registry.root}: the last pipeline run stopped midway: {recovered}", file=sys.stderr)
        if args.command == "purge":
            print(f"{registry.root}: {erasure.purge_history(registry)}")
            return 0
        if args.command == "name":
            return _name_proposals(args, params, registry)
        if args.command == "promote":
            version = erasure.assign_stage(registry, args.version, args.stage)
            print(f"{registry.root}: {version} is in {args.stage}"
                  + (f"; serving it from {registry.models_dir}" if args.stage == "prod" else ""))
            return 0
        version = erasure.rollback(registry, args.version)
    print(f"{registry.root}: restored {version}; it is in prod, served from {registry.models_dir}")
    return 0


def _name_proposals(args, params, registry) -> int:
    from pydantic import TypeAdapter, ValidationError

    from lifelong_hashing.operations.discovery import ProposalAnswer, answer_proposals

    try:
        answers = TypeAdapter(list[ProposalAnswer]).validate_json(Path(args.answers).read_bytes())
        groups, batch = answer_proposals(registry, Path(params.pipeline.incoming), args.version, answers)
    except (OSError, ValueError, ValidationError) as err:
        raise ConfigError(f"{args.answers}: {err}") from None
    named = ", ".join(f"{n} ({len(ids)} items)" for n, ids in groups.items()) or "nothing"
    print(f"named {named}" + (f"; the next pipeline run learns {batch}" if batch else ""))
    return 0


def _delete(args, params) -> int:
    """On a state folder (``--state``), now; else a deletion request for the pipeline."""
    from lifelong_hashing.engine.requests import read_deletion_ids, write_deletion_request

    ids = read_deletion_ids(args.ids_file, args.ids_file) if args.ids_file else args.ids
    if not args.state:
        request = write_deletion_request(params.pipeline.deletions, ids)
        print(f"{request}: a request to erase {len(set(ids)):,} items; the next pipeline run erases them and "
              "publishes a version without them")
        return 0
    from lifelong_hashing.engine.runner import delete_items
    from lifelong_hashing.engine.state import load_state, save_state
    from lifelong_hashing.operations.pipeline import evaluation_queries

    state = load_state(args.state)
    counts = delete_items(state, ids, evaluation_queries(state.params))
    save_state(state, args.state)
    print(f"{args.state}: deleted {counts['deleted']:,} items ({counts['already_deleted']:,} deleted before); "
          f"{counts.get('memory_rows', 0):,} memory rows and {counts.get('reference_rows', 0):,} reference rows "
          f"went with them; database {len(state.store):,} items. `lhash export --state {args.state}` publishes it.")
    return 0


def _production_command(args, params) -> int:
    from lifelong_hashing.inference import versions

    models = getattr(args, "models", None) or params.export.models_dir
    if args.command == "export":
        from lifelong_hashing.engine.state import load_state
        from lifelong_hashing.inference.export import publish

        version = publish(load_state(args.state), models, params.export, index=params.serving.index)
        manifest = json.loads((version / "manifest.json").read_text())
        for modality, entry in manifest["encoders"].items():
            p = entry["parity"]
            int8 = entry.get("int8")
            extra = f", int8 bit agreement {int8['bit_agreement']:.4f} ({'used' if int8['used'] else 'not used'})" \
                if int8 else ""
            print(f"{modality}: {version / entry['file']} parity max|diff| {p['max_abs_diff']:.2e}, "
                  f"bits {p['bit_agreement']:.2%}{extra}")
        for modality, entry in manifest.get("index", {}).get("modalities", {}).items():
            recall = next(f"{key.replace('_at_', '@')} {value:.4f}" for key, value in entry.items()
                          if key.startswith("recall_at_"))
            print(f"{modality} codes: {manifest['index']['kind']} index built in {entry['build_seconds']:.2f} s, "
                  f"{recall} against exact search")
        if args.promote:
            versions.promote(models, version.name)
        print(f"published {version.name} (opset {manifest['opset']})" + (", promoted" if args.promote else ""))
    elif args.command == "promote":
        versions.promote(models, args.version)
        print(f"serving {args.version} from {models}")
    elif args.command == "serve":
        from lifelong_hashing.inference.service import create_app, run_server

        cfg = params.serving
        app = create_app(models, cfg, photos=params.photos, deletions=params.pipeline.deletions)
        run_server(app, cfg, args.host or cfg.host, args.port or cfg.port)
    else:
        _search(args, params)
    return 0


def _search(args, params) -> None:
    from lifelong_hashing.inference.retrieval import QueryError

    features = None
    if args.features_file:
        path = Path(args.features_file)
        try:
            features = np.load(path) if path.suffix == ".npy" else np.asarray(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            raise QueryError(f"{path}: cannot read query features: {err}") from err
    words = [args.words] if args.words else None
    photos = _read_photos(args.image) if args.image else None
    if args.url:
        import httpx

        where = _item_filter(args)
        body = {"modality": args.modality, "k": args.k, "radius": args.radius,
                "features": None if features is None else np.atleast_2d(features).tolist(), "words": words,
                "filter": {"any_of": list(where.any_of), "all_of": list(where.all_of), "stages": where.stages,
                           "id_prefix": where.id_prefix} if where else None}
        try:
            if photos is None:
                reply = httpx.post(args.url.rstrip("/") + "/search", json=body, timeout=60)
            else:
                form = {k: str(v) for k, v in body.items() if k in ("modality", "k", "radius") and v is not None}
                if body["filter"]:
                    form["filter"] = json.dumps(body["filter"])
                reply = httpx.post(args.url.rstrip("/") + "/search", data=form, files=photos, timeout=60)
        except httpx.HTTPError as err:
            raise QueryError(f"{args.url}: {err}") from err
        if reply.status_code != 200:
            raise QueryError(f"{args.url} answered {reply.status_code}: {reply.json().get('detail')}")
        results = reply.json()["results"]
    else:
        if args.state:
            from lifelong_hashing.engine.state import load_state

            results = _search_state(load_state(args.state), args, features)
        else:
            from lifelong_hashing.inference.retrieval import RetrievalModel
            from lifelong_hashing.inference.versions import current_dir

            model = RetrievalModel(current_dir(args.models), photo_limits=params.photos)
            if photos is None:
                x = model.features(args.modality, features, words)
            else:
                x = model.photos(args.modality, [data for _, (_, data, _) in photos])
            other = "text" if args.modality == "image" else "image"
            results = model.search(args.modality, x, args.k, args.radius, (other,), _item_filter(args))
    for q, result in enumerate(results):
        for side, hits in result.items():
            print(f"query {q} → {side}:")
            for rank, h in enumerate(hits, 1):
                print(f"  {rank:3d}  {h['id']}  distance {h['distance']}  stage {h['stage']}  {','.join(h['labels'])}")


def _read_photos(paths: list[str]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Photo files as multipart parts (field, (name, bytes, type)); an unreadable one or one that
    is not a JPEG or PNG is a QueryError naming it."""
    from lifelong_hashing.engine.images import PhotoError, photo_format
    from lifelong_hashing.inference.retrieval import QueryError
    from lifelong_hashing.inference.uploads import FILE_FIELD

    parts = []
    for name in paths:
        try:
            data = Path(name).read_bytes()
            kind = photo_format(data)
        except (OSError, PhotoError) as err:
            raise QueryError(f"{name}: {err}") from err
        parts.append((FILE_FIELD, (Path(name).name, data, f"image/{kind.lower()}")))
    return parts


def _search_state(state, args, features) -> list[dict]:
    from lifelong_hashing.inference.retrieval import QueryError, as_hits

    if features is None:
        raise QueryError("a state folder answers feature queries only (--features-file); photos and words "
                         "go to --models or --url")
    x = np.atleast_2d(np.asarray(features, np.float32))
    other = "text" if args.modality == "image" else "image"
    codes = state.method.encode(args.modality, x)
    hits = as_hits(state.store, *state.store.search(codes, other, args.k, args.radius, _item_filter(args)))
    return [{other: row} for row in hits]


if __name__ == "__main__":
    sys.exit(main())
