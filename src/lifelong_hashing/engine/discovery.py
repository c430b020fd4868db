"""Discovering new categories in what arrives unlabelled: a novelty score for every unlabelled
item, a threshold calibrated on held-out items of known categories, and proposals (flagged items
grouped into candidate categories) for a person to name.

**Novelty score** (``NoveltyModel``): per modality, the Mahalanobis distance of an item's input
features to the nearest known category, under class-conditional Gaussians with one shared
(tied) covariance fitted on the reference profile's samples of every stage trained (their labels
from the code store); each modality's distance is put on the scale of held-out known items
(median and interquartile range of the evaluation queries', which no training saw), and the item
scores the larger of the two. The input space and not the encoders': the encoders were trained to
send every item to some known class code, so an item of a new category lands near one as well
(a closed-set classifier's confidence); the features still show that it is unlike every known
category. The larger of the two modalities, because one side may carry no category signal at all
(Wikipedia's SIFT images), and it must not drown the other. The choice among this,
``prototype_scores`` (the encoders' outputs against the class prototypes, the mean stored code
of each category), the issue's simple baseline ``nearest_item_scores`` (the Hamming distance
to the nearest stored item) and that baseline given this score's data and scaling
(``nearest_sample_scores``) was made on a tuning seed (``bench/discovery.py --tuning``).

**Threshold**: the ``quantile`` of the held-out known items' scores, so that about 1 − quantile
of known items are flagged by mistake, whatever the scale on this model.

**Proposals** (``propose``): the flagged items clustered with k-means (k by the best silhouette,
seeded) on their whitened features, each group with its members, its nearest known categories
and, where the text side has words, the tags most of its members carry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lifelong_hashing.engine.batch import Batch
from lifelong_hashing.engine.codestore import MODALITIES, CodeStore, unpack_codes
from lifelong_hashing.engine.methods import Method
from lifelong_hashing.engine.reference import ReferenceProfile

SCORES = ("mahalanobis", "prototype", "nearest_item", "nearest_sample")
MAX_PROPOSALS = 8
MIN_PROPOSAL_SIZE = 3
SHRINKAGE = 1e-3  # of the covariance's mean variance, added to its diagonal: a full-rank inverse


@dataclass
class NoveltyModel:
    """Class-conditional Gaussians with a tied covariance per modality, on input features, and
    each modality's scale on held-out known items (``fit``)."""

    classes: list[int]  # the store's category columns with labelled samples
    means: dict[str, np.ndarray]  # modality → (len(classes), d)
    precisions: dict[str, np.ndarray]  # modality → (d, d)
    scales: dict[str, tuple[float, float]]  # modality → (median, interquartile range) of held-out known items
    threshold: float = float("inf")

    @classmethod
    def fit(cls, store: CodeStore, reference: ReferenceProfile, calibration: Batch, quantile: float) -> NoveltyModel:
        """On the reference samples of the labelled items (labels from ``store``), scaled and
        thresholded on ``calibration``: held-out items of known categories."""
        rows = store.rows_of(reference.ids)
        labelled = store.labelled[rows]
        labels = store.labels[rows][labelled] > 0
        means, precisions = {}, {}
        classes = [c for c in range(labels.shape[1]) if labels[:, c].any()]
        for modality in MODALITIES:
            x = reference.samples[modality][labelled].astype(np.float64)
            means[modality] = np.stack([x[labels[:, c]].mean(axis=0) for c in classes])
            centred = np.concatenate([x[labels[:, c]] - means[modality][i] for i, c in enumerate(classes)])
            cov = np.cov(centred.T)
            cov += SHRINKAGE * np.trace(cov) / len(cov) * np.eye(len(cov))
            precisions[modality] = np.linalg.inv(cov)
        model = cls(classes, means, precisions, {m: (0.0, 1.0) for m in MODALITIES})
        model.scales = scales_of(model.distances(calibration))
        model.threshold = calibrate(model.scores(calibration), quantile)
        return model

    def _squared(self, batch: Batch) -> dict[str, np.ndarray]:
        """Per modality, (n, classes) squared Mahalanobis distances."""
        out = {}
        for modality in MODALITIES:
            x = getattr(batch, modality).reshape(len(batch), -1).astype(np.float64)
            p, mu = self.precisions[modality], self.means[modality]
            xp = x @ p
            out[modality] = (xp * x).sum(axis=1)[:, None] - 2 * xp @ mu.T + ((mu @ p) * mu).sum(axis=1)
        return out

    def distances(self, batch: Batch) -> dict[str, np.ndarray]:
        """Per modality, each item's squared Mahalanobis distance to the nearest known category."""
        return {m: d.min(axis=1) for m, d in self._squared(batch).items()}

    def class_distances(self, batch: Batch) -> np.ndarray:
        """(n, classes): per known category, the larger of the modalities' scaled distances."""
        return larger_scaled(self._squared(batch), self.scales)

    def scores(self, batch: Batch) -> np.ndarray:
        """(n,) the larger of the modalities' distances to the nearest known category, each on
        the held-out known items' scale."""
        return larger_scaled(self.distances(batch), self.scales)

    def whitened(self, batch: Batch) -> np.ndarray:
        """Both modalities' features whitened by their precision, concatenated: the space the
        score measures in, where proposals are grouped."""
        parts = []
        for modality in MODALITIES:
            x = getattr(batch, modality).reshape(len(batch), -1).astype(np.float64)
            root = np.linalg.cholesky(self.precisions[modality])
            parts.append(_unit(x @ root))
        return np.concatenate(parts, axis=1)


def scales_of(raw: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Per modality, the median and interquartile range of held-out known items' raw scores."""
    return {m: (float(np.median(d)), float(np.subtract(*np.quantile(d, [0.75, 0.25]))) or 1.0) for m, d in raw.items()}


def larger_scaled(raw: dict[str, np.ndarray], scales: dict[str, tuple[float, float]]) -> np.ndarray:
    """The larger of the modalities' raw scores, each put on its held-out known items' scale."""
    return np.max([(raw[m] - scales[m][0]) / scales[m][1] for m in MODALITIES], axis=0)


def nearest_sample_scores(reference: ReferenceProfile, calibration: Batch, batch: Batch) -> np.ndarray:
    """The nearest-stored-item baseline given the score's own advantages: the same reference
    samples, input features, per-modality scaling and larger modality, but one minus the cosine
    to the nearest sample instead of a class-conditional distance."""
    def raw(b: Batch) -> dict[str, np.ndarray]:
        return {m: 1.0 - (_unit(getattr(b, m).reshape(len(b), -1).astype(np.float64))
                          @ _unit(reference.samples[m].astype(np.float64)).T).max(axis=1) for m in MODALITIES}

    return larger_scaled(raw(batch), scales_of(raw(calibration)))


def class_prototypes(store: CodeStore) -> np.ndarray:
    """(C, bits) float: per known category, the mean ±1 code (both modalities) of the stored
    labelled items that carry it; a category with none is NaN."""
    labelled = store.labelled.astype(bool)
    codes = (unpack_codes(store.codes["image"][labelled], store.bits).astype(np.float32)
             + unpack_codes(store.codes["text"][labelled], store.bits)) / 2
    labels = store.labels[labelled].astype(np.float32)
    counts = labels.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (labels.T @ codes) / counts[:, None]


def _outputs(method: Method, batch: Batch) -> np.ndarray:
    """Both encoders' real-valued outputs, each row of each scaled to unit length, summed."""
    out = np.zeros((len(batch), method.bits), np.float32)
    for modality in MODALITIES:
        out += _unit(method.continuous(modality, getattr(batch, modality)))
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def prototype_scores(method: Method, store: CodeStore, batch: Batch) -> np.ndarray:
    """One minus the best cosine between the encoders' outputs and a class prototype."""
    prototypes = class_prototypes(store)
    known = np.isfinite(prototypes).all(axis=1)
    return 1.0 - (_unit(_outputs(method, batch)) @ _unit(prototypes[known]).T).max(axis=1)


def nearest_item_scores(method: Method, store: CodeStore, batch: Batch) -> np.ndarray:
    """The Hamming distance of an item's codes to the nearest stored item's, over both modalities."""
    codes = method.encoder_codes(batch)
    nearest = [store.search(codes[m], m, 1)[1][:, 0] for m in MODALITIES]
    return (nearest[0] + nearest[1]) / (2 * store.bits)


def calibrate(scores_of_known: np.ndarray, quantile: float) -> float:
    """The flagging threshold: this quantile of held-out known-category items' scores."""
    return float(np.quantile(scores_of_known, quantile))


def known_queries(queries: Batch, categories: tuple[str, ...]) -> Batch:
    """The held-out items whose labels are all categories the model knows (and not none)."""
    is_known = np.array([c in categories for c in queries.categories], bool)
    keep = queries.labels[:, is_known].any(axis=1) & ~queries.labels[:, ~is_known].any(axis=1)
    return queries.subset(np.flatnonzero(keep))


@dataclass
class Proposal:
    """A candidate new category: its members (ids), the known categories nearest it (name and
    the members' mean score against it, on the held-out known items' scale) and the tags most
    of its members carry (where text has words)."""

    number: int
    members: list[str]
    nearest_known: list[tuple[str, float]]
    top_tags: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"number": self.number, "size": len(self.members), "members": self.members,
                "nearest_known": [[n, round(c, 3)] for n, c in self.nearest_known], "top_tags": self.top_tags}


def propose(model: NoveltyModel, store: CodeStore, flagged: Batch, seed: int, words: list[str] | None = None
            ) -> tuple[list[Proposal], np.ndarray]:
    """Group the flagged items into proposals; returns them and each item's group (-1: none,
    when there are too few flagged items to group)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    if len(flagged) < 2 * MIN_PROPOSAL_SIZE:
        return [], np.full(len(flagged), -1)
    x = model.whitened(flagged)
    best = None
    for k in range(2, min(MAX_PROPOSALS, len(flagged) // MIN_PROPOSAL_SIZE) + 1):
        groups = KMeans(k, n_init=10, random_state=seed).fit_predict(x)
        quality = silhouette_score(x, groups, random_state=seed)
        if best is None or quality > best[0]:
            best = (quality, groups)
    groups = best[1]  # k-means numbers its groups 0..k-1: a proposal's number is its group's
    proposals = []
    for number in range(groups.max() + 1):
        rows = np.flatnonzero(groups == number)
        distance = model.class_distances(flagged.subset(rows)).mean(axis=0)
        order = np.argsort(distance)[:3]
        nearest = [(store.categories[model.classes[j]], float(distance[j])) for j in order]
        proposals.append(Proposal(number, flagged.ids[rows].tolist(), nearest, _top_tags(flagged.text[rows], words)))
    return proposals, groups


def _top_tags(text: np.ndarray, words: list[str] | None, top: int = 5) -> list[str]:
    """The words most of the members carry (where the text features are word weights)."""
    if not words:
        return []
    share = (text > 0).mean(axis=0)
    return [words[j] for j in np.argsort(-share)[:top] if share[j] > 0]
