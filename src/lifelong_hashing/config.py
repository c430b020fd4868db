"""Run configuration: the single typed view of ``params.yaml``.

Unknown keys are errors (``extra="forbid"``) so a typo in params fails loudly instead of being
silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MethodName = Literal["joint", "finetune", "dlch", "ccmh_gam", "orthohash"]
METHOD_NAMES: tuple[str, ...] = MethodName.__args__


SECRETS_DIR = Path("/run/secrets")  # Docker's and Kubernetes' secret files, when the folder exists


class Environment(BaseSettings):
    """What comes from the machine rather than params.yaml: secrets and local paths, read from
    ``LHASH_*`` variables (pydantic-settings), or for secrets from a file of the variable's name
    in ``/run/secrets`` (e.g. ``/run/secrets/lhash_api_key``). A variable set empty is unset."""

    model_config = SettingsConfigDict(env_prefix="LHASH_", extra="ignore", case_sensitive=False)

    api_key: SecretStr | None = None  # LHASH_API_KEY: every path of the service but /health needs it
    cache: Path | None = None  # LHASH_CACHE: the converted backbone weights (default ~/.cache/lifelong-hashing)

    @field_validator("api_key", "cache", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return None if value == "" else value

    @classmethod
    def read(cls) -> Environment:
        return cls(_secrets_dir=SECRETS_DIR if SECRETS_DIR.is_dir() else None)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)  # defaults coerced like values read from YAML


class DatasetConfig(_Strict):
    """Where the items come from. ``npz``: a generic npz with named keys (the Wikipedia default);
    ``dcmh_mat``: a folder of DCMH-style .mat files; ``synthetic``: the seeded generator."""

    kind: Literal["npz", "dcmh_mat", "synthetic"] = "npz"
    path: str = "data/wikipedia/wikipedia.npz"
    name: str = "wikipedia"
    image_key: str = "image_sift_bovw"
    text_key: str = "text_tfidf"
    labels_key: str = "category"
    categories_key: str | None = "category_names"
    ids_key: str | None = "text_id"
    split_key: str | None = "split"
    category_names: list[str] | None = None
    vocabulary_key: str | None = None  # words of the text features' columns, for word queries
    idf_key: str | None = None  # per-column idf weights when the texts are TF-IDF
    text_l2_normalize: bool = False  # whether text rows were L2-normalized
    query_size: int = Field(2000, gt=0)
    # ``test``: the held-out queries; ``validation``: queries drawn from the training side (this
    # share of it, seeded), removed from the database, the test queries never loaded. Every sweep
    # and choice runs on ``validation`` (bench/tune.py); only bench/quality.py reports ``test``.
    queries: Literal["test", "validation"] = "test"
    validation_share: float = Field(0.15, gt=0, lt=1)
    # synthetic generator only
    n_items: int = Field(6000, gt=0)
    n_categories: int = Field(12, gt=1)
    image_dim: int = Field(128, gt=0)
    text_dim: int = Field(300, gt=0)
    noise: float = Field(0.8, ge=0)


# The datasets shipped in data/ (each folder's README says what it is): ``dataset: NAME`` in
# params, or ``-S dataset=NAME``, stands for its entry here.
EMBEDDED_DATASETS: dict[str, dict] = {
    "wikipedia": {"kind": "npz", "path": "data/wikipedia/wikipedia.npz", "name": "wikipedia",
                  "image_key": "image_sift_bovw", "text_key": "text_tfidf", "labels_key": "category",
                  "categories_key": "category_names", "ids_key": "text_id", "split_key": "split"},
    # real labels, tags and image features (SqueezeNet, data/mirflickr25k/README.md); DCMH's 2,000 random queries
    "mirflickr25k": {"kind": "npz", "path": "data/mirflickr25k/mirflickr25k.npz", "name": "mirflickr25k",
                     "image_key": "image_squeezenet", "text_key": "text_tags_bow", "labels_key": "labels",
                     "categories_key": "category_names", "ids_key": "ids", "split_key": None, "query_size": 2000},
}


class StagesConfig(_Strict):
    """Category-incremental stages: explicit ``groups`` of category names, or the first ``base``
    categories (in ``order``, default vocabulary order) then ``per_stage`` more per stage."""

    groups: list[list[str]] | None = None
    order: list[str] | None = None
    base: int = Field(4, gt=0)
    per_stage: int = Field(2, gt=0)
    # share of each stage's items that arrive unlabelled (seeded): stored with encoder codes,
    # never trained on, their labels kept only to score retrieval (the mixed catalogue)
    unlabelled_share: float = Field(0.0, ge=0, lt=1)


class ModelConfig(_Strict):
    bits: int = Field(64, ge=8, le=1024)
    hidden: list[int] = Field(default_factory=lambda: [1024, 512])
    dropout: float = Field(0.1, ge=0, lt=1)
    image_encoder: Literal["mlp", "cnn"] = "mlp"
    # ``squeezenet1_1``: images arrive as photos (docs/images.md), read by the frozen pretrained
    # backbone into its features; the image encoder learns on them and is exported with the
    # backbone inside, taking uint8 pixels. ``none``: images arrive as feature vectors.
    image_backbone: Literal["none", "squeezenet1_1"] = "none"

    @model_validator(mode="after")
    def _bits_multiple_of_8(self):
        if self.bits % 8:
            raise ValueError(f"bits must be a multiple of 8, got {self.bits}")
        return self


class TrainConfig(_Strict):
    epochs: int = Field(40, gt=0)
    lifelong_epochs: int = Field(10, gt=0)  # stages after the base one start from trained encoders
    batch_size: int = Field(128, gt=0)
    lr: float = Field(1e-3, gt=0)
    lifelong_lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # PyTorch's CPU threads. Part of what fixes the codes: another count changes the order of
    # floating-point reductions (MKL/oneDNN), hence some bits (docs/pipeline.md, "Reproducibility").
    threads: int = Field(2, gt=0)


class OrthoHashConfig(_Strict):
    scale: float = 8.0
    margin: float = 0.2
    min_distance: float = Field(0.6, gt=0, le=1)  # of K bits, relaxed until a row fits
    distill: float = Field(0.0, ge=0)  # weight of the previous model's old-class logits (lifelong; tuning: 0)
    temperature: float = Field(2.0, gt=0)


class DLCHConfig(_Strict):
    alpha: float = 10.0  # outputs to their item's discrete code
    beta: float = 1.0  # bit balance
    gamma: float = 1.0  # graded pairwise terms of the base stage
    old_sample: int = Field(2000, ge=0)  # frozen old codes drawn per lifelong epoch
    dcc_iters: int = Field(3, gt=0)


class CCMHGAMConfig(_Strict):
    label_epochs: int = Field(300, gt=0)
    label_lr: float = Field(1e-2, gt=0)  # the label network is tiny and sees few distinct vectors
    replay_weight: float = 1.0
    projection: bool = True


class MethodConfig(_Strict):
    name: MethodName = "orthohash"
    # What a labelled database item stores, for every method (docs/methods.md, "Storing rule"):
    # ``labels``, the code the method gives its labels; ``encoders``, each modality's encoder
    # code. An unlabelled item always stores its encoders' codes.
    database_codes: Literal["labels", "encoders"] = "labels"
    memory_per_category: int = Field(1000, ge=0)  # exemplars the lifelong methods keep per category
    # memory rows a lifelong epoch draws per old category (OrthoHash, DLCH): a stage's cost is
    # the new batch plus this, however large the memory (memory.replay_draws)
    replay_per_category: int = Field(100, gt=0)
    orthohash: OrthoHashConfig = OrthoHashConfig()
    dlch: DLCHConfig = DLCHConfig()
    ccmh_gam: CCMHGAMConfig = CCMHGAMConfig()


class EvalConfig(_Strict):
    map_at: list[int] = Field(default_factory=lambda: [50, 500])
    precision_at: list[int] = Field(default_factory=lambda: [10, 100])


class RunConfig(_Strict):
    out_dir: str = "runs/wikipedia"


class CompareConfig(_Strict):
    methods: list[MethodName] = Field(
        default_factory=lambda: list(METHOD_NAMES))
    out_dir: str = "runs/compare"


class ExportConfig(_Strict):
    models_dir: str = "models"
    int8_min_agreement: float | None = Field(None, gt=0, le=1)  # null: no int8 copies (docs/serving.md: why)


class IndexConfig(_Strict):
    """The search structure served beside the exact code store, built at export (inference/indexes.py)."""

    kind: Literal["flat", "multihash", "ivf"] = "flat"  # flat: exact; the others: faiss, approximate
    ivf_lists: int = Field(1024, gt=0)  # inverted lists (at most one per 39 codes)
    ivf_probes: int = Field(16, gt=0)  # lists scanned per query: recall against speed
    multihash_tables: int = Field(3, gt=0)  # hash tables, each on bits // tables bits of the code
    multihash_flips: int = Field(2, ge=0)  # bits flipped when probing a table's buckets


class ServingConfig(_Strict):
    """The retrieval service (``lhash serve``) and what one client may take of it."""

    host: str = "127.0.0.1"  # loopback; a proxy in front serves others (docs/serving.md)
    port: int = Field(8000, gt=0, lt=65536)
    max_k: int = Field(1000, gt=0)
    max_queries: int = Field(256, gt=0)
    max_hits: int = Field(50_000, gt=0)  # queries × k × targets of one request
    max_body_bytes: int = Field(8 << 20, gt=0)  # counted as the bytes arrive, chunked or not
    search_threads: int = Field(2, gt=0)  # encode/search batches at once; waiting requests join one
    encoder_threads: int = Field(1, ge=0)  # ONNX Runtime threads per encoder run (0: one per core)
    inline_rows: int = Field(8, ge=0)  # requests this small run on the event loop (batching.py); 0: none
    inline_hits: int = Field(1000, ge=0)  # ... and, for /search, with at most this many hits
    max_connections: int = Field(1024, gt=0)  # more are closed on accept; requests past it get 503
    header_timeout_seconds: float = Field(10.0, gt=0)  # a connection must send its headers by then
    request_timeout_seconds: float = Field(30.0, gt=0)  # ... and a request its headers and body (408)
    max_header_bytes: int = Field(65_536, gt=0)  # request line and headers (431 beyond)
    keep_alive_seconds: int = Field(5, gt=0)  # idle keep-alive connections are closed after this
    backlog: int = Field(512, gt=0)
    allowed_hosts: list[str] = ["127.0.0.1", "localhost", "::1"]  # Host header check; ["*"]: any
    poll_seconds: float = Field(1.0, gt=0)
    index: IndexConfig = IndexConfig()


class PhotoLimitsConfig(_Strict):
    """What one photo may cost, checked from its size and header before it is decoded
    (``images.decode_photo``): batches, ``lhash search --image`` and the service alike."""

    max_file_bytes: int = Field(20_000_000, gt=0)
    max_pixels: int = Field(50_000_000, gt=0)  # declared width × height; decoding takes 3 bytes a pixel
    max_side: int = Field(20_000, gt=0)


class ValidationConfig(_Strict):
    """Bounds an incoming batch must meet (``lhash validate``); ranges come from the reference data."""

    range_tolerance: float = Field(1.0, ge=0)  # allowed overshoot beyond a feature's seen range, × range
    max_out_of_range_share: float = Field(0.05, ge=0, le=1)  # of one item's feature dimensions
    min_rows: int = Field(1, gt=0)
    max_rows: int = Field(1_000_000, gt=0)  # refused from the file's headers, before decompressing
    max_bytes: int = Field(2_000_000_000, gt=0)  # the arrays' declared uncompressed size, likewise
    max_labels_per_item: int | None = Field(None, gt=0)  # null: the most any reference item has
    max_categories: int = Field(1_000, gt=0)  # a batch may name, and the model may know, this many (headers)
    reports_dir: str = "reports/validation"


class MonitoringConfig(_Strict):
    """Evidently reports per increment and the thresholds that raise alerts (``lhash monitor``)."""

    reports_dir: str = "reports/monitoring"
    workspace: str = "reports/workspace"  # an Evidently workspace: ``evidently ui --workspace ...``
    project: str = "lifelong-hashing"
    reference_rows_per_stage: int = Field(500, gt=0)  # feature rows kept per stage for drift tests
    projection_dims: int = Field(8, gt=0)  # PCA components per modality in the drift report
    drift_share: float = Field(0.5, gt=0, le=1)  # share of drifted columns that flags a modality
    max_forgetting: float = Field(0.5, ge=0)  # alert when any task's forgetting exceeds this (mAP)
    max_average_map_drop: float = Field(0.25, ge=0)  # alert when average mAP falls more in a stage
    max_bit_imbalance: float = Field(0.5, ge=0, le=1)  # warn when a bit's |mean| (±1 codes) exceeds it
    # warn when more items share a code; null: report only (class-code methods collide by design)
    max_collision_share: float | None = Field(None, ge=0, le=1)


class DiscoveryConfig(_Strict):
    """New categories in what arrives unlabelled (engine/discovery.py): every unlabelled item of
    a batch is scored for novelty against the model before the batch, items past the threshold
    are flagged and grouped into proposals, and with ``ask`` the run then waits for a person to
    name them in a Prefect input form (docs/pipeline.md, "Discovering new categories")."""

    enabled: bool = True
    quantile: float = Field(0.95, gt=0, lt=1)  # of held-out known items' scores: the threshold
    min_flagged: int = Field(6, ge=2)  # fewer flagged items make no proposals
    ask: bool = True  # pause for a person to name the proposals (after the run's batches, lock released)
    answer_timeout_seconds: int = Field(3600, gt=0)  # unanswered: the proposals stay, nothing is lost


class DaskConfig(_Strict):
    """Where the pipeline's data-parallel work runs (flows/pipeline.py), shard by shard: database
    encoding (a batch of known categories, the joint baseline's re-encoding) and scoring the
    evaluation queries. Neither ``address`` nor ``workers`` set: in the flow's own process."""

    address: str | None = None  # an existing Dask scheduler, e.g. tcp://10.0.0.5:8786
    workers: int = Field(0, ge=0)  # else a LocalCluster of this many worker processes, for the run
    shard_rows: int = Field(65_536, gt=0)  # rows per shard (rounded up to whole encoder blocks)
    query_shard_rows: int = Field(1024, gt=0)  # evaluation queries per shard (each scored against the whole store)

    @property
    def enabled(self) -> bool:
        return bool(self.address) or self.workers > 0


class PipelineConfig(_Strict):
    """The operational pipeline (``flows/``): where batches arrive, where rejected ones go, and
    the git + DVC repository that keeps every promoted version."""

    incoming: str = "data/incoming"  # drop batch .npz files here
    quarantine: str = "data/quarantine"  # rejected batches, each with its validation report
    deletions: str = "data/deletions"  # drop .txt files of item ids (one a line) to erase those items
    # A batch item whose id is stored already: "reject" the batch (quarantined, naming the id), or
    # "replace" the item (old code removed, the new one appended; counted as items_replaced)
    repeated_ids: Literal["reject", "replace"] = "reject"
    workspace: str = "runs/pipeline"  # git + DVC repository: state, models, batches, reports, metrics
    remote: str = "runs/dvc-remote"  # DVC remote: a folder (created on first use) or any DVC URL
    queries: str | None = None  # evaluation queries (a batch .npz); null: the dataset's query split
    block_on_alerts: bool = True  # a monitoring alert (forgetting, mAP drop) stops promotion
    lock_timeout_seconds: float = Field(600.0, ge=0)  # how long a run waits for another to finish
    push_retries: int = Field(3, ge=0)
    max_attempts: int = Field(3, gt=0)  # runs a batch may fail for reasons not its own before it is poison
    step_timeout_seconds: float = Field(3600.0, gt=0)  # validate, train, export, monitor: past it, a failed attempt
    dask: DaskConfig = DaskConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()


class Params(_Strict):
    seed: int = 0
    dataset: DatasetConfig = DatasetConfig()
    stages: StagesConfig = StagesConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    method: MethodConfig = MethodConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()
    compare: CompareConfig = CompareConfig()
    export: ExportConfig = ExportConfig()
    serving: ServingConfig = ServingConfig()
    validation: ValidationConfig = ValidationConfig()
    photos: PhotoLimitsConfig = PhotoLimitsConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    pipeline: PipelineConfig = PipelineConfig()

    @field_validator("dataset", mode="before")
    @classmethod
    def _embedded_dataset(cls, value):
        if isinstance(value, str):
            if value not in EMBEDDED_DATASETS:
                raise ValueError(f"unknown embedded dataset {value!r}; choose one of {sorted(EMBEDDED_DATASETS)} "
                                 "or give the dataset's keys")
            return EMBEDDED_DATASETS[value]
        return value


class ConfigError(ValueError):
    pass


def add_params_arguments(parser) -> None:
    """``--params FILE`` and ``-S key=value`` on an argparse parser: every entry point has both."""
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -S method.name=dlch -S model.bits=32")


def parse_overrides(pairs: list[str]) -> dict:
    """``-S model.bits=32`` style overrides, values parsed as YAML (numbers, lists, strings)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r} must look like section.key=value")
        out[key] = yaml.safe_load(value)
    return out


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Read params.yaml, apply dotted ``overrides`` ({"method.name": "dlch"}), validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: params file not found") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {err}") from err
