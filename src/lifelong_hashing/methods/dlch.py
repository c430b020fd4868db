"""DLCH: deep lifelong cross-modal hashing (METHODS.md, "DLCH").

Base stage: image, text and label networks trained with DLCH's graded pairwise terms
J(a, b) = mean (relu(cos(a_i, b_j)) − S_ij)², S_ij = cos(l_i, l_j), a quantization term to
per-item codes B = sign(F + G + L) refreshed each epoch, and bit balance.

Lifelong stage: only the new batch is trained. A sample of the *frozen* stored database codes
takes part in the loss: each new output u_i is pulled to (u_i · b_j)/K ≈ S_ij against old codes
b_j and against the new items' own discrete codes V, which are solved by discrete cyclic
coordinate descent (DCC, as in ADSH/DIHN) every epoch; α ties outputs to V; β balances bits.

Our choices where the description is silent or slipped (all documented in METHODS.md):
- every term is scaled by 1/K (inner products) so the weights stay comparable across code
  lengths; the reference code's raw α, β values therefore do not carry over;
- the tie of outputs to the new codes *is* added to the loss, and indexed by item, not batch
  position (the two slips of the reference code);
- the image–text pairwise term of the base stage is kept in lifelong stages so the two modalities
  of new items stay aligned;
- database codes are sign(F + G), one code per item, stored for both modalities.
"""

from __future__ import annotations

import numpy as np
import torch

from ..batch import Batch
from ..codestore import CodeStore, pack_codes, unpack_codes
from ..losses import bit_balance, graded_similarity, pairwise_cosine_loss
from .base import GrowingLabelNet, Method


def dcc_codes(anchors: torch.Tensor, similarity: torch.Tensor, outputs: torch.Tensor,
              alpha: float, iters: int) -> torch.Tensor:
    """Solve min_V ||V Aᵀ − K·S||² + α·m·K·||V − U||² over V ∈ {±1}^{n×K}, bit by bit.

    A (m×K) are anchor codes/outputs, S (n×m) their target similarities, U (n×K) the new items'
    continuous outputs. Each bit has a closed form given the others."""
    n_anchor, bits = anchors.shape
    q = bits * similarity @ anchors + alpha * n_anchor * bits * outputs
    gram = anchors.T @ anchors
    v = torch.where(outputs >= 0, 1.0, -1.0)
    for _ in range(iters):
        for k in range(bits):
            others = v @ gram[:, k] - v[:, k] * gram[k, k]
            v[:, k] = torch.where(q[:, k] - others >= 0, 1.0, -1.0)
    return v


class DLCH(Method):
    name = "dlch"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_net = GrowingLabelNet(self.bits).to(self.device)

    def nets(self):
        return {**super().nets(), "label": self.label_net}

    def on_new_categories(self, old_count: int, new_count: int) -> None:
        self.label_net.grow(new_count)

    def database_codes(self, batch: Batch) -> dict[str, np.ndarray]:
        joint = pack_codes(self.continuous("image", batch.image) + self.continuous("text", batch.text))
        return {"image": joint, "text": joint.copy()}

    def _outputs(self, x_img, x_txt):
        """tanh outputs of both encoders over a whole batch, in eval mode, without gradients."""
        with torch.no_grad():
            return (torch.tanh(self.tensor(self.continuous("image", x_img))),
                    torch.tanh(self.tensor(self.continuous("text", x_txt))))

    def train_stage(self, batch: Batch, t: int, store: CodeStore) -> float:
        return self._base_stage(batch, t) if t == 0 else self._lifelong_stage(batch, t, store)

    def _base_stage(self, batch: Batch, t: int) -> float:
        cfg, train = self.params.method.dlch, self.params.train
        x_img, x_txt, labels = self.tensor(batch.image), self.tensor(batch.text), self.tensor(batch.labels)
        self.image_net.set_normalization(x_img)
        self.text_net.set_normalization(x_txt)
        codes = torch.where(torch.randn(len(batch), self.bits, device=self.device) >= 0, 1.0, -1.0)

        def step(idx):
            f, g = torch.tanh(self.image_net(x_img[idx])), torch.tanh(self.text_net(x_txt[idx]))
            lab = torch.tanh(self.label_net(labels[idx]))
            s = graded_similarity(labels[idx], labels[idx])
            pairs = sum(pairwise_cosine_loss(a, b, s) for a, b in ((f, lab), (g, lab), (f, g), (lab, lab)))
            quant = sum(((codes[idx] - u) ** 2).mean() for u in (f, g, lab))
            loss = cfg.gamma * pairs + cfg.alpha * quant / self.bits + cfg.beta * (bit_balance(f) + bit_balance(g))
            loss.backward()
            return loss.detach()

        def refresh_codes():
            f, g = self._outputs(batch.image, batch.text)
            with torch.no_grad():
                self.label_net.eval()
                lab = torch.tanh(self.label_net(labels))
            codes.copy_(torch.where(f + g + lab >= 0, 1.0, -1.0))

        return self.run_epochs([self.image_net, self.text_net, self.label_net], len(batch), train.epochs,
                               train.lr, step, end_of_epoch=refresh_codes, desc=f"dlch stage {t}")

    def _lifelong_stage(self, batch: Batch, t: int, store: CodeStore) -> float:
        cfg, train = self.params.method.dlch, self.params.train
        x_img, x_txt, labels = self.tensor(batch.image), self.tensor(batch.text), self.tensor(batch.labels)
        rng = np.random.default_rng([self.params.seed, t])
        rows = np.sort(rng.choice(len(store), size=min(cfg.old_sample, len(store)), replace=False))
        old_codes = self.tensor(unpack_codes(store.codes["image"][rows], self.bits))
        old_labels = np.zeros((len(rows), len(self.categories)), np.float32)
        old_labels[:, : store.labels.shape[1]] = store.labels[rows]
        s_old = graded_similarity(labels, self.tensor(old_labels))
        s_new = graded_similarity(labels, labels)
        omega = torch.as_tensor(np.sort(rng.choice(len(batch), size=min(cfg.old_sample, len(batch)),
                                                   replace=False)), device=self.device)
        f, g = self._outputs(batch.image, batch.text)
        new_codes = torch.where(f + g >= 0, 1.0, -1.0)
        k = float(self.bits)

        def step(idx):
            f, g = torch.tanh(self.image_net(x_img[idx])), torch.tanh(self.text_net(x_txt[idx]))
            loss = cfg.gamma * pairwise_cosine_loss(f, g, s_new[idx][:, idx])
            for u in (f, g):
                loss = loss + ((u @ old_codes.T / k - s_old[idx]) ** 2).mean()
                loss = loss + ((u @ new_codes[omega].T / k - s_new[idx][:, omega]) ** 2).mean()
                loss = loss + cfg.alpha * ((new_codes[idx] - u) ** 2).mean() / k + cfg.beta * bit_balance(u)
            loss.backward()
            return loss.detach()

        def solve_new_codes():
            f, g = self._outputs(batch.image, batch.text)
            u = (f + g) / 2
            anchors = torch.cat([old_codes, u[omega]])
            sim = torch.cat([s_old, s_new[:, omega]], dim=1)
            new_codes.copy_(dcc_codes(anchors, sim, u, cfg.alpha, cfg.dcc_iters))

        return self.run_epochs([self.image_net, self.text_net], len(batch), train.lifelong_epochs,
                               train.lifelong_lr, step, freeze_batchnorm=True, end_of_epoch=solve_new_codes,
                               desc=f"dlch stage {t}")
