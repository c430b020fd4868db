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
from lifelong_hashing.engine.methods.base import DatabaseEncoder, Method, encode_here
from lifelong_hashing.engine.methods.memory import ExemplarMemory, balanced_sample, database_share_weights


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

    def fit(self, image: np.ndarray, text: np.ndarray, labels: np.ndarray, t: int, *, lifelong: bool,
            extra_loss=None, sample_weights: np.ndarray | None = None) -> float:
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
                               freeze_batchnorm=lifelong, sample_weights=sample_weights,
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
        self.seen.append(batch)
        torch.manual_seed(self.params.seed)
        self.image_net, self.text_net = self._new_encoders()
        everything = Batch.concat(self.seen).with_categories(self.categories)
        return self.fit(everything.image, everything.text, everything.labels, t, lifelong=False)

    def rewrite_codes(self, store: CodeStore, encoder: DatabaseEncoder) -> None:
        """Re-encode every item stored before this stage with the new encoders, found by id: the
        cost lifelong methods avoid. One batch of them all, so that shards of it encode as in one
        process."""
        if len(self.seen) > 1:
            past = Batch.concat(self.seen[:-1]).with_categories(self.categories)
            store.overwrite(past.ids, encoder(self, past))

    def append(self, batch: Batch, store: CodeStore, encoder: DatabaseEncoder = encode_here) -> None:
        super().append(batch, store, encoder)
        self.seen.append(batch.with_categories(self.categories))

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
    distillation.

    The papers give no lifelong recipe for OrthoHash beyond the extendable codebook. Our choice:
    a class-balanced random memory of a few items per category is trained together with the new
    batch (old rows of the codebook are their fixed targets), and on every trained item the
    encoders' cosine logits over the *old* classes are distilled from a frozen copy of the
    previous encoders (Learning without Forgetting). Both keep old queries near their class codes,
    which is where their frozen database codes are.

    The memory stands in for the old database, and is drawn as often as the old database would
    be in joint retraining (``memory.database_share_weights``). Drawing it class-balanced instead
    starves it on multi-label data, where the new batch carries the old labels too: each old
    label then looks well represented, but only beside new labels, and the text encoder forgot
    queries with old labels alone (mirflickr25k task 0, T→I: 0.94 after its stage, 0.46 after
    three more). The memory's size (``method.memory_per_category``) is what mainly holds that;
    distillation helps on single-label Wikipedia and is neutral to slightly harmful on
    mirflickr25k; a quarter of the base stage's epochs in lifelong stages (params.yaml) costs
    nothing measurable in mAP (the sweep behind these choices is in docs/methods.md; the
    mean ± sd over seeds in bench/quality.py).

    Database codes (``method.orthohash.database_codes``): ``labels`` stores for each new item the
    code its labels vote for, the sign of the sum of its class codes (OrthoHash's target), and
    where a bit's vote is tied (as many −1 as +1), the sign of its encoders' outputs. Database
    items come with labels, so this is asymmetric hashing as in ADSH and DLCH: the stored code is
    the one training aims at rather than the encoders' approximation of it. And since old rows of
    the codebook never change, a stored code stays exactly where the next stages' queries are
    trained to land: only the query encoders can forget, never the database. ``encoders``
    stores sign(encoder outputs) per modality, as joint and finetune do. Measured (final average
    mAP I→T / T→I, 64 bits, seed 0; joint in brackets): Wikipedia 0.347 / 0.832 with labels,
    0.274 / 0.764 with encoders (0.359 / 0.867); mirflickr25k, 12+4+4+4, 10 epochs: 0.912 /
    0.713 against 0.805 / 0.683 (0.873 / 0.791).
    """

    name = "orthohash"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory = ExemplarMemory.empty(self.image_shape, self.text_dim, self.bits)

    def arrays(self):
        return {**super().arrays(), **self.memory.arrays()}

    def load_arrays(self, arrays):
        super().load_arrays(arrays)
        self.memory.load_arrays(arrays)

    def on_new_categories(self, old_count: int, new_count: int) -> None:
        super().on_new_categories(old_count, new_count)
        self.memory.grow_labels(new_count)

    def database_codes(self, batch: Batch) -> dict[str, np.ndarray]:
        if self.params.method.orthohash.database_codes == "encoders":
            return super().database_codes(batch)
        votes = batch.labels.astype(np.float32) @ self.codebook.astype(np.float32)
        outputs = self.continuous("image", batch.image) + self.continuous("text", batch.text)
        codes = pack_codes(np.where(votes == 0, outputs, votes))
        return {"image": codes, "text": codes.copy()}

    def train_stage(self, batch: Batch, t: int, store: CodeStore) -> float:
        if t == 0:
            loss = self.fit(batch.image, batch.text, batch.labels, t, lifelong=False)
        else:
            loss = self._lifelong_fit(batch, t, len(store.categories), len(store))
        rows = balanced_sample(batch, self.params.method.memory_per_category, [self.params.seed, t])
        self.memory.add(batch, rows, self.codebook[batch.labels[rows].argmax(axis=1)])
        return loss

    def _lifelong_fit(self, batch: Batch, t: int, old_classes: int, old_items: int) -> float:
        cfg = self.params.method.orthohash
        old_codebook = self.tensor(self.codebook[:old_classes])
        m = self.memory
        image, text = np.concatenate([batch.image, m.image]), np.concatenate([batch.text, m.text])
        labels = np.concatenate([batch.labels.astype(np.float32), m.labels])
        # The teachers are the encoders as they are now, frozen: their logits are computed once.
        teacher = {name: orthohash_logits(self.tensor(self.continuous(name, x)), old_codebook, None, cfg.scale, 0.0)
                   for name, x in (("image", image), ("text", text))}

        def keep_old_logits(idx, x_img, x_txt, v_img, v_txt):
            loss = sum(distillation(orthohash_logits(v, old_codebook, None, cfg.scale, 0.0), teacher[name][idx],
                                    cfg.temperature) for name, v in (("image", v_img), ("text", v_txt)))
            return cfg.distill * loss

        return self.fit(image, text, labels, t, lifelong=True, extra_loss=keep_old_logits,
                        sample_weights=database_share_weights(len(batch), len(m), old_items))
