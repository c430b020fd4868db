"""The HTTP retrieval service (FastAPI): a thin layer over ``retrieval.RetrievalModel``.

It serves the version named by ``models/CURRENT`` and follows promotions: a watcher thread loads a
newly promoted version in the background and swaps it in with one reference assignment, so
requests in flight finish on the version they started with; a version that fails to load is
refused and the old one stays. Every bad request gets a 4xx that says what is wrong.

What one client can take is bounded (``serving`` in params.yaml): body bytes, counted as they
arrive; hits per request (queries × k × targets); encode/search batches at once (requests that
wait meanwhile join one batch: ``batching.QueryBatcher``; small ones run on the event loop, a few
rows per turn, larger ones in worker threads, so ``/health`` keeps answering); open connections and
the time a connection may take to send its headers. An API key (``LHASH_API_KEY``, or the secret
file ``/run/secrets/lhash_api_key``: ``config.Environment``) guards every path but ``/health`` when
set; the Host header must be one of ``serving.allowed_hosts``.
"""


import asyncio
import dataclasses
import functools
import gc
import hmac
import json
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from lifelong_hashing import __version__
from lifelong_hashing.config import Environment, PhotoLimitsConfig, ServingConfig
from lifelong_hashing.engine.batch import BatchError, shown
from lifelong_hashing.engine.codestore import ItemFilter
from lifelong_hashing.engine.requests import deleted_id_hash, pending_deletion_ids, write_deletion_request
from lifelong_hashing.inference.batching import QueryBatcher
from lifelong_hashing.inference.retrieval import ModelLoadError, QueryError, RetrievalModel
from lifelong_hashing.inference.uploads import (
    UnsupportedMedia,
    base64_photos,
    body_kind,
    multipart_query,
    multipart_schema,
)
from lifelong_hashing.inference.versions import VersionError, current_version, list_versions, versions_dir

log = logging.getLogger("lifelong_hashing.inference.service")


class ModelHolder:
    """The served model and the pointer it came from; swapped whole, never mutated.

    A promoted version that does not load is refused and the served one stays. At start-up,
    with nothing served yet, a refused ``CURRENT`` falls back to the newest version that loads
    (``fallback`` says which and why). A refused version is tried again when its files change."""

    def __init__(self, models_dir: str | Path, encoder_threads: int = 0, photo_limits: PhotoLimitsConfig | None = None):
        self.models_dir, self.encoder_threads, self.photo_limits = Path(models_dir), encoder_threads, photo_limits
        self.model: RetrievalModel | None = None
        self.hidden: frozenset[str] = frozenset()  # served ids awaiting erasure: never returned
        self.submitted: set[str] = set()  # ids this process asked to erase
        self.seen: tuple | None = None  # (pointer name, fingerprint of its files) last acted on
        self.last_error: str | None = None
        self.fallback: str | None = None
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Load the promoted version if it changed; True when a new one was swapped in."""
        with self._lock:
            try:
                name = current_version(self.models_dir)
            except VersionError as err:
                name, error = None, str(err)
            else:
                error = None if name else f"no model version promoted in {self.models_dir}"
            seen = (name, error, _fingerprint(versions_dir(self.models_dir) / name) if name else None)
            if seen == self.seen:
                return False
            self.seen = seen
            if name is not None and self.model is not None and self.model.version == name and self.fallback is None:
                return False
            if name is not None:
                try:
                    model = RetrievalModel(versions_dir(self.models_dir) / name, self.encoder_threads,
                                           self.photo_limits)
                    return self._serve(model, fallback=None)
                except ModelLoadError as err:
                    error = f"refused version {name}: {err}"
            self.last_error = error
            log.error(error)
            if self.model is None:
                return self._fall_back(error)
            return False

    def served(self) -> RetrievalModel:
        """The served model, or 503 saying why there is none."""
        model = self.model
        if model is None:
            raise _Unavailable(self.last_error or f"no model version promoted in {self.models_dir}")
        return model

    def follow(self, deletions: Path | None) -> None:
        """The pending deletion requests, then the promoted version (in that order: ``hide``)."""
        pending = pending_deletion_ids(deletions) if deletions is not None else set()
        self.refresh()
        self.hide(pending)

    def watch(self, stop: threading.Event, poll_seconds: float, deletions: Path | None) -> None:
        """The watcher thread: ``follow`` every ``poll_seconds`` until ``stop``."""
        while not stop.wait(poll_seconds):
            try:
                self.follow(deletions)
            except OSError as err:  # a version folder being replaced mid-read: the next poll sees it whole
                log.warning("cannot read the model pointer: %s", err)

    def hide(self, pending: set[str]) -> None:
        """Hide the served items that deletion requests name (``pending``: those waiting in the
        deletions folder, read before the model was refreshed; plus what this process submitted),
        until a version without them is served: the pipeline retires a request only after
        promoting that version, so reading the requests first never uncovers an erased item."""
        model = self.model
        if model is None:
            return
        wanted = pending | self.submitted
        present = model.store.ids[model.store.rows_present(wanted)] if wanted else []
        self.submitted &= set(present)
        self.hidden = frozenset(present)

    def _serve(self, model: RetrievalModel, fallback: str | None) -> bool:
        self.model, self.fallback = model, fallback
        self.last_error = None if fallback is None else self.last_error
        log.info("serving model version %s%s", model.version, f" ({fallback})" if fallback else "")
        return True

    def _fall_back(self, why: str) -> bool:
        """Nothing served yet and the pointer unusable: serve the newest version that loads."""
        for name in reversed(list_versions(self.models_dir)):
            try:
                model = RetrievalModel(versions_dir(self.models_dir) / name, self.encoder_threads, self.photo_limits)
            except ModelLoadError as err:
                log.error("fallback: refused version %s: %s", name, err)
                continue
            return self._serve(model, fallback=f"fell back to {name}, the newest version that loads: {why}")
        return False


def _fingerprint(version_dir: Path) -> tuple:
    """Names, sizes and modification times of a version's files: changes when it is re-exported."""
    if not version_dir.is_dir():
        return ()
    return tuple(sorted((str(p.relative_to(version_dir)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in version_dir.rglob("*") if p.is_file()))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hit(_Strict):
    id: str
    distance: int
    stage: int
    labels: list[str]


class EncodeResponse(_Strict):
    model_version: str
    bits: int
    codes: list[str] = Field(description="one hex string per query row: the packed sign bits, little-endian")


class SearchResponse(_Strict):
    model_version: str
    results: list[dict[str, list[Hit]]] = Field(description="per query row: database side → hits")


class Problem(_Strict):
    detail: str


class DeleteRequest(_Strict):
    ids: list[Annotated[str, Field(min_length=1, max_length=1000)]] = Field(
        min_length=1, max_length=10_000, description="ids of stored items to erase")


class DeleteResponse(_Strict):
    request: str | None = Field(description="the deletion request's file name in the pipeline's deletions folder "
                                            "(none when every id was erased before)")
    ids: int = Field(description="ids in the request")
    hidden: int = Field(description="of them, served items now hidden from every search until erased")
    already_deleted: int = Field(description="of them, erased before (skipped)")


class SearchFilter(_Strict):
    """Which items a search may return (every condition given must hold); the top k is exact
    within it."""

    any_of: list[Annotated[str, Field(min_length=1)]] = Field(
        [], max_length=1000, description="items with at least one of these categories")
    all_of: list[Annotated[str, Field(min_length=1)]] = Field(
        [], max_length=1000, description="items with every one of these categories")
    stages: tuple[StrictInt, StrictInt] | None = Field(
        None, description="[first, last] stage, inclusive (an appended item carries the stage it joined)")
    id_prefix: str = Field("", max_length=1000, description="items whose id starts with this")

    @model_validator(mode="after")
    def _ordered_stages(self):
        if self.stages is not None and self.stages[0] > self.stages[1]:
            raise ValueError(f"stages [{self.stages[0]}, {self.stages[1]}]: the first is after the last")
        return self

    def item_filter(self) -> ItemFilter:
        return ItemFilter(tuple(self.any_of), tuple(self.all_of), self.stages, self.id_prefix)


class HealthResponse(_Strict):
    status: Literal["ok"]
    model_version: str


class VersionResponse(_Strict):
    model_version: str
    method: str
    bits: int
    categories: list[str]
    database_size: int
    stage: int
    input_shapes: dict[str, list[int]]
    inputs: dict[str, str] = Field(description="per modality: 'features' or 'pixels' (photos)")
    text_vocabulary: bool = Field(description="whether text queries may be words")
    providers: list[str] = Field(description="ONNX Runtime execution providers in use")
    index: dict[str, Any] = Field(description="the search index: kind flat (exact), or an approximate one's settings")
    project_version: str
    last_error: str | None = Field(description="why the latest promoted version was refused, if it was")
    fallback: str | None = Field(description="set when serving fell back from a version that did not load")
    hidden: int = Field(description="served items hidden until erased (pending deletion requests)")


# The key ``ApiKey`` checks before any body is read, declared so that the spec (and a client
# generated from it) can send it. Declared, not a FastAPI security dependency: that would check it
# again on every request, at a cost (docs/benchmarks.md, "Saturated, with a compiled client").
API_KEY_SCHEME = {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                             "description": "the service's key (LHASH_API_KEY), when one is set"}}
KEYED = {"security": [{"ApiKey": []}]}
PROBLEMS = {code: {"model": Problem} for code in (400, 401, 413, 415, 422, 503)}


def query_models(cfg: ServingConfig) -> tuple[type[BaseModel], type[BaseModel]]:
    """The /encode and /search bodies, bounded by ``cfg``'s limits."""

    class EncodeRequest(_Strict):
        modality: Literal["image", "text"]
        # Strict: an int is a number, "1.5" and true are not.
        features: Annotated[list[list[StrictFloat]], Field(min_length=1, max_length=cfg.max_queries)] | None = Field(
            None, description="one feature row per query")
        words: Annotated[list[Annotated[list[str], Field(min_length=1, max_length=10_000)]],
                         Field(min_length=1, max_length=cfg.max_queries)] | None = Field(
            None, description="text queries as word lists (models with a text vocabulary)")
        images: Annotated[list[Annotated[str, Field(min_length=1)]],
                          Field(min_length=1, max_length=cfg.max_queries)] | None = Field(
            None, description="image queries as base64 JPEG or PNG files (a data: URL prefix is allowed), for "
                              "versions whose image encoder takes photos; or send multipart/form-data")

    class SearchRequest(EncodeRequest):
        k: StrictInt = Field(10, ge=1, le=cfg.max_k)
        radius: StrictInt | None = Field(None, ge=0, description="only hits within this Hamming distance")
        target: Literal["other", "image", "text", "both"] = "other"
        filter: SearchFilter | None = Field(None, description="search only the items it lets through "
                                                              "(multipart: the same object as a JSON string)")

    return EncodeRequest, SearchRequest


COMPONENT = "#/components/schemas/{model}"


def request_schema(model: type[BaseModel], components: dict) -> dict:
    """The body as documented: parsed by ``QueryReader``, not by FastAPI (which would decode the
    JSON into Python objects first, then validate them: four times slower for a 1,000-float row).
    The JSON body, its multipart form and the schemas they use are added to ``components`` and
    referenced, as a client generator expects (``add_components`` puts them in the spec)."""
    schema = model.model_json_schema(ref_template=COMPONENT)
    components.update(schema.pop("$defs", {}))
    name = model.__name__
    components[name], components[f"{name}Form"] = schema, multipart_schema(schema)
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": COMPONENT.format(model=name)}},
        "multipart/form-data": {"schema": {"$ref": COMPONENT.format(model=f"{name}Form")}}}}}


def add_components(app: FastAPI, components: dict) -> None:
    """The spec FastAPI generates, with the request schemas ``request_schema`` collected and the
    API key's scheme."""
    generate = app.openapi

    def openapi() -> dict:
        spec = generate()
        spec.setdefault("components", {}).setdefault("schemas", {}).update(components)
        spec["components"]["securitySchemes"] = API_KEY_SCHEME
        return spec

    app.openapi = openapi


class QueryReader:
    """A request body → a validated query, the served model and its encoder inputs, or a 4xx
    naming what is wrong."""

    def __init__(self, cfg: ServingConfig, holder: ModelHolder):
        self.cfg, self.holder = cfg, holder

    async def read(self, request: Request, model: type[BaseModel]):
        """The body as a validated query and its photos (None: a features or words query)."""
        kind = body_kind(request.headers.get("content-type"))
        try:
            if kind == "multipart":
                fields, files = await multipart_query(request, self.cfg.max_queries)
                return model.model_validate(fields), files
            query = model.model_validate_json(await request.body())
        except ValidationError as err:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors()]) from None
        return query, None if query.images is None else base64_photos(query.images)

    async def parse(self, request: Request, model: type[BaseModel]):
        query, files = await self.read(request, model)
        served = self.holder.served()
        if files is not None:
            if query.features is not None or query.words is not None:
                raise QueryError("send exactly one of 'features', 'words' or a photo")
            return query, served, await run_in_threadpool(served.photos, query.modality, files)
        if query.words is None:  # numpy's checks: cheap enough for the event loop
            return query, served, served.features(query.modality, query.features, None)
        return query, served, await run_in_threadpool(served.features, query.modality, query.features, query.words)


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal as ``{"detail": one line}`` with its status."""
    for error, status in ((QueryError, 422), (UnsupportedMedia, 415), (_Unavailable, 503)):
        app.add_exception_handler(error, functools.partial(_detail, status=status))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        """One readable line per problem ("body.k: Input should be less than or equal to 1000")."""
        lines = [".".join(str(p) for p in e.get("loc", ())) + ": " + str(e.get("msg", "invalid"))
                 for e in err.errors()]
        return JSONResponse({"detail": "; ".join(lines[:10]) or "invalid request"}, 422)


async def _detail(request: Request, err: Exception, status: int) -> JSONResponse:
    return JSONResponse({"detail": str(err)}, status)


def search_targets(query, cfg: ServingConfig, rows: int) -> tuple[str, ...]:
    """The code sides a search scans, within ``serving.max_hits`` (a QueryError past it)."""
    other = "text" if query.modality == "image" else "image"
    targets = {"other": (other,), "image": ("image",), "text": ("text",), "both": ("image", "text")}[query.target]
    hits = rows * query.k * len(targets)
    if hits > cfg.max_hits:
        raise QueryError(f"the request asks for {hits:,} hits (queries × k × targets), over the limit of "
                         f"{cfg.max_hits:,}: send fewer queries or a smaller k")
    return targets


def submit_deletion(holder: ModelHolder, deletions: Path | None, ids: list[str]) -> DeleteResponse:
    """A deletion request for the pipeline, and the items hidden now (``POST /delete``)."""
    if deletions is None:
        raise _Unavailable("deletion requests are not configured (pipeline.deletions)")
    model = holder.served()
    stored = set(model.store.ids[model.store.rows_present(ids)].tolist())
    erased = {i for i in ids if i not in stored and deleted_id_hash(i) in model.deleted}
    unknown = [i for i in dict.fromkeys(ids) if i not in stored and i not in erased]
    if unknown:
        more = f" and {len(unknown) - 5:,} more" if len(unknown) > 5 else ""
        raise QueryError(f"ids not in the catalogue: {', '.join(map(shown, unknown[:5]))}{more}; nothing was "
                         "requested")
    if not stored:  # every one erased before: nothing to ask
        return DeleteResponse(request=None, ids=len(set(ids)), hidden=0, already_deleted=len(erased))
    try:
        request = write_deletion_request(deletions, list(dict.fromkeys(ids)))
    except BatchError as err:
        raise QueryError(str(err)) from None
    holder.submitted |= stored
    holder.hide(pending_deletion_ids(deletions))
    log.info("deletion request %s: %d ids (%d already erased)", request.name, len(ids), len(erased))
    return DeleteResponse(request=request.name, ids=len(set(ids)), hidden=len(stored), already_deleted=len(erased))


def create_app(models_dir: str | Path, cfg: ServingConfig | None = None, *, watch: bool = True,
               photos: PhotoLimitsConfig | None = None, deletions: str | Path | None = None) -> FastAPI:
    """The app serving ``models_dir``'s promoted version; ``photos``: what a photo query may cost;
    ``deletions``: the pipeline's folder of deletion requests (``POST /delete`` writes there, and
    the items they name are hidden until erased)."""
    cfg = cfg or ServingConfig()
    deletions = Path(deletions) if deletions is not None else None
    holder = ModelHolder(models_dir, cfg.encoder_threads, photos)
    EncodeRequest, SearchRequest = query_models(cfg)
    reader = QueryReader(cfg, holder)
    batcher: QueryBatcher | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal batcher
        holder.follow(deletions)
        batcher = QueryBatcher(cfg.search_threads, max_rows=cfg.max_queries, inline_rows=cfg.inline_rows)
        stop = threading.Event()
        if watch:
            threading.Thread(target=holder.watch, args=(stop, cfg.poll_seconds, deletions), name="model-watcher",
                             daemon=True).start()
        freeze_startup_objects()
        yield
        stop.set()
        batcher.close()

    app = FastAPI(title="lifelong-hashing retrieval", version=__version__, lifespan=lifespan,
                  description="Cross-modal (image↔text) search over binary codes of a lifelong hashing model.")
    app.state.holder = holder
    # Outermost first: a wrong host, then a missing key, is refused before any body is read.
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes, timeout=cfg.request_timeout_seconds)
    key = Environment.read().api_key
    app.add_middleware(ApiKey, key=key.get_secret_value() if key else None, open_paths=("/health",))
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(cfg.allowed_hosts))
    add_error_handlers(app)
    keyed = {"responses": PROBLEMS, "openapi_extra": KEYED}
    components: dict = {}
    add_components(app, components)

    @app.get("/health", responses=PROBLEMS)
    async def health() -> HealthResponse:
        """On the event loop, never behind the search threads: it answers while they are busy."""
        return HealthResponse(status="ok", model_version=holder.served().version)

    @app.get("/version", **keyed)
    def version() -> VersionResponse:
        return VersionResponse(**holder.served().info(), project_version=__version__, last_error=holder.last_error,
                               fallback=holder.fallback, hidden=len(holder.hidden))

    @app.post("/encode", responses={**PROBLEMS, 200: {"model": EncodeResponse}},
              response_class=Response, openapi_extra={**KEYED, **request_schema(EncodeRequest, components)})
    async def encode(request: Request) -> Response:
        query, model, x = await reader.parse(request, EncodeRequest)
        width = model.bits // 8

        def render(codes) -> Response:
            return _json({"model_version": model.version, "bits": model.bits,
                          "codes": [row.view("u1")[:width].tobytes().hex() for row in codes]})

        return await batcher.submit((model, "encode", query.modality), x,
                                    functools.partial(model.encode, query.modality), render,
                                    inline=x.dtype != np.uint8)  # a photo's backbone is too slow for the loop

    @app.post("/search", responses={**PROBLEMS, 200: {"model": SearchResponse}},
              response_class=Response, openapi_extra={**KEYED, **request_schema(SearchRequest, components)})
    async def search(request: Request) -> Response:
        query, model, x = await reader.parse(request, SearchRequest)
        targets = search_targets(query, cfg, len(x))
        where = query.filter.item_filter() if query.filter else None
        model.check_filter(where)
        if holder.hidden:
            where = dataclasses.replace(where or ItemFilter(), exclude=holder.hidden)
        return await batcher.submit(
            (model, "search", query.modality, query.k, query.radius, targets, where), x,
            functools.partial(model.search, query.modality, k=query.k, radius=query.radius, targets=targets,
                              where=where),
            lambda results: _json({"model_version": model.version, "results": results}),
            inline=len(x) * query.k * len(targets) <= cfg.inline_hits and x.dtype != np.uint8)

    @app.post("/delete", status_code=202, **keyed)
    def delete(body: DeleteRequest) -> DeleteResponse:
        """Ask the pipeline to erase items: a deletion request goes into its deletions folder,
        and the items are hidden from every search at once, until a version without them is
        served. An id that is neither served nor erased before is a 422, and nothing is asked."""
        return submit_deletion(holder, deletions, body.ids)

    return app


def freeze_startup_objects() -> None:
    """Move what start-up made (modules, the app, the served model) out of the garbage collector's
    reach. A full collection otherwise walks all of it while requests wait, a pause of tens of
    milliseconds that lands on the tail latency (bench/serve_load.py)."""
    gc.collect()
    gc.freeze()


def _json(payload: dict) -> Response:
    """Rendered with the request's batch (in a worker thread for a large one)."""
    return Response(json.dumps(payload, separators=(",", ":")).encode(), media_type="application/json")


class _Unavailable(RuntimeError):
    pass


async def _refuse(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Counts a request's body bytes as they arrive, chunked or not, and answers 413 as soon as
    they pass ``max_bytes``, 408 when the body is not complete within ``timeout`` seconds; the
    app sees the body only when it is within both. (Under any ASGI server: the connection guard,
    ``guarded_protocol``, also bounds the headers.)"""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout
        self.unguarded_seen = False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self.unguarded_seen and GUARD_EXTENSION not in scope.get("extensions", {}):
            self.unguarded_seen = True
            log.warning("serving without the connection guard (slow or huge headers are not cut off): start with "
                        "`lhash serve`, or `uvicorn serving.app:app --http serving.app:http`")
        too_large = f"request body larger than {self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await _refuse(send, 413, too_large)
        try:
            async with asyncio.timeout(self.timeout):
                chunks = await self._body(receive)
        except TimeoutError:
            return await _refuse(send, 408, f"request body not received within {self.timeout:g} s")
        if chunks is None:
            return None
        if chunks is False:
            return await _refuse(send, 413, too_large)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)

    async def _body(self, receive) -> list[bytes] | None | bool:
        """The body's chunks; None when the client went away, False past ``max_bytes``."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return False
            if not message.get("more_body"):
                return chunks


class ApiKey:
    """With a key set, every path but ``open_paths`` needs it in the ``X-API-Key`` header (401)."""

    def __init__(self, app, key: str | None, open_paths: tuple[str, ...]):
        self.app, self.key, self.open_paths = app, key.encode() if key else None, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key is not None and scope["path"] not in self.open_paths:
            sent = dict(scope["headers"]).get(b"x-api-key", b"")
            if not hmac.compare_digest(sent, self.key):
                return await _refuse(send, 401, "missing or wrong X-API-Key header")
        return await self.app(scope, receive, send)


GUARD_EXTENSION = "lifelong_hashing.connection_guard"  # in a request's scope when the guard serves it


def guarded_protocol(cfg: ServingConfig):
    """uvicorn's httptools protocol with the limits uvicorn alone does not have: a connection
    past ``max_connections`` is refused at once (it holds no file descriptor); one that sends no
    request headers within ``header_timeout_seconds`` is closed, and one whose request (headers
    and body) takes longer than ``request_timeout_seconds`` gets 408 and is closed (idle,
    trickling and slow-body clients); request line and headers past ``max_header_bytes`` get 431,
    so a connection never holds more than that before the body, which ``BodyLimit`` bounds.

    It subclasses a class uvicorn does not document (``HttpToolsProtocol``), which is why
    pyproject pins uvicorn to one minor version and ``test_serving`` checks the pin and each
    limit on a real server. Start the app with it: ``lhash serve``, or
    ``uvicorn serving.app:app --http serving.app:http`` (requests served without it are logged)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedProtocol(HttpToolsProtocol):
        _header_timer = _request_timer = None
        _header_bytes, _in_headers = 0, True

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > cfg.max_connections:
                log.warning("refusing a connection: %d open (serving.max_connections)", len(self.connections) - 1)
                transport.abort()
                return
            self._header_timer = self.loop.call_later(cfg.header_timeout_seconds, self._expire, None)

        def data_received(self, data: bytes) -> None:
            if self._in_headers:  # at most one read past the limit is ever buffered
                self._header_bytes += len(data)
            super().data_received(data)
            if self._in_headers and self._header_bytes > cfg.max_header_bytes:
                self._expire(b"431 Request Header Fields Too Large")

        def on_message_begin(self):
            super().on_message_begin()
            self._in_headers = True
            timeout = b"408 Request Timeout"
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(cfg.header_timeout_seconds, self._expire, timeout)
            self._request_timer = self.loop.call_later(cfg.request_timeout_seconds, self._expire, timeout)

        def on_headers_complete(self):
            self._in_headers, self._header_bytes = False, 0
            self._header_timer = _cancel(self._header_timer)
            self.scope.setdefault("extensions", {})[GUARD_EXTENSION] = {}
            super().on_headers_complete()

        def on_message_complete(self):
            self._request_timer = _cancel(self._request_timer)
            super().on_message_complete()

        def connection_lost(self, exc):
            self._header_timer, self._request_timer = _cancel(self._header_timer), _cancel(self._request_timer)
            super().connection_lost(exc)

        def _expire(self, status: bytes | None) -> None:
            """Close the connection; a request under way is first told why (``status``)."""
            self._header_timer, self._request_timer = _cancel(self._header_timer), _cancel(self._request_timer)
            if self.transport.is_closing():
                return
            if status is not None and not getattr(self.cycle, "response_started", False):
                self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    return GuardedProtocol


def _cancel(timer) -> None:
    if timer is not None:
        timer.cancel()


def run_server(app: FastAPI, cfg: ServingConfig, host: str, port: int) -> None:
    """uvicorn with the limits of ``serving``: connections, in-flight requests, timeouts."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="info", http=guarded_protocol(cfg),
                            limit_concurrency=cfg.max_connections, timeout_keep_alive=cfg.keep_alive_seconds,
                            backlog=cfg.backlog)
    uvicorn.Server(config).run()
