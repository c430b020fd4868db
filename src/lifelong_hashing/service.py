"""The HTTP retrieval service (FastAPI): a thin layer over ``retrieval.RetrievalModel``.

It serves the version named by ``models/CURRENT`` and follows promotions: a watcher thread loads a
newly promoted version in the background and swaps it in with one reference assignment, so
requests in flight finish on the version they started with; a version that fails to load is
refused and the old one stays. Every bad request gets a 4xx that says what is wrong.
"""


import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from . import __version__
from .config import ServingConfig
from .retrieval import ModelLoadError, QueryError, RetrievalModel
from .versions import current_version, versions_dir

log = logging.getLogger("lifelong_hashing.service")


class ModelHolder:
    """The served model and the pointer it came from; swapped whole, never mutated."""

    def __init__(self, models_dir: str | Path):
        self.models_dir = Path(models_dir)
        self.model: RetrievalModel | None = None
        self.seen_pointer: str | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Load the promoted version if it changed; True when a new one was swapped in."""
        with self._lock:
            name = current_version(self.models_dir)
            if name is None or name == self.seen_pointer:
                return False
            self.seen_pointer = name
            try:
                model = RetrievalModel(versions_dir(self.models_dir) / name)
            except ModelLoadError as err:
                self.last_error = f"refused version {name}: {err}"
                log.error(self.last_error)
                return False
            self.model, self.last_error = model, None
            log.info("serving model version %s", name)
            return True


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


def create_app(models_dir: str | Path, cfg: ServingConfig | None = None, *, watch: bool = True) -> FastAPI:
    cfg = cfg or ServingConfig()
    holder = ModelHolder(models_dir)
    stop = threading.Event()

    class Query(_Strict):
        modality: Literal["image", "text"]
        features: Annotated[list[list[float]], Field(min_length=1, max_length=cfg.max_queries)] | None = Field(
            None, description="one feature row per query")
        words: Annotated[list[Annotated[list[str], Field(min_length=1, max_length=10_000)]],
                         Field(min_length=1, max_length=cfg.max_queries)] | None = Field(
            None, description="text queries as word lists (models with a text vocabulary)")

    class SearchRequest(Query):
        k: int = Field(10, ge=1, le=cfg.max_k)
        radius: int | None = Field(None, ge=0, description="only hits within this Hamming distance")
        target: Literal["other", "image", "text", "both"] = "other"


    def watch_pointer():
        while not stop.wait(cfg.poll_seconds):
            try:
                holder.refresh()
            except OSError as err:  # a pointer being replaced mid-read: next poll sees it whole
                log.warning("cannot read the model pointer: %s", err)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        holder.refresh()
        thread = threading.Thread(target=watch_pointer, name="model-watcher", daemon=True)
        if watch:
            thread.start()
        yield
        stop.set()

    app = FastAPI(title="lifelong-hashing retrieval", version=__version__, lifespan=lifespan,
                  description="Cross-modal (image↔text) search over binary codes of a lifelong hashing model.")
    app.state.holder = holder
    problems = {code: {"model": Problem} for code in (400, 413, 422, 503)}

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cfg.max_body_bytes):
            return JSONResponse({"detail": f"request body larger than {cfg.max_body_bytes} bytes"}, 413)
        return await call_next(request)

    @app.exception_handler(QueryError)
    async def query_error(request: Request, err: QueryError):
        return JSONResponse({"detail": str(err)}, 422)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        """One readable line per problem ("body.k: Input should be less than or equal to 1000")."""
        lines = [".".join(str(p) for p in e.get("loc", ())) + ": " + str(e.get("msg", "invalid"))
                 for e in err.errors()]
        return JSONResponse({"detail": "; ".join(lines[:10]) or "invalid request"}, 422)

    def served() -> RetrievalModel:
        model = holder.model
        if model is None:
            raise _Unavailable(holder.last_error or f"no model version promoted in {holder.models_dir}")
        return model

    @app.exception_handler(_Unavailable)
    async def unavailable(request: Request, err: _Unavailable):
        return JSONResponse({"detail": str(err)}, 503)

    @app.get("/health", responses=problems)
    def health() -> dict:
        model = served()
        return {"status": "ok", "model_version": model.version}

    @app.get("/version", responses=problems)
    def version() -> dict:
        model = served()
        return {**model.info(), "project_version": __version__, "last_error": holder.last_error}

    @app.post("/encode", responses=problems)
    def encode(query: Query) -> EncodeResponse:
        model = served()
        x = model.features(query.modality, query.features, query.words)
        codes = model.encode(query.modality, x)
        width = model.bits // 8
        return EncodeResponse(model_version=model.version, bits=model.bits,
                              codes=[row.view("u1")[:width].tobytes().hex() for row in codes])

    @app.post("/search", responses=problems)
    def search(query: SearchRequest) -> SearchResponse:
        model = served()
        x = model.features(query.modality, query.features, query.words)
        other = "text" if query.modality == "image" else "image"
        targets = {"other": (other,), "image": ("image",), "text": ("text",), "both": ("image", "text")}[query.target]
        results = model.search(query.modality, x, query.k, query.radius, targets)
        return SearchResponse(model_version=model.version,
                              results=[{t: [Hit(**vars(h)) for h in hits] for t, hits in r.items()} for r in results])

    return app


class _Unavailable(RuntimeError):
    pass
