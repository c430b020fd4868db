"""One Evidently report per increment: input drift, code-space health, retrieval and forgetting.

The report compares the stage's new items (current) with the items of earlier stages
(reference), both taken from the state's reference sample (``reference.py``) with their codes
from the code store. Its parts:

1. input drift per modality: the share of raw feature dimensions whose K-S test rejects (one
   vectorized custom metric, fast at 1,000+ dimensions), and Evidently's own drift tests on a
   PCA projection fitted on the reference (few columns, with its distribution plots);
2. code-space health per modality: bit balance, per-bit entropy, share of colliding codes and
   the Hamming distance distributions within old, within new and between old and new codes;
3. retrieval and forgetting per direction: the stage×task mAP matrix as a plot, forgetting per
   task and the change of average mAP, with tests whose thresholds come from params.

Failed forgetting or mAP tests are *alerts* (the flow should not promote silently); drift and
code-health findings are *warnings*. ``MonitorReport`` carries both, machine-readable, and every
report is added to an Evidently workspace so ``evidently ui`` shows the history.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lifelong_hashing.config import MonitoringConfig
from lifelong_hashing.engine.codestore import MODALITIES, unpack_codes
from lifelong_hashing.engine.metrics import DIRECTIONS, stage_task_matrix
from lifelong_hashing.files import write_json, write_text
from lifelong_hashing.operations.code_health import pca_projection

SNAPSHOT_FILE = "snapshot.json"  # the full snapshot, loadable again (evidently.json holds the results)


def stage_report_name(stage: int) -> str:
    """The folder of an increment's report, wherever reports are kept."""
    return f"stage-{stage:02d}"


# ---- the report ---------------------------------------------------------------------------

@dataclass
class MonitorReport:
    stage: int
    alerts: list[str]  # failed critical tests: forgetting or mAP drop beyond the thresholds
    warnings: list[str]  # failed non-critical tests: drift, code health
    values: dict[str, float]  # every metric's value by name
    html_path: str | None = None
    json_path: str | None = None
    workspace: str | None = None
    snapshot_id: str | None = None
    tests: list[dict] = field(default_factory=list)  # name, status, description of every test

    @property
    def ok(self) -> bool:
        return not self.alerts

    def summary(self) -> str:
        lines = [f"stage {self.stage}: {'OK' if self.ok else 'ALERT'} ({len(self.alerts)} alerts, "
                 f"{len(self.warnings)} warnings)"]
        lines += [f"  ALERT   {a}" for a in self.alerts] + [f"  warning {w}" for w in self.warnings]
        lines += [f"  {k}: {v}" for k, v in (("report", self.html_path), ("json", self.json_path),
                                              ("workspace", self.workspace)) if v]
        return "\n".join(lines)


def drift_frames(reference: dict[str, np.ndarray], current: dict[str, np.ndarray], projection_dims: int,
                 reference_codes: dict[str, np.ndarray] | None = None,
                 current_codes: dict[str, np.ndarray] | None = None):
    """Two pandas frames with, per modality, raw features (``image_f*``), their PCA projection
    fitted on the reference (``image_pc*``) and, when given, ±1 codes as 0/1 (``image_bit*``)."""
    import pandas as pd

    ref_cols, cur_cols = {}, {}
    for m in reference:
        r, c = np.asarray(reference[m], np.float64), np.asarray(current[m], np.float64)
        mean, axes = pca_projection(r, projection_dims) if len(r) > 1 else (None, None)
        for name, x, out in ((m, r, ref_cols), (m, c, cur_cols)):
            out.update({f"{name}_f{i}": x[:, i] for i in range(x.shape[1])})
            if axes is not None:
                proj = (x - mean) @ axes.T
                out.update({f"{name}_pc{k}": proj[:, k] for k in range(proj.shape[1])})
    for codes, out in ((reference_codes, ref_cols), (current_codes, cur_cols)):
        for m, bits in (codes or {}).items():
            out.update({f"{m}_bit{j}": (bits[:, j] > 0).astype(np.int8) for j in range(bits.shape[1])})
    return pd.DataFrame(ref_cols), pd.DataFrame(cur_cols)


def build_report(reference_frame, current_frame, config: MonitoringConfig, history: list[dict] | None = None,
                 title: str = "Lifelong hashing increment", metadata: dict | None = None):
    """Run the Evidently report (drift where there is a reference, code health where the frames
    carry codes, retrieval/forgetting where there is a history); returns the snapshot."""
    os.environ.setdefault("DO_NOT_TRACK", "1")  # Evidently's telemetry: no network at run time
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, ValueDrift
    from evidently.tests import lte

    from lifelong_hashing.operations import evidently_metrics as custom

    modalities = [m for m in MODALITIES if f"{m}_f0" in current_frame.columns]
    coded = [m for m in MODALITIES if f"{m}_bit0" in current_frame.columns]
    has_reference = reference_frame is not None and len(reference_frame) > 1
    metrics = []
    if has_reference:
        for m in modalities:
            pcs = [c for c in current_frame.columns if c.startswith(f"{m}_pc")]
            metrics.append(custom.FeatureDriftShare(modality=m, tests=[lte(config.drift_share, is_critical=False)]))
            metrics.append(DriftedColumnsCount(columns=pcs, drift_share=config.drift_share,
                                               share_tests=[lte(config.drift_share, is_critical=False)]))
            metrics += [ValueDrift(column=c, tests=[]) for c in pcs[:2]]
    for m in coded:
        metrics.append(custom.BitBalance(modality=m, tests=[lte(config.max_bit_imbalance, is_critical=False)]))
        metrics.append(custom.BitEntropy(modality=m, tests=[]))
        collisions = [] if config.max_collision_share is None else [lte(config.max_collision_share, is_critical=False)]
        metrics.append(custom.CodeCollisions(modality=m, tests=collisions))
    for direction in DIRECTIONS if history else ():
        matrix = stage_task_matrix(history, direction)
        metrics.append(custom.Forgetting(direction=direction, tests=[lte(config.max_forgetting, is_critical=True)])
                       .with_matrix(matrix))
        metrics.append(custom.AverageMapDrop(direction=direction,
                                             tests=[lte(config.max_average_map_drop, is_critical=True)])
                       .with_matrix(matrix))
    shares = {t: r["novelty"]["share"] for t, r in enumerate(history or []) if r.get("novelty")}
    if shares:  # discovery: how much of what arrived unlabelled looked new, stage by stage
        metrics.append(custom.NoveltyShare(tests=[]).with_shares(shares))
    definition = DataDefinition(numerical_columns=list(current_frame.columns))
    report = Report(metrics, include_tests=True, metadata=metadata or {}, tags=["lifelong-hashing"])
    current = Dataset.from_pandas(current_frame, data_definition=definition)
    reference = Dataset.from_pandas(reference_frame, data_definition=definition) if has_reference else None
    return report.run(current, reference, name=title)


def snapshot_findings(snapshot) -> tuple[list[str], list[str], dict[str, float], list[dict]]:
    """Alerts (critical failures), warnings (non-critical), metric values by ``Name[subject]``
    and every test, from an Evidently snapshot."""
    data = snapshot.dict()
    values, labels = {}, {}
    for metric in data["metrics"]:
        label = _metric_label(metric["metric_name"].split("(")[0], metric["config"])
        value = metric["value"]
        labels[metric["id"]] = label
        values[label] = float(value["share"] if isinstance(value, dict) else value)
    alerts, warnings, tests = [], [], []
    for test in data["tests"]:
        status = str(getattr(test["status"], "value", test["status"]))
        text = f"{labels.get(test['metric_config']['metric_id'], test['name'])}: {test['description']}"
        tests.append({"name": test["name"], "status": status, "description": text})
        if status == "FAIL":
            alerts.append(text)
        elif status in ("WARNING", "ERROR"):
            warnings.append(text)
    return alerts, warnings, values, tests


def _metric_label(name: str, params: dict) -> str:
    """``Forgetting[i2t]``, ``FeatureDriftShare[image]``, ``DriftedColumnsCount[image_pc]`` ..."""
    if "columns" in params:
        subject = os.path.commonprefix(params["columns"]).rstrip("0123456789")
    else:
        subject = "/".join(str(params[k]) for k in ("modality", "direction", "column") if k in params)
    return f"{name}[{subject}]" if subject else name


def monitor_state(state, config: MonitoringConfig, *, stage: int | None = None, out_dir: str | Path | None = None,
                  workspace: str | Path | None = None, to_workspace: bool = True) -> MonitorReport:
    """Write the report of one increment of a state (default: the latest) as HTML and JSON and,
    unless told not to, add it to the Evidently workspace (``workspace`` or the configured one)."""
    from lifelong_hashing.engine.state import StateError

    t = state.stage if stage is None else stage
    if not 0 <= t <= state.stage:
        raise StateError(f"stage {t} is not in this state (stages 0..{state.stage})")
    ref = state.reference
    old, new = ref.rows(slice(None, t)), ref.rows(t)
    if not new.any():
        raise StateError(f"the state has no reference sample of stage {t} (saved by an older version: "
                         "run the stages again to monitor them)")
    codes = {m: _codes_for(state.store, ref.ids, m) for m in MODALITIES}
    reference_frame, current_frame = drift_frames(
        {m: ref.samples[m][old] for m in MODALITIES}, {m: ref.samples[m][new] for m in MODALITIES},
        config.projection_dims, {m: c[old] for m, c in codes.items()}, {m: c[new] for m, c in codes.items()})
    if not old.any():
        reference_frame = None
    title = f"Lifelong hashing increment: stage {t} ({state.method.name}, {state.params.dataset.name})"
    metadata = {"stage": t, "method": state.method.name, "dataset": state.params.dataset.name,
                "bits": state.params.model.bits}
    snapshot = build_report(reference_frame, current_frame, config, state.history[: t + 1], title, metadata)
    out = Path(out_dir) if out_dir else Path(config.reports_dir) / stage_report_name(t)
    target = Path(workspace or config.workspace) if to_workspace else None
    return save_report(snapshot, t, out, target, config.project)


def save_report(snapshot, stage: int, out: Path, workspace: Path | None, project: str) -> MonitorReport:
    """Write report.html, evidently.json and monitor.json; with ``workspace``, add the snapshot there."""
    alerts, warnings, values, tests = snapshot_findings(snapshot)
    out.mkdir(parents=True, exist_ok=True)
    html, raw = out / "report.html", out / "evidently.json"
    snapshot.save_html(str(html))
    _add_title(html, snapshot.get_name() or f"Stage {stage}")
    snapshot.save_json(str(raw))
    write_text(out / SNAPSHOT_FILE, snapshot.dumps())
    report = MonitorReport(stage, alerts, warnings, values, str(html), str(out / "monitor.json"), tests=tests)
    if workspace is not None:
        report.workspace, report.snapshot_id = str(workspace), add_to_workspace(snapshot, workspace, project)
    write_json(out / "monitor.json", asdict(report))
    return report


def add_to_workspace(snapshot, workspace: str | Path, project: str) -> str:
    """Add a snapshot (or a report folder's saved one) to the workspace project, creating both on
    first use; returns the snapshot id."""
    from evidently.core.report import Snapshot
    from evidently.ui.workspace import Workspace

    from lifelong_hashing.operations import evidently_metrics  # noqa: F401  (the custom metrics must be known to load one)

    if not isinstance(snapshot, Snapshot):
        snapshot = Snapshot.load(str(Path(snapshot) / SNAPSHOT_FILE))
    ws = Workspace.create(str(workspace))
    found = ws.search_project(project)
    proj = found[0] if found else _new_project(ws, project)
    return str(ws.add_run(proj.id, snapshot).id)


def _new_project(ws, name: str):
    """A workspace project whose dashboard plots the history across increments."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import line_plot_panel

    project = ws.create_project(name, description="one Evidently snapshot per lifelong increment")
    modalities = {m: m for m in MODALITIES}
    directions = {key: d.name for key, d in DIRECTIONS.items()}
    panels = [
        ("Forgetting (largest over earlier tasks)", "Forgetting", "direction", directions),
        ("Average mAP drop in the stage", "AverageMapDrop", "direction", directions),
        ("Share of raw feature dimensions drifted", "FeatureDriftShare", "modality", modalities),
        ("Mean bit entropy", "BitEntropy", "modality", modalities),
    ]
    for title, metric, label, subjects in panels:
        project.dashboard.add_panel(line_plot_panel(title, [
            PanelMetric(legend=name, metric=metric, metric_labels={label: key}) for key, name in subjects.items()]))
    return project


def _add_title(html: Path, title: str) -> None:
    """Evidently's page has no title or heading of its own; give it the report's."""
    from html import escape

    page = html.read_text()
    page = page.replace("<head>", f"<head>\n<title>{escape(title)}</title>", 1)
    page = page.replace("<body>", f'<body>\n<h1 style="font-family: sans-serif; margin: 16px">{escape(title)}</h1>', 1)
    write_text(html, page)


def _codes_for(store, ids: np.ndarray, modality: str) -> np.ndarray:
    """±1 codes of the given ids from the code store (every sampled id was stored)."""
    order = np.argsort(store.ids)
    pos = order[np.searchsorted(store.ids, ids, sorter=order)]
    return unpack_codes(store.codes[modality][pos], store.bits)
