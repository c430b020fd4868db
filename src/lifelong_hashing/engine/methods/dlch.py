"""DLCH: deep lifelong cross-modal hashing (docs/methods.md, "Methods").

Base stage: image, text and label networks trained with DLCH's graded pairwise terms
J(a, b) = mean (relu(cos(a_i, b_j)) − S_ij)², S_ij = cos(l_i, l_j), a quantization term to
per-item codes B = sign(F + G + L) refreshed each epoch, and bit balance.

Lifelong stage: the new batch is trained with a small memory of old items. A sample of the
*frozen* stored database codes takes part in the loss: every output u_i is pulled to
(u_i · b_j)/K ≈ S_ij against old codes b_j and against the new items' own discrete codes V,
solved by discrete cyclic coordinate descent (DCC, as in ADSH/DIHN) every epoch; α ties each
output to its item's code: V for new items, the frozen stored code for memory items; β balances
bits.

Our choices where the description is silent or slipped (docs/methods.md has the summary):
- every term is scaled by 1/K (inner products) so the weights stay comparable across code
  lengths; the reference code's raw α, β values therefore do not carry over;
- the tie of outputs to the new codes *is* added to the loss, and indexed by item, not batch
  position (the two slips of the reference code);
- the image–text pairwise term of the base stage is kept in lifelong stages so the two modalities
  of new items stay aligned;
- the tie term of DCC is weighted α·m (m anchors), the weight the loss's own 1/K scaling gives
  it; with α·m·K the tie swamps the similarity term and DCC returns sign(U) on almost every bit;
- stored codes under ``method.database_codes: labels``: the codes the stage solved for its
  labelled items (B = sign(F + G + L) in the base stage, DCC's V after), as asymmetric hashing
  (ADSH, DIHN) does: they carry the labels, which the encoders' signs only approximate. One code
  per item, for both modalities. Items appended without training (known categories) get
  sign(F + G + L) with the label network's output for their labels: nothing was solved for them.
  Under ``encoders`` (and for unlabelled items) each modality stores its encoder's code. Since
  lifelong stages pull outputs toward a sample of the stored codes, DLCH's training depends on
  the rule (``reads_stored_codes``);
- the "sample of old database items" keeps its features in a class-balanced memory of a few items
  per category, so the stored codes of old items can act as fixed targets for their outputs:
  without it nothing ties the encoders to old inputs and old queries drift away from their codes;
  rows are drawn class-balanced so the few memory items are not swamped by the new batch.
"""

from __future__ import annotations

import numpy as np
import torch

from lifelong_hashing.engine.batch import Batch
from lifelong_hashing.engine.codestore import CodeStore, pack_codes, unpack_codes
from lifelong_hashing.engine.losses import bit_balance, graded_similarity, pairwise_cosine_loss
from lifelong_hashing.engine.methods.base import LabelNetMemoryMethod
from lifelong_hashing.engine.methods.memory import balanced_sample, class_balanced_weights, replay_draws
from lifelong_hashing.engine.stages import Stage


def dcc_codes(target_term: torch.Tensor, gram: torch.Tensor, n_anchor: int, outputs: torch.Tensor,
              alpha: float, iters: int) -> torch.Tensor:
    """Solve min_V ||V Aᵀ − K·S||² + α·m·||V − U||² over V ∈ {±1}^{n×K}, bit by bit.

    A (m×K) are anchor codes/outputs, S (n×m) their target similarities, U (n×K) the new items'
    continuous outputs; the caller passes K·S·A (``target_term``) and AᵀA (``gram``), whose frozen
    parts it computes once per stage. Each bit has a closed form given the others. The weight α·m
    is the training loss's (mean over n·m pairs of (u·a/K − s)², plus α/K · mean (v − u)², times
    n·m·K²), so the solved codes and the encoders pull toward the same optimum."""
    bits = outputs.shape[1]
    q = target_term + alpha * n_anchor * outputs
    v = torch.where(outputs >= 0, 1.0, -1.0)
    for _ in range(iters):
        for k in range(bits):
            others = v @ gram[:, k] - v[:, k] * gram[k, k]
            v[:, k] = torch.where(q[:, k] - others >= 0, 1.0, -1.0)
    return v


class DLCH(LabelNetMemoryMethod):
    name = "dlch"
    reads_stored_codes = True  # lifelong stages pull outputs toward a sample of the stored codes

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # ±1 codes solved for the labelled items of the stage just trained, in their order: the
        # label codes ``write_codes`` stores for them and the targets their memory rows keep
        self.solved_codes = np.zeros((0, self.bits), np.float32)

    def label_codes(self, batch: Batch) -> np.ndarray:
        """Items appended without training: nothing was solved for them, so the base stage's rule
        B = sign(F + G + L) with the label network's output for their labels."""
        with torch.no_grad():
            self.label_net.eval()
            lab = self.label_net(self.tensor(batch.labels)).cpu().numpy()
        outputs = [np.tanh(self.continuous(m, getattr(batch, m))) for m in ("image", "text")]
        return pack_codes(outputs[0] + outputs[1] + np.tanh(lab))

    def write_codes(self, stage: Stage, store: CodeStore, rule: str | None = None) -> None:
        """The stage's items, with the codes solved for its labelled ones as their label codes."""
        batch = stage.batch
        codes = self.database_codes(batch, rule, voted=pack_codes(self.solved_codes))
        store.append(batch.ids, stage.index, batch.labels, stage.categories, codes, batch.labelled)

    def _outputs(self, image: np.ndarray, text: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """tanh outputs of both encoders over whole arrays, in eval mode, without gradients."""
        return (torch.tanh(self.tensor(self.continuous("image", image))),
                torch.tanh(self.tensor(self.continuous("text", text))))

    def train_stage(self, batch: Batch, t: int, store: CodeStore) -> float:
        loss, solved = self._base_stage(batch, t) if t == 0 else self._lifelong_stage(batch, t, store)
        self.solved_codes = solved.cpu().numpy()
        rows = balanced_sample(batch, self.params.method.memory_per_category, [self.params.seed, t])
        self.memory.add(batch, rows, self.solved_codes[rows])
        return loss

    def _base_stage(self, batch: Batch, t: int) -> tuple[float, torch.Tensor]:
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

        loss = self.run_epochs([self.image_net, self.text_net, self.label_net], len(batch), train.epochs,
                               train.lr, step, end_of_epoch=refresh_codes, desc=f"dlch stage {t}")
        return loss, codes

    def _lifelong_stage(self, batch: Batch, t: int, store: CodeStore) -> tuple[float, torch.Tensor]:
        cfg, train, mem = self.params.method.dlch, self.params.train, self.memory
        n_new, k = len(batch), float(self.bits)
        image, text = np.concatenate([batch.image, mem.image]), np.concatenate([batch.text, mem.text])
        x_img, x_txt = self.tensor(image), self.tensor(text)
        labels = self.tensor(np.concatenate([batch.labels.astype(np.float32), mem.labels]))
        rng = np.random.default_rng([self.params.seed, t])
        pool = np.flatnonzero(store.labelled)  # an unlabelled item's labels are not known to training
        rows = np.sort(rng.choice(pool, size=min(cfg.old_sample, len(pool)), replace=False))
        old_codes = self.tensor(unpack_codes(store.codes["image"][rows], self.bits))
        old_labels = np.zeros((len(rows), len(self.categories)), np.float32)
        old_labels[:, : store.labels.shape[1]] = store.labels[rows]
        old_labels = self.tensor(old_labels)
        omega = torch.as_tensor(np.sort(rng.choice(n_new, size=min(cfg.old_sample, n_new), replace=False)),
                                device=self.device)
        f, g = self._outputs(batch.image, batch.text)
        # Targets per trained item: DCC codes for new items (refreshed), frozen codes for memory.
        targets = torch.cat([torch.where(f + g >= 0, 1.0, -1.0), self.tensor(mem.codes)])

        def step(idx):
            # Similarities are computed per minibatch: an n×n matrix would not fit at scale.
            f, g = torch.tanh(self.image_net(x_img[idx])), torch.tanh(self.text_net(x_txt[idx]))
            s_old = graded_similarity(labels[idx], old_labels)
            s_omega = graded_similarity(labels[idx], labels[omega])
            loss = cfg.gamma * pairwise_cosine_loss(f, g, graded_similarity(labels[idx], labels[idx]))
            for u in (f, g):
                loss = loss + ((u @ old_codes.T / k - s_old) ** 2).mean()
                loss = loss + ((u @ targets[omega].T / k - s_omega) ** 2).mean()
                loss = loss + cfg.alpha * ((targets[idx] - u) ** 2).mean() / k + cfg.beta * bit_balance(u)
            loss.backward()
            return loss.detach()

        # DCC's terms from the frozen old codes never change within the stage: computed once.
        s_new_omega = graded_similarity(labels[:n_new], labels[omega])
        old_term = k * graded_similarity(labels[:n_new], old_labels) @ old_codes
        old_gram = old_codes.T @ old_codes
        n_anchor = len(old_codes) + len(omega)

        def solve_new_codes():
            f, g = self._outputs(batch.image, batch.text)
            u = (f + g) / 2
            target_term = old_term + k * s_new_omega @ u[omega]
            gram = old_gram + u[omega].T @ u[omega]
            targets[:n_new] = dcc_codes(target_term, gram, n_anchor, u, cfg.alpha, cfg.dcc_iters)

        loss = self.run_epochs([self.image_net, self.text_net], len(image), train.lifelong_epochs,
                               train.lifelong_lr, step, freeze_batchnorm=True, end_of_epoch=solve_new_codes,
                               sample_weights=class_balanced_weights(labels.cpu().numpy()),
                               draws=replay_draws(n_new, len(mem), len(store.categories),
                                                  self.params.method.replay_per_category),
                               desc=f"dlch stage {t}")
        return loss, targets[:n_new]
