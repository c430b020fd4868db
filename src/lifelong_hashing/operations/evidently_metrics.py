"""The project's own Evidently metrics: drift over many raw dimensions, code-space health and
lifelong retrieval quality. Each ``Metric`` holds its parameters (what the snapshot records);
its ``Calculation`` computes from the report's datasets with the numpy helpers of
``monitoring`` and draws a plotly figure. Imported only when a report is built (Evidently is
slow to import). No ``from __future__ import annotations`` here: Evidently's pydantic models
need real types. Everything comes from Evidently's public API (``evidently.core.metric_types``
for metrics, ``evidently.widgets`` for what they draw); nothing from ``evidently.legacy``.
"""

import os

os.environ.setdefault("DO_NOT_TRACK", "1")  # Evidently's telemetry: no network at run time


import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from evidently.core.metric_types import SingleValueCalculation, SingleValueMetric  # noqa: E402
from evidently.widgets import CounterData, GraphData, counter, plotly_graph  # noqa: E402
from pydantic.v1 import PrivateAttr  # noqa: E402  (Evidently's models are pydantic v1 models)

from lifelong_hashing.engine.metrics import DIRECTIONS, average_map, forgetting  # noqa: E402
from lifelong_hashing.operations.code_health import (  # noqa: E402
    KS_P_VALUE,
    bit_entropy,
    collision_share,
    hamming_groups,
    ks_drift_share,
)


def columns(dataset, prefix: str) -> np.ndarray:
    frame = dataset.as_dataframe()
    return frame[[c for c in frame.columns if c.startswith(prefix)]].to_numpy(dtype=float)


def codes(dataset, modality: str) -> np.ndarray:
    return (columns(dataset, f"{modality}_bit") * 2 - 1).astype(np.int8)


def old_and_new_codes(current_data, reference_data, modality: str) -> np.ndarray:
    """The ±1 codes of the new items and, where there is a reference, of the old ones."""
    parts = [codes(current_data, modality)]
    if reference_data is not None:
        parts.append(codes(reference_data, modality))
    return np.concatenate(parts)


def widgets(title: str, figure, text: str):
    """A counter and a figure, from ``evidently.widgets`` (the public home of these widgets)."""
    return [counter(counters=[CounterData(text, title)]), plotly_graph(graph_data=GraphData.figure("", figure))]


class FeatureDriftShare(SingleValueMetric):
    """Share of a modality's raw feature dimensions that drifted (K-S, p < 0.05)."""
    modality: str


class FeatureDriftShareCalculation(SingleValueCalculation[FeatureDriftShare]):
    def calculate(self, context, current_data, reference_data):
        prefix = f"{self.metric.modality}_f"
        share, p = ks_drift_share(columns(reference_data, prefix), columns(current_data, prefix))
        result = self.result(share)
        fig = go.Figure(go.Histogram(x=p, nbinsx=40, name="p-value"))
        fig.add_vline(x=KS_P_VALUE, line_dash="dash")
        fig.update_layout(xaxis_title="K-S p-value per dimension", yaxis_title="dimensions")
        result.widget = widgets(self.display_name(), fig, f"{share:.1%} of {len(p)} dimensions drifted")
        return result

    def display_name(self) -> str:
        return f"Feature drift share ({self.metric.modality})"


class BitBalance(SingleValueMetric):
    """Largest |mean| of any bit over old and new ±1 codes (0: every bit balanced)."""
    modality: str


class BitBalanceCalculation(SingleValueCalculation[BitBalance]):
    def calculate(self, context, current_data, reference_data):
        bits = old_and_new_codes(current_data, reference_data, self.metric.modality)
        means, entropy = bits.mean(axis=0), bit_entropy(bits)
        result = self.result(float(np.abs(means).max()))
        fig = go.Figure([go.Bar(y=means, name="bit mean (±1)"), go.Bar(y=entropy, name="entropy (bits)")])
        fig.update_layout(xaxis_title="bit", barmode="group")
        result.widget = widgets(self.display_name(), fig,
                                f"max |mean| {np.abs(means).max():.3f}, mean entropy {entropy.mean():.3f} bits, "
                                f"min entropy {entropy.min():.3f}")
        return result

    def display_name(self) -> str:
        return f"Bit balance ({self.metric.modality} codes)"


class BitEntropy(SingleValueMetric):
    """Mean per-bit entropy of old and new codes (1 bit: every bit carries information)."""
    modality: str


class BitEntropyCalculation(SingleValueCalculation[BitEntropy]):
    def calculate(self, context, current_data, reference_data):
        return self.result(float(bit_entropy(old_and_new_codes(current_data, reference_data,
                                                               self.metric.modality)).mean()))

    def display_name(self) -> str:
        return f"Mean bit entropy ({self.metric.modality} codes)"


class CodeCollisions(SingleValueMetric):
    """Share of new items whose code equals another item's (old or new)."""
    modality: str


class CodeCollisionsCalculation(SingleValueCalculation[CodeCollisions]):
    def calculate(self, context, current_data, reference_data):
        new = codes(current_data, self.metric.modality)
        old = codes(reference_data, self.metric.modality) if reference_data is not None else new[:0]
        share = collision_share(np.concatenate([new, old]))
        groups = hamming_groups(old, new)
        result = self.result(share)
        fig = go.Figure([go.Histogram(x=d, name=name, histnorm="probability", opacity=0.6)
                         for name, d in groups.items() if len(d)])
        fig.update_layout(barmode="overlay", xaxis_title="Hamming distance", yaxis_title="share of pairs")
        means = ", ".join(f"{name} {d.mean():.1f}" for name, d in groups.items() if len(d))
        result.widget = widgets(self.display_name(), fig, f"{share:.1%} colliding; mean distance: {means}")
        return result

    def display_name(self) -> str:
        return f"Colliding codes ({self.metric.modality})"


class StageTaskMetric(SingleValueMetric):
    """A metric of the stage×task mAP matrix of one direction. The matrix is data, not a
    parameter (a private attribute), so that every increment's value lands in one series."""

    direction: str
    _matrix: np.ndarray = PrivateAttr()

    def with_matrix(self, matrix: np.ndarray):
        self._matrix = matrix
        return self

    @property
    def matrix(self) -> np.ndarray:
        return self._matrix


class Forgetting(StageTaskMetric):
    """Largest forgetting of any earlier task after this stage (mAP points)."""


class ForgettingCalculation(SingleValueCalculation[Forgetting]):
    def calculate(self, context, current_data, reference_data):
        m = self.metric.matrix
        forget = forgetting(m)
        result = self.result(float(forget.max()) if len(forget) else 0.0)
        fig = go.Figure([go.Scatter(x=list(range(j, len(m))), y=m[j:, j], mode="lines+markers",
                                    name=f"task {j}") for j in range(m.shape[1])])
        fig.update_layout(xaxis_title="after stage", yaxis_title="mAP", xaxis_dtick=1)
        per_task = ", ".join(f"task {j}: {f:.3f}" for j, f in enumerate(forget)) or "no earlier task"
        result.widget = widgets(self.display_name(), fig, f"forgetting per task: {per_task}")
        return result

    def display_name(self) -> str:
        return f"Forgetting ({DIRECTIONS[self.metric.direction].name})"


class AverageMapDrop(StageTaskMetric):
    """How much the average mAP over tasks seen so far fell in this stage (negative: rose)."""


class AverageMapDropCalculation(SingleValueCalculation[AverageMapDrop]):
    def calculate(self, context, current_data, reference_data):
        avg = average_map(self.metric.matrix)
        drop = float(avg[-2] - avg[-1]) if len(avg) > 1 else 0.0
        result = self.result(drop)
        fig = go.Figure(go.Scatter(x=list(range(len(avg))), y=avg, mode="lines+markers", name="average mAP"))
        fig.update_layout(xaxis_title="after stage", yaxis_title="average mAP over tasks so far", xaxis_dtick=1)
        result.widget = widgets(self.display_name(), fig,
                                f"average mAP {avg[-1]:.4f} (per stage: {', '.join(f'{a:.3f}' for a in avg)})")
        return result

    def display_name(self) -> str:
        return f"Average mAP drop ({DIRECTIONS[self.metric.direction].name})"


class NoveltyShare(SingleValueMetric):
    """Share of the unlabelled items that arrived in each stage which were flagged as looking
    like no known category (discovery), the latest stage's as the value. The series is data
    (a private attribute), like the stage×task matrix."""

    _shares: dict = PrivateAttr()

    def with_shares(self, shares: dict[int, float]):
        self._shares = shares
        return self

    @property
    def shares(self) -> dict[int, float]:
        return self._shares


class NoveltyShareCalculation(SingleValueCalculation[NoveltyShare]):
    def calculate(self, context, current_data, reference_data):
        shares = self.metric.shares
        result = self.result(float(shares[max(shares)]))
        fig = go.Figure(go.Scatter(x=list(shares), y=list(shares.values()), mode="lines+markers", name="flagged"))
        fig.update_layout(xaxis_title="stage", yaxis_title="share of unlabelled items flagged new", xaxis_dtick=1)
        text = ", ".join(f"stage {t}: {v:.1%}" for t, v in shares.items())
        result.widget = widgets(self.display_name(), fig, f"flagged as new, per stage: {text}")
        return result

    def display_name(self) -> str:
        return "Unlabelled items flagged as new categories"
