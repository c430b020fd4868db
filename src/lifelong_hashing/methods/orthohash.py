"""Methods built on the OrthoHash objective: the joint and finetune baselines and lifelong
OrthoHash.

All three share one extendable codebook: a new stage appends rows for its categories, far in
Hamming distance from every existing row, and never touches old rows. Image and text encoders
learn the same codebook independently, so both land in one Hamming space with no pairwise term.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from ..batch import Batch, load_batch, save_batch
from ..codestore import CodeStore
from ..losses import distillation, extend_codebook, orthohash_logits, orthohash_loss
from ..stages import Stage
from .base import Method


class CodebookMethod(Method):
    state_arrays = ("codebook",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.codebook = np.zeros((0, self.bits), np.int8)

    def on_new_categories(self, old_count: int, new_count: int) -> None:
        cfg = self.params.method.orthohash
        self.codebook = extend_codebook(self.codebook[:old_count], new_count - old_count, self.bits,
                                        cfg.min_distance, self.params.seed)

    def code_loss(self, v: torch.Tensor, labels: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        cfg = self.params.method.orthohash
        return orthohash_loss(v, codebook, labels, cfg.scale, cfg.margin)

    def fit(self, batch: Batch, t: int, *, lifelong: bool, extra_loss=None) -> float:
        """Train both encoders on the batch with the OrthoHash loss (plus ``extra_loss``)."""
        x_img, x_txt, labels = self.tensor(batch.image), self.tensor(batch.text), self.tensor(batch.labels)
        codebook = self.tensor(self.codebook)
        if not lifelong:
            self.image_net.set_normalization(x_img)
            self.text_net.set_normalization(x_txt)

        def step(idx):
            v_img, v_txt = self.image_net(x_img[idx]), self.text_net(x_txt[idx])
            loss = self.code_loss(v_img, labels[idx], codebook) + self.code_loss(v_txt, labels[idx], codebook)
            if extra_loss is not None:
                loss = loss + extra_loss(idx, x_img, x_txt, v_img, v_txt)
            loss.backward()
            return loss.detach()

        train = self.params.train
        epochs, lr = (train.lifelong_epochs, train.lifelong_lr) if lifelong else (train.epochs, train.lr)
        return self.run_epochs([self.image_net, self.text_net], len(batch), epochs, lr, step,
                               freeze_batchnorm=lifelong, desc=f"{self.name} stage {t}")


class Joint(CodebookMethod):
    """Retrain from scratch on every item so far, then re-encode the whole database: the quality
    ceiling and the time reference. It must keep all past data, which lifelong methods never do."""

    name = "joint"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[Batch] = []

    def train_stage(self, batch: Batch, t: int, store: CodeStore) -> float:
        self.seen.append(batch)
        torch.manual_seed(self.params.seed)
        self.image_net, self.text_net = self._new_encoders()
        everything = Batch.concat(self.seen).with_categories(self.categories)
        return self.fit(everything, t, lifelong=False)

    def write_codes(self, stage: Stage, store: CodeStore) -> None:
        """Re-encode every stored item with the new encoders (rows keep their order)."""
        offset = 0
        for old in self.seen[:-1]:
            codes = self.database_codes(old)
            for m, packed in codes.items():
                store.codes[m][offset: offset + len(old)] = packed
            offset += len(old)
        super().write_codes(stage, store)

    def save(self, directory: Path) -> None:
        super().save(directory)
        for i, b in enumerate(self.seen):
            save_batch(b, directory / "seen" / f"stage_{i:03d}.npz")

    def restore(self, directory: Path) -> None:
        super().restore(directory)
        self.seen = [load_batch(p) for p in sorted((directory / "seen").glob("stage_*.npz"))]


class Finetune(CodebookMethod):
    """Keep training the previous encoders on the new batch alone: the forgetting floor."""

    name = "finetune"

    def train_stage(self, batch: Batch, t: int, store: CodeStore) -> float:
        return self.fit(batch, t, lifelong=t > 0)


class LifelongOrthoHash(CodebookMethod):
    """OrthoHash as a lifelong method: the extendable codebook plus distillation.

    The papers give no lifelong recipe for OrthoHash beyond the extendable codebook. Our choice,
    memory-free: on the new batch, the encoders' logits over the *old* classes are distilled from
    a frozen copy of the previous encoders (Learning without Forgetting). The cosine logits to fixed
    class codes are exactly what should stay put for old queries to keep their codes.
    """

    name = "orthohash"

    def train_stage(self, batch: Batch, t: int, store: CodeStore) -> float:
        if t == 0:
            return self.fit(batch, t, lifelong=False)
        cfg = self.params.method.orthohash
        old_classes = len(store.categories)
        old_codebook = self.tensor(self.codebook[:old_classes])
        teachers = {"image": copy.deepcopy(self.image_net).eval(), "text": copy.deepcopy(self.text_net).eval()}

        def keep_old_logits(idx, x_img, x_txt, v_img, v_txt):
            loss = 0.0
            for name, x, v in (("image", x_img, v_img), ("text", x_txt, v_txt)):
                with torch.no_grad():
                    target = orthohash_logits(teachers[name](x[idx]), old_codebook, None, cfg.scale, 0.0)
                student = orthohash_logits(v, old_codebook, None, cfg.scale, 0.0)
                loss = loss + distillation(student, target, cfg.temperature)
            return cfg.distill * loss

        return self.fit(batch, t, lifelong=True, extra_loss=keep_old_logits)
