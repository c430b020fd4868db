"""Methods built on the OrthoHash objective: the joint and finetune baselines and lifelong
OrthoHash.

All three share one extendable codebook: a new stage appends rows for its categories, far in
Hamming distance from every existing row, and never touches old rows. Image and text encoders
learn the same codebook independently, so both land in one Hamming space with no pairwise term.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lifelong_hashing.engine.batch import Batch, load_batch, save_batch
from lifelong_hashing.engine.codestore import CodeStore, pack_codes
from lifelong_hashing.engine.losses import distillation, extend_codebook, orthohash_logits, orthohash_loss
from lifelong_hashing.engine.methods.base import DatabaseEncoder, Method
from lifelong_hashing.engine.methods.memory import (
    ExemplarMemory,
    balanced_sample,
    database_share_weights,
    replay_draws,
)


class CodebookMethod(Method):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.codebook = np.zeros((0, self.bits), np.int8)

    def arrays(self):
        return {"codebook": self.codebook}

    def load_arrays(self, arrays):
        self.codebook = arrays["codebook"]

    def on_new_categories(self, old_count: int, new_count: int) -> None:
        cfg = self.params.method.orthohash
        self.codebook = extend_codebook(self.codebook[:old_count], new_count - old_count, self.bits,
                                        cfg.min_distance, self.params.seed)

    def label_codes(self, batch: Batch) -> np.ndarray:
        """The code an item's labels vote for, the sign of the sum of its class codes (OrthoHash's
        target); where a bit's vote is tied (as many −1 as +1), the sign of its encoders' outputs.
        Old codebook rows never change, so such a code stays where later queries are trained to
        land: asymmetric hashing as in ADSH and DLCH."""
        votes = batch.labels.astype(np.float32) @ self.codebook.astype(np.float32)
        outputs = self.continuous("image", batch.image) + self.continuous("text", batch.text)
        return pack_codes(np.where(votes == 0, outputs, votes))

    def fit(self, image: np.ndarray, text: np.ndarray, labels: np.ndarray, t: int, *, lifelong: bool,
            extra_loss=None, sample_weights: np.ndarray | None = None, draws: int | None = None) -> float:
        """Train both encoders with the OrthoHash loss (plus ``extra_loss(idx, x_img, x_txt, v_img,
        v_txt)``); a first fit also fixes the encoders' input normalization."""
        cfg = self.params.method.orthohash
        x_img, x_txt, y = self.tensor(image), self.tensor(text), self.tensor(labels)
        codebook = self.tensor(self.codebook)
        if not lifelong:
            self.image_net.set_normalization(x_img)
            self.text_net.set_normalization(x_txt)

        def step(idx):
            v_img, v_txt = self.image_net(x_img[idx]), self.text_net(x_txt[idx])
            loss = (orthohash_loss(v_img, codebook, y[idx], cfg.scale, cfg.margin)
                    + orthohash_loss(v_txt, codebook, y[idx], cfg.scale, cfg.margin))
            if extra_loss is not None:
                loss = loss + extra_loss(idx, x_img, x_txt, v_img, v_txt)
            loss.backward()
            return loss.detach()

        train = self.params.train
        epochs, lr = (train.lifelong_epochs, train.lifelong_lr) if lifelong else (train.epochs, train.lr)
        return self.run_epochs([self.image_net, self.text_net], len(y), epochs, lr, step,
                               freeze_batchnorm=lifelong, sample_weights=sample_weights, draws=draws,
                               desc=f"{self.name} stage {t}")


class Joint(CodebookMethod):
    """Retrain from scratch on every item so far, then re-encode the whole database: the quality
    ceiling and the time reference. It must keep all past data, which lifelong methods never do:
    every stage's batch and every appended batch, so appended items are trained on and
    re-encoded like the rest."""

    name = "joint"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[Batch] = []

    def train_stage(self, batch: Batch, t: int, store: CodeStore) -> float:
        torch.manual_seed(self.params.seed)
        self.image_net, self.text_net = self._new_encoders()
        everything = Batch.concat([*self.seen, batch]).with_categories(self.categories).labelled_part()
        return self.fit(everything.image, everything.text, everything.labels, t, lifelong=False)

    def keep_batch(self, batch: Batch) -> None:
        self.seen.append(batch)  # unlabelled items too: they are re-encoded with the rest

    def forget(self, ids: np.ndarray) -> int:
        kept, gone = [], 0
        for batch in self.seen:
            drop = np.isin(batch.ids, ids)
            gone += int(drop.sum())
            if not drop.all():
                kept.append(batch.subset(~drop) if drop.any() else batch)
        self.seen = kept
        return gone

    def rewrite_codes(self, store: CodeStore, encoder: DatabaseEncoder) -> None:
        """Re-encode every item stored before this stage with the new encoders, found by id: the
        cost lifelong methods avoid. One batch of them all, so that shards of it encode as in one
        process."""
        if len(self.seen) > 1:
            past = Batch.concat(self.seen[:-1]).with_categories(self.categories)
            store.overwrite(past.ids, encoder(self, past))

    def save(self, directory: Path) -> None:
        super().save(directory)
        for i, b in enumerate(self.seen):
            save_batch(b, directory / "seen" / f"batch_{i:04d}.npz")

    def save_encoders(self, directory: Path) -> None:
        """Without the kept batches: only retraining reads them."""
        super().save(directory)

    def restore(self, directory: Path) -> None:
        super().restore(directory)
        self.seen = [load_batch(p) for p in sorted((directory / "seen").glob("batch_*.npz"))]


class Finetune(CodebookMethod):
    """Keep training the previous encoders on the new batch alone: the forgetting floor."""

    name = "finetune"

    def train_stage(self, batch: Batch, t: int, store: CodeStore) -> float:
        return self.fit(batch.image, batch.text, batch.labels, t, lifelong=t > 0)


class LifelongOrthoHash(CodebookMethod):
    """OrthoHash as a lifelong method: the extendable codebook, a small replay memory, and
    (optionally) distillation.

    The papers give no lifelong recipe for OrthoHash beyond the extendable codebook. Our choice:
    a class-balanced random memory of a few items per category is trained together with the new
    batch, with the old rows of the codebook as their fixed targets. Since old rows never change,
    the targets of old items never move: an old database code, whether voted from labels or
    computed by an earlier encoder, stays where later queries of its classes are trained to land,
    and only the query encoders can forget.

    The memory stands in for the old labelled database, and is drawn as often as that database
    would be in joint retraining (``memory.database_share_weights``). Drawing it class-balanced
    instead starves it on multi-label data, where the new batch carries the old labels too: each
    old label then looks well represented, but only beside new labels, and queries with old
    labels alone drift. ``method.orthohash.distill`` adds Learning without Forgetting on the
    encoders' cosine logits over the old classes, from a frozen copy of the previous encoders.

    Tried on the validation split (bench/tune.py, docs/methods.md; results in
    bench/results/tuning.json): distillation, lifelong learning rates, memory sizes; and, by hand
    on one tuning seed, feature distillation of the body's outputs, code distillation on the
    memory, training only the head in lifelong stages, unfrozen batch-norm statistics and
    replaying the whole old database. With encoder codes the memory's size and the lifelong
    stages' budget decide the quality; distillation and the feature and code regularizers did not
    help, training only the head and unfreezing batch-norm hurt.
    """

    name = "orthohash"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory = ExemplarMemory.empty(self.image_shape, self.text_dim, 0)  # targets are codebook rows

    def arrays(self):
        return {**super().arrays(), **self.memory.arrays()}

    def load_arrays(self, arrays):
        super().load_arrays(arrays)
        self.memory.load_arrays(arrays)

    def on_new_categories(self, old_count: int, new_count: int) -> None:
        super().on_new_categories(old_count, new_count)
        self.memory.grow_labels(new_count)

    def train_stage(self, batch: Batch, t: int, store: CodeStore) -> float:
        if t == 0:
            loss = self.fit(batch.image, batch.text, batch.labels, t, lifelong=False)
        else:
            loss = self._lifelong_fit(batch, t, len(store.categories), int(store.labelled.sum()))
        self.memory.add(batch, balanced_sample(batch, self.params.method.memory_per_category, [self.params.seed, t]))
        return loss

    def _lifelong_fit(self, batch: Batch, t: int, old_classes: int, old_items: int) -> float:
        m = self.memory
        image, text = np.concatenate([batch.image, m.image]), np.concatenate([batch.text, m.text])
        labels = np.concatenate([batch.labels.astype(np.float32), m.labels])
        distill = self.params.method.orthohash.distill
        keep_old = self._old_logit_distillation(image, text, old_classes) if distill else None
        return self.fit(image, text, labels, t, lifelong=True, extra_loss=keep_old,
                        sample_weights=database_share_weights(len(batch), len(m), old_items),
                        draws=replay_draws(len(batch), len(m), old_classes, self.params.method.replay_per_category))

    def _old_logit_distillation(self, image: np.ndarray, text: np.ndarray, old_classes: int):
        """The extra loss that keeps the encoders' logits over the old classes where the frozen
        encoders put them (their logits are computed once, before the stage trains)."""
        cfg = self.params.method.orthohash
        old_codebook = self.tensor(self.codebook[:old_classes])
        teacher = {name: orthohash_logits(self.tensor(self.continuous(name, x)), old_codebook, None, cfg.scale, 0.0)
                   for name, x in (("image", image), ("text", text))}

        def keep_old_logits(idx, x_img, x_txt, v_img, v_txt):
            loss = sum(distillation(orthohash_logits(v, old_codebook, None, cfg.scale, 0.0), teacher[name][idx],
                                    cfg.temperature) for name, v in (("image", v_img), ("text", v_txt)))
            return cfg.distill * loss

        return keep_old_logits
