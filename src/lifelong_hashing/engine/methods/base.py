"""The interface every method implements, and the one training loop they share.

A method owns an image and a text encoder and whatever memory it needs. ``learn(stage, store)``
trains on the stage's batch, writes the new items' codes to the code store and returns a
``StageResult``. Methods differ only in ``train_stage`` (loss and memory) and, for joint
retraining, in how database codes are written.

Database codes of items the method did not just train on (an appended batch, the joint
baseline's re-encoding) go through a ``DatabaseEncoder``: in this process by default, shard by
shard on Dask workers in the pipeline (``flows.pipeline.DaskEncoder``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lifelong_hashing.config import Params
from lifelong_hashing.engine.batch import Batch
from lifelong_hashing.engine.codestore import MODALITIES, CodeStore, pack_codes
from lifelong_hashing.engine.encoders import build_encoder, pick_device
from lifelong_hashing.engine.methods.memory import ExemplarMemory
from lifelong_hashing.engine.stages import Stage
from lifelong_hashing.files import atomic_write, write_json, write_npz

ENCODE_BLOCK = 4096
DatabaseEncoder = Callable[["Method", Batch], dict[str, np.ndarray]]


def encode_here(method: Method, batch: Batch) -> dict[str, np.ndarray]:
    """The default ``DatabaseEncoder``: the method's ``database_codes``, in this process."""
    return method.database_codes(batch)


@dataclass
class StageResult:
    stage: int
    new_categories: list[str]
    items_added: int
    train_seconds: float
    encode_seconds: float
    codes_rewritten: int
    final_loss: float
    device: str


class MethodError(ValueError):
    pass


class GrowingLabelNet(nn.Module):
    """Label vector → K outputs. Its input layer widens when categories arrive; the old columns
    keep their weights and the new ones start small, so old label codes barely move."""

    def __init__(self, bits: int, hidden: int = 512):
        super().__init__()
        self.hidden = hidden
        self.inp = nn.Linear(1, hidden)
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(hidden, bits))

    def grow(self, num_categories: int) -> None:
        old = self.inp
        new = nn.Linear(num_categories, self.hidden).to(old.weight.device)
        with torch.no_grad():
            keep = min(old.in_features, num_categories)
            new.weight.mul_(0.1)
            new.weight[:, :keep] = old.weight[:, :keep]
            new.bias.copy_(old.bias)
        self.inp = new

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.out(self.inp(labels))


class Method:
    """Base class: encoders, vocabulary, code writing, training loop, save/load."""

    name: ClassVar[str]
    memory: ExemplarMemory | None = None  # the lifelong methods' exemplars
    # whether training reads the codes in the store (DLCH's frozen old codes): if not, one
    # training can be scored under every storing rule (bench/quality.py)
    reads_stored_codes: ClassVar[bool] = False

    def __init__(self, params: Params, image_shape: tuple[int, ...], text_dim: int):
        self.params = params
        self.device = pick_device(params.train.device)
        self.image_shape, self.text_dim = tuple(image_shape), int(text_dim)
        self.bits = params.model.bits
        torch.set_num_threads(params.train.threads)  # codes depend on it (MKL/oneDNN reduction order)
        torch.manual_seed(params.seed)
        self.image_net, self.text_net = self._new_encoders()
        self.categories: tuple[str, ...] = ()
        self.stage = -1

    # ---- what methods define -------------------------------------------------------------
    def train_stage(self, batch: Batch, t: int, store: CodeStore) -> float:
        """Train on the stage's batch; return the last epoch's mean loss."""
        raise NotImplementedError

    def on_new_categories(self, old_count: int, new_count: int) -> None:
        """Grow label-sized parts (codebook rows, label-net inputs)."""

    def arrays(self) -> dict[str, np.ndarray]:
        """Numpy state saved beside the weights (codebook, memory, label-code pairs)."""
        return {}

    def load_arrays(self, arrays) -> None:
        """Inverse of ``arrays``."""

    def nets(self) -> dict[str, nn.Module]:
        return {"image": self.image_net, "text": self.text_net}

    def label_codes(self, batch: Batch) -> np.ndarray:
        """Packed codes a method gives labelled items from their labels (``database_codes:
        labels``), one for both modalities: OrthoHash's vote of class codes, DLCH's solved codes,
        CCMH-GAM's semantic codes."""
        raise NotImplementedError

    def encoder_codes(self, batch: Batch) -> dict[str, np.ndarray]:
        """Packed codes of each modality through its own encoder: what an unlabelled item stores."""
        return {"image": self.encode("image", batch.image), "text": self.encode("text", batch.text)}

    def database_codes(self, batch: Batch, rule: str | None = None,
                       voted: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Packed codes to store for new database items, by the storing rule (``rule``, else
        ``method.database_codes``). ``encoders``: every item's encoder codes. ``labels``: a
        labelled item stores its label code in both modalities, the code training aims at, so
        it never carries the encoders' error; an unlabelled one has only its encoders' codes.
        ``voted``: the labelled rows' label codes when training already made them (DLCH)."""
        codes = self.encoder_codes(batch)
        rows = np.flatnonzero(batch.labelled) if (rule or self.params.method.database_codes) == "labels" else []
        if len(rows):
            voted = self.label_codes(batch.subset(rows)) if voted is None else voted
            for m in MODALITIES:
                codes[m][rows] = voted
        return codes

    def write_codes(self, stage: Stage, store: CodeStore, rule: str | None = None) -> None:
        """Append the stage's items to ``store`` under the storing rule (``database_codes``)."""
        batch = stage.batch
        store.append(batch.ids, stage.index, batch.labels, stage.categories, self.database_codes(batch, rule),
                     batch.labelled)

    def keep_batch(self, batch: Batch) -> None:
        """What a method keeps of each stored batch: nothing; the joint baseline keeps them all."""

    def forget(self, ids: np.ndarray) -> int:
        """Drop the items ``ids`` from what the method keeps of items (its exemplar memory; the
        joint baseline's kept batches), so that a deleted item leaves the model's data and not
        only the code store. Returns how many rows went."""
        return 0 if self.memory is None else self.memory.remove(ids)

    def rewrite_codes(self, store: CodeStore, encoder: DatabaseEncoder) -> None:
        """Codes of stored items that a stage changes: none. A lifelong method keeps old database
        codes frozen (the joint baseline re-encodes them)."""

    def append(self, batch: Batch, store: CodeStore, encoder: DatabaseEncoder = encode_here) -> None:
        """Add items of known categories to the database without training (the pipeline's
        append of a batch that declares no new category), encoded by ``encoder``."""
        aligned = batch.with_categories(self.categories)
        store.append(aligned.ids, self.stage, aligned.labels, self.categories, encoder(self, aligned), aligned.labelled)
        self.keep_batch(aligned)

    # ---- shared machinery ----------------------------------------------------------------
    def _new_encoders(self) -> tuple[nn.Module, nn.Module]:
        m = self.params.model
        image = build_encoder(self.image_shape, m.bits, m.hidden, m.dropout, m.image_encoder)
        text = build_encoder((self.text_dim,), m.bits, m.hidden, m.dropout)
        return image.to(self.device), text.to(self.device)

    def _grow(self, categories: tuple[str, ...]) -> None:
        if categories[: len(self.categories)] != self.categories:
            raise MethodError(f"stage vocabulary {list(categories)} does not extend {list(self.categories)}")
        if len(categories) > len(self.categories):
            self.on_new_categories(len(self.categories), len(categories))
        self.categories = tuple(categories)

    def learn(self, stage: Stage, store: CodeStore, encoder: DatabaseEncoder = encode_here) -> StageResult:
        """Train on the stage's batch and store its codes; stored items that the method
        re-encodes (``rewrite_codes``) go through ``encoder``."""
        if stage.index != self.stage + 1:
            raise MethodError(f"{self.name}: expected stage {self.stage + 1}, got stage {stage.index}")
        self._check_inputs(stage.batch)
        before = {m: store.codes[m].copy() for m in MODALITIES}
        # Seeded before anything random (growing label-sized layers draws weights), so a stage
        # resumed in a fresh process draws exactly what a continuous run draws.
        torch.manual_seed(self.params.seed * 1000 + stage.index)
        self._grow(stage.categories)
        start = time.perf_counter()
        final_loss = self.train_stage(stage.batch.labelled_part(), stage.index, store)
        trained = time.perf_counter()
        self.write_codes(stage, store)
        self.keep_batch(stage.batch)
        self.rewrite_codes(store, encoder)
        encoded = time.perf_counter()
        self.stage = stage.index
        return StageResult(stage.index, list(stage.new_categories), len(stage.batch), trained - start,
                           encoded - trained, store.rows_changed(before), final_loss, self.device.type)

    def _check_inputs(self, batch: Batch) -> None:
        if not batch.labelled.any():
            raise MethodError(f"{batch.source}: a stage needs labelled items to learn its categories; "
                              "append unlabelled items to a trained model instead")
        if batch.image.shape[1:] != self.image_shape:
            raise MethodError(f"{batch.source}: image shape {batch.image.shape[1:]} != model's {self.image_shape}")
        if batch.text.shape[1] != self.text_dim:
            raise MethodError(f"{batch.source}: text dimension {batch.text.shape[1]} != model's {self.text_dim}")

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array, np.float32), device=self.device)

    def autocast(self):
        """Mixed precision on CUDA (bfloat16), plain float32 on CPU: one code path for both."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def continuous(self, modality: str, features: np.ndarray) -> np.ndarray:
        if modality not in MODALITIES:
            raise MethodError(f"unknown modality {modality!r}")
        net = self.nets()[modality]
        net.eval()
        out = []
        with torch.no_grad(), self.autocast():
            for s in range(0, len(features), ENCODE_BLOCK):
                out.append(net(self.tensor(features[s: s + ENCODE_BLOCK])).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.bits), np.float32)

    def encode(self, modality: str, features: np.ndarray) -> np.ndarray:
        """Packed codes of raw features (queries, or new database items)."""
        return pack_codes(self.continuous(modality, features))

    def run_epochs(self, modules: list[nn.Module], n_items: int, epochs: int, lr: float,
                   step: Callable[[torch.Tensor], torch.Tensor], *, freeze_batchnorm: bool = False,
                   end_of_epoch: Callable[[], None] | None = None, sample_weights: np.ndarray | None = None,
                   draws: int | None = None, desc: str = "") -> float:
        """The shared loop: Adam, seeded shuffles, lr ×0.1 at 80 % of epochs (OrthoHash's
        schedule). ``step(idx)`` computes the loss of a minibatch and calls backward itself, so a
        method can shape gradients (CCMH-GAM's projection) before the optimizer steps.

        ``freeze_batchnorm`` keeps batch-norm statistics fixed: in a lifelong stage, letting them
        drift to the new batch would silently change every old query's code. ``sample_weights``
        draws each epoch's rows with replacement in proportion to them (class balancing), ``draws``
        of them (default ``n_items``): a replay memory larger than what an epoch can afford."""
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr, weight_decay=self.params.train.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, int(0.8 * epochs))], 0.1)
        gen = torch.Generator().manual_seed(self.params.seed * 7919 + self.stage + 1)  # one stream per stage
        bs = self.params.train.batch_size
        last = float("nan")
        for _ in tqdm(range(epochs), desc=desc or self.name, leave=False, disable=None):
            for m in modules:
                m.train()
                if freeze_batchnorm:
                    for mod in m.modules():
                        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                            mod.eval()
            total, count = 0.0, 0
            if sample_weights is None:
                order = torch.randperm(n_items, generator=gen)
            else:
                order = torch.multinomial(torch.as_tensor(sample_weights, dtype=torch.float64), draws or n_items,
                                          replacement=True, generator=gen)
            for idx in order.split(bs):
                if len(idx) < 2 <= n_items:  # batch-norm needs two rows
                    continue
                opt.zero_grad(set_to_none=True)
                with self.autocast():
                    loss = step(idx.to(self.device))
                opt.step()
                total, count = total + float(loss), count + 1
            sched.step()
            last = total / max(count, 1)
            if end_of_epoch:
                end_of_epoch()
        for m in modules:
            m.eval()
        return last

    # ---- persistence -----------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_write(directory / "weights.pt") as fh:
            torch.save({k: m.state_dict() for k, m in self.nets().items()}, fh)
        write_npz(directory / "method_state.npz", self.arrays())
        write_json(directory / "method.json", {
            "method": self.name, "stage": self.stage, "categories": list(self.categories),
            "image_shape": list(self.image_shape), "text_dim": self.text_dim, "bits": self.bits})

    def save_encoders(self, directory: Path) -> None:
        """What encoding needs (a worker's copy); everything ``save`` writes unless a method keeps
        data that only its training reads."""
        self.save(directory)

    def restore(self, directory: Path) -> None:
        meta = json.loads((directory / "method.json").read_text())
        self._grow(tuple(meta["categories"]))
        weights = torch.load(directory / "weights.pt", map_location=self.device, weights_only=True)
        for k, m in self.nets().items():
            m.load_state_dict(weights[k])
            m.eval()
        with np.load(directory / "method_state.npz", allow_pickle=False) as arrays:
            self.load_arrays(arrays)
        self.stage = int(meta["stage"])


class LabelNetMemoryMethod(Method):
    """A method with a label network and an exemplar memory (DLCH, CCMH-GAM): both grow with the
    vocabulary and are saved with the weights."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_net = GrowingLabelNet(self.bits).to(self.device)
        self.memory = ExemplarMemory.empty(self.image_shape, self.text_dim, self.bits)

    def nets(self):
        return {**super().nets(), "label": self.label_net}

    def arrays(self):
        return self.memory.arrays()

    def load_arrays(self, arrays):
        self.memory.load_arrays(arrays)

    def on_new_categories(self, old_count: int, new_count: int) -> None:
        self.label_net.grow(new_count)
        self.memory.grow_labels(new_count)
