"""New categories in the pipeline: the unlabelled items of each batch are screened against the
model before the batch (``screen``: novelty scores, flags, proposals; ``engine/discovery.py``),
the result is kept with the version (``reports/discovery/vNNNN.json``: flagged ids and scores,
proposals; the state's history keeps the counts), and a person's answer to the proposals becomes
a new-category batch in the incoming folder (``batch_from_answer``) that the next run learns like
any other: its items are stored unlabelled already, and an unlabelled item sent again with labels
is that item labelled (validation's update rule). Rejected proposals stay unlabelled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from lifelong_hashing.config import DiscoveryConfig
from lifelong_hashing.engine import discovery
from lifelong_hashing.engine.batch import Batch, name_key, name_problem, read_batch_arrays
from lifelong_hashing.engine.state import RunState
from lifelong_hashing.files import write_json, write_npz


def screen(state: RunState, batch: Batch, queries: Batch, cfg: DiscoveryConfig) -> dict | None:
    """The discovery report of a batch's unlabelled items against the current model (None when
    it has none, or the model has not learned a stage yet); the latest stage record's ``novelty``
    counts them with the stage's earlier appends (its share is what the Evidently report plots)."""
    if not cfg.enabled or batch.all_labelled or not state.history or state.reference.empty:
        return None
    unlabelled = batch.subset(np.flatnonzero(~batch.labelled))
    model = discovery.NoveltyModel.fit(state.store, state.reference,
                                       discovery.known_queries(queries, tuple(state.method.categories)), cfg.quantile)
    scores = model.scores(unlabelled)
    flagged = np.flatnonzero(scores > model.threshold)
    proposals = []
    if len(flagged) >= cfg.min_flagged:
        words = (state.text_vocabulary or {}).get("words")
        proposals, _ = discovery.propose(model, state.store, unlabelled.subset(flagged), state.params.seed, words)
    counts = {"unlabelled": len(unlabelled), "flagged": int(len(flagged)),
              "share": round(len(flagged) / len(unlabelled), 4), "threshold": round(model.threshold, 4),
              "proposals": len(proposals)}
    seen = state.history[-1].get("novelty", {"unlabelled": 0, "flagged": 0})  # the stage's appends so far, too
    total, hits = seen["unlabelled"] + len(unlabelled), seen["flagged"] + len(flagged)
    state.history[-1]["novelty"] = {"unlabelled": total, "flagged": hits, "share": round(hits / total, 4)}
    return {**counts, "quantile": cfg.quantile, "stage": state.stage,
            "flagged_items": [{"id": str(unlabelled.ids[i]), "score": round(float(scores[i]), 4)} for i in flagged],
            "proposals": [p.as_dict() for p in proposals]}


def report_path(reports_dir: Path, version: str) -> Path:
    return reports_dir / "discovery" / f"{version}.json"


def erase_from_reports(reports_dir: Path, ids: list[str]) -> int:
    """Erasure's reach into the discovery reports: the ids out of every flag and proposal."""
    erased, changed = set(ids), 0
    for path in sorted((reports_dir / "discovery").glob("v*.json")):
        report = json.loads(path.read_text())
        flagged = [f for f in report["flagged_items"] if f["id"] not in erased]
        proposals = [{**p, "members": [m for m in p["members"] if m not in erased]} for p in report["proposals"]]
        if len(flagged) != len(report["flagged_items"]) or proposals != report["proposals"]:
            write_json(path, {**report, "flagged_items": flagged,
                              "proposals": [{**p, "size": len(p["members"])} for p in proposals]})
            changed += 1
    return changed


class ProposalAnswer(BaseModel):
    """A person's decision on one proposal."""

    proposal: int = Field(description="the proposal's number")
    decision: Literal["accept", "merge", "reject"] = Field(
        "reject", description="accept: a new category named `name`; merge: its members join proposal `merge_into`; "
                              "reject: its items stay unlabelled")
    name: str = Field("", max_length=200, description="the new category's name (accept)")
    merge_into: int | None = Field(None, description="the accepted proposal it joins (merge)")


def named_groups(report: dict, answers: list[ProposalAnswer], known: tuple[str, ...]) -> dict[str, list[str]]:
    """New category name → member ids, from the answers; a ValueError names the first answer
    that cannot be carried out (unknown proposal, a name that is not canonical, already a known
    category or given twice, a merge into a proposal not accepted)."""
    proposals = {p["number"]: p for p in report["proposals"]}
    by_number = {a.proposal: a for a in answers}
    unknown = sorted(set(by_number) - set(proposals))
    if unknown:
        raise ValueError(f"answers name proposals {unknown}, which this run did not make (it made {sorted(proposals)})")
    taken = {name_key(c) for c in known}
    groups: dict[str, list[str]] = {}
    for answer in by_number.values():
        if answer.decision != "accept":
            continue
        problem = name_problem(answer.name) or ("" if answer.name else "empty")
        if problem or name_key(answer.name) in taken:
            raise ValueError(f"proposal {answer.proposal}: {answer.name!r} cannot name a new category: "
                             f"{problem or 'a category of that name exists already'}")
        taken.add(name_key(answer.name))
        groups[answer.name] = list(proposals[answer.proposal]["members"])
    for answer in by_number.values():
        if answer.decision == "merge":
            target = by_number.get(answer.merge_into)
            if target is None or target.decision != "accept":
                raise ValueError(f"proposal {answer.proposal}: merge into {answer.merge_into}, which is not accepted")
            groups[target.name] += proposals[answer.proposal]["members"]
    return groups


def batch_from_answer(kept_batches: list[Path], groups: dict[str, list[str]], out: Path) -> Path | None:
    """The accepted groups as a new-category batch file: the members' features from the batch
    files the workspace keeps, labelled with their group's name (None when nothing was accepted)."""
    members = {item: name for name, ids in groups.items() for item in ids}
    if not members:
        return None
    parts = []
    for path in kept_batches:
        arrays = read_batch_arrays(path)
        rows = np.flatnonzero(np.isin(arrays["ids"].astype(str), list(members)))
        if len(rows):
            parts.append({k: arrays[k][rows] for k in ("ids", "image", "text")})
    ids = np.concatenate([p["ids"] for p in parts]).astype(str)
    names = list(groups)
    labels = np.zeros((len(ids), len(names)), np.uint8)
    labels[np.arange(len(ids)), [names.index(members[i]) for i in ids]] = 1
    return write_npz(out, {"ids": ids, "image": np.concatenate([p["image"] for p in parts]),
                           "text": np.concatenate([p["text"] for p in parts]), "labels": labels,
                           "categories": np.array(names), "new_categories": np.array(names)}, compress=True)


def read_report(registry, version: str) -> dict:
    """``version``'s discovery report in the workspace, or a ValueError saying there is none."""
    path = report_path(registry.reports_dir, version)
    if not path.exists():
        raise ValueError(f"{version}: no discovery report in {path.parent} (no unlabelled items screened then)")
    return json.loads(path.read_text())


def answer_proposals(registry, incoming: Path, version: str, answers: list[ProposalAnswer]
                     ) -> tuple[dict[str, list[str]], Path | None]:
    """Carry out a person's answers to ``version``'s proposals: the named groups and the batch
    they make in ``incoming`` (``discovered-<version>.npz``; None when nothing was accepted)."""
    known = tuple(json.loads((registry.state_dir / "state.json").read_text())["categories"])
    groups = named_groups(read_report(registry, version), answers, known)
    batch = batch_from_answer(sorted(registry.batches_dir.glob("*.npz")), groups,
                              Path(incoming) / f"discovered-{version}.npz")
    return groups, batch


def proposals_markdown(report: dict, version: str) -> str:
    """The proposals as a person reads them in Prefect: size, sample ids, nearest known
    categories, top tags (ids and tags escaped: they are data)."""
    from lifelong_hashing.operations.pipeline import markdown_text

    lines = [f"# {len(report['proposals'])} proposed new categories ({version})", "",
             f"{report['flagged']} of {report['unlabelled']} unlabelled items looked new (score above "
             f"{report['threshold']}, the {report['quantile']:.0%} quantile of held-out known items).", "",
             "| proposal | size | sample ids | nearest known categories | top tags |", "|---|---|---|---|---|"]
    for p in report["proposals"]:
        nearest = ", ".join(f"{markdown_text(n)} ({d:.1f})" for n, d in p["nearest_known"])
        lines.append(f"| {p['number']} | {p['size']} | {', '.join(map(markdown_text, p['members'][:5]))} | {nearest} "
                     f"| {', '.join(map(markdown_text, p['top_tags'])) or '-'} |")
    lines += ["", "Answer each: accept with a name, merge into an accepted one, or reject (stays unlabelled)."]
    return "\n".join(lines)

