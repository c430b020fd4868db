"""CCMH-GAM: continual cross-modal hashing with gradient-aware memory (docs/methods.md).

Step 1, semantics: a label network maps label vectors to semantic codes, trained on the stage's
label vectors with DLCH's graded pairwise term, and kept on old semantics by replaying the stored
(label vector, code) pairs, which cost a label vector and K bits each.

Step 2, modalities: the image and text encoders learn to hit the semantic code of each item
(1 − cos(v, code)). After each stage a few exemplars are kept whose summed last-layer gradients
best match the stage's full gradient (greedy herding on the gradient kernel
g_i·g_j = (δ_i·δ_j)(z_i·z_j), our reading of the paper's fast selection). In later stages each
step's new-data gradient is projected so that it does not increase the memory loss (A-GEM), and
the memory gradient is added (replay): old items' code bits are then unlikely to flip.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lifelong_hashing.engine.batch import Batch
from lifelong_hashing.engine.codestore import CodeStore, pack_codes
from lifelong_hashing.engine.losses import bit_balance, graded_similarity, pairwise_cosine_loss, straight_through_sign
from lifelong_hashing.engine.methods.base import LabelNetMemoryMethod

_SELECTION_CANDIDATES = 2000


def cosine_to_codes(v: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(v, codes, dim=1)).mean()


def herding_selection(kernel: np.ndarray, count: int) -> np.ndarray:
    """Greedily pick ``count`` rows whose mean gradient is closest to the mean of all rows, from
    the Gram matrix of per-sample gradients: at size s the score of row i is
    ||μ − (Σ_S g + g_i)/s||² up to a constant."""
    n = len(kernel)
    target = kernel.mean(axis=1)  # μ·g_i
    diag = np.diag(kernel).copy()
    cross = np.zeros(n)  # Σ_{j∈S} g_i·g_j
    chosen: list[int] = []
    for size in range(1, min(count, n) + 1):
        score = -2.0 * target / size + (2 * cross + diag) / size**2
        score[chosen] = np.inf
        i = int(np.argmin(score))
        chosen.append(i)
        cross += kernel[:, i]
    return np.array(chosen, dtype=np.int64)


def _flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _set_grad(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
        offset += p.numel()


class CCMHGAM(LabelNetMemoryMethod):
    name = "ccmh_gam"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pair_labels = np.zeros((0, 0), np.float32)  # stored label set → semantic code pairs
        self.pair_codes = np.zeros((0, self.bits), np.float32)

    def arrays(self):
        return {"pair_labels": self.pair_labels, "pair_codes": self.pair_codes, **super().arrays()}

    def load_arrays(self, arrays):
        self.pair_labels, self.pair_codes = arrays["pair_labels"], arrays["pair_codes"]
        super().load_arrays(arrays)

    def on_new_categories(self, old_count: int, new_count: int) -> None:
        super().on_new_categories(old_count, new_count)
        grown = np.zeros((len(self.pair_labels), new_count), np.float32)
        grown[:, : self.pair_labels.shape[1]] = self.pair_labels
        self.pair_labels = grown

    def label_codes(self, batch: Batch) -> np.ndarray:
        """The semantic code the label network gives an item's labels: the target its encoders
        are trained to hit."""
        with torch.no_grad():
            self.label_net.eval()
            return pack_codes(self.label_net(self.tensor(batch.labels)).cpu().numpy())

    def train_stage(self, batch: Batch, t: int, store: CodeStore) -> float:
        targets = self._learn_semantics(batch, t)
        loss = self._learn_modalities(batch, targets, t)
        self._remember(batch, targets)
        return loss

    def _learn_semantics(self, batch: Batch, t: int) -> np.ndarray:
        """Step 1: train the label network; return each item's semantic code (±1)."""
        cfg = self.params.method.ccmh_gam
        unique, inverse = np.unique(batch.labels, axis=0, return_inverse=True)
        labels = self.tensor(unique)
        old_labels, old_codes = self.tensor(self.pair_labels), self.tensor(self.pair_codes)
        s_new = graded_similarity(labels, labels)
        s_old = graded_similarity(labels, old_labels) if len(old_labels) else None

        def step(idx):
            # The pairwise terms see both the continuous outputs and, through a straight-through
            # sign, the binary codes: cosine geometry alone does not survive the sign.
            h = torch.tanh(self.label_net(labels[idx]))
            loss = bit_balance(h)
            for u in (h, straight_through_sign(h)):
                loss = loss + pairwise_cosine_loss(u, u, s_new[idx][:, idx], rectify=False)
                if s_old is not None:
                    loss = loss + pairwise_cosine_loss(u, old_codes, s_old[idx], rectify=False)
            if s_old is not None:
                kept = torch.tanh(self.label_net(old_labels))
                loss = loss + cfg.replay_weight * ((kept - old_codes) ** 2).mean()
            loss.backward()
            return loss.detach()

        self.run_epochs([self.label_net], len(unique), cfg.label_epochs, cfg.label_lr, step,
                        desc=f"ccmh_gam labels {t}")
        with torch.no_grad():
            codes = torch.where(self.label_net(labels) >= 0, 1.0, -1.0).cpu().numpy()
        known = {row.tobytes() for row in self.pair_labels}
        fresh = [i for i, row in enumerate(unique.astype(np.float32)) if row.tobytes() not in known]
        self.pair_labels = np.concatenate([self.pair_labels, unique[fresh].astype(np.float32)])
        self.pair_codes = np.concatenate([self.pair_codes, codes[fresh]])
        return codes[inverse.reshape(-1)]

    def _learn_modalities(self, batch: Batch, targets: np.ndarray, t: int) -> float:
        """Step 2: encoders to semantic codes; memory replay with gradient projection after t=0."""
        cfg, train = self.params.method.ccmh_gam, self.params.train
        x_img, x_txt, codes = self.tensor(batch.image), self.tensor(batch.text), self.tensor(targets)
        lifelong = t > 0 and len(self.memory) > 0
        if t == 0:
            self.image_net.set_normalization(x_img)
            self.text_net.set_normalization(x_txt)
        params = [p for m in (self.image_net, self.text_net) for p in m.parameters()]
        mem_img, mem_txt = self.tensor(self.memory.image), self.tensor(self.memory.text)
        mem_codes = self.tensor(self.memory.codes)
        gen = torch.Generator().manual_seed(self.params.seed * 31 + t)

        def loss_on(xi, xt, c):
            return cosine_to_codes(self.image_net(xi), c) + cosine_to_codes(self.text_net(xt), c)

        def step(idx):
            loss = loss_on(x_img[idx], x_txt[idx], codes[idx])
            loss.backward()
            if not lifelong:
                return loss.detach()
            new_grad = _flat_grad(params)
            for p in params:
                p.grad = None
            pick = torch.randint(len(mem_codes), (max(2, min(len(idx), len(mem_codes))),), generator=gen)
            pick = pick.to(self.device)
            loss_on(mem_img[pick], mem_txt[pick], mem_codes[pick]).backward()
            mem_grad = _flat_grad(params)
            dot = new_grad @ mem_grad
            if cfg.projection and dot < 0:
                new_grad = new_grad - dot / (mem_grad @ mem_grad).clamp_min(1e-12) * mem_grad
            _set_grad(params, new_grad + cfg.replay_weight * mem_grad)
            return loss.detach()

        epochs, lr = (train.lifelong_epochs, train.lifelong_lr) if t > 0 else (train.epochs, train.lr)
        return self.run_epochs([self.image_net, self.text_net], len(batch), epochs, lr, step,
                               freeze_batchnorm=t > 0, desc=f"ccmh_gam stage {t}")

    def _remember(self, batch: Batch, targets: np.ndarray) -> None:
        """Add the stage's gradient-matching exemplars (a few per category) to the memory."""
        present = int((batch.labels.sum(axis=0) > 0).sum())
        count = self.params.method.memory_per_category * present
        if count == 0:
            return
        rng = np.random.default_rng([self.params.seed, self.stage + 1])
        pool = np.sort(rng.choice(len(batch), size=min(len(batch), _SELECTION_CANDIDATES), replace=False))
        codes = self.tensor(targets[pool])
        kernel = np.zeros((len(pool), len(pool)))
        for net, x in ((self.image_net, batch.image[pool]), (self.text_net, batch.text[pool])):
            net.eval()
            z = net.features(self.tensor(x)).detach()
            h = net.head(z).detach().requires_grad_(True)
            cosine_to_codes(net.balance(h), codes).backward()
            delta = h.grad
            kernel += ((delta @ delta.T) * (z @ z.T)).double().cpu().numpy()
        chosen = pool[herding_selection(kernel, count)]
        self.memory.add(batch, chosen, targets[chosen])
