"""Discovering new categories end to end, on the real pipeline (Prefect server, git + DVC) and a
real ``lhash serve``: an unlabelled batch is screened (novelty scores, flags, proposals kept with
the version), the run pauses for a person's answer in a Prefect input form, a scripted answer
names a proposal (and merges another into it), the next run learns the named category as an
increment and serves it; a run nobody answers times out and loses nothing."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from lifelong_hashing.cli import main as lhash
from lifelong_hashing.config import load_params
from lifelong_hashing.engine.batch import Batch, load_batch, make_batch, save_batch
from lifelong_hashing.engine.runner import build_plan
from lifelong_hashing.engine.state import load_state
from lifelong_hashing.operations.discovery import ProposalAnswer, named_groups
from lifelong_hashing.operations.registry import Registry, version_tag

from .conftest import PARAMS, WIKIPEDIA, drop, run, serving_pipeline, settings, thread_in_context

ASK = {"pipeline.discovery.ask": True, "pipeline.discovery.answer_timeout_seconds": 300}


def unlabelled_batch(stage_file, known_rows: Batch, path) -> object:
    """A stage's items of categories the model never saw, and held-out items of known ones, all
    unlabelled (their labels zero, as a sender without labels writes them)."""
    new = load_batch(stage_file)
    both = Batch.concat([new.subset(np.arange(min(len(new), 200))), known_rows])
    return save_batch(make_batch(both.ids, both.image, both.text, np.zeros((len(both), 1), np.uint8), ["art"],
                                 labelled=np.zeros(len(both), bool)), path)


def paused_naming_run(timeout: float = 240):
    """The flow run of "name new categories" once it waits for input."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["name new categories"])))
            waiting = [r for r in runs if r.state and r.state.is_paused()]
            if waiting:
                return waiting[0]
            time.sleep(1)
    raise AssertionError("no paused 'name new categories' run")


@pytest.mark.e2e
@pytest.mark.usefixtures("prefect_harness")
def test_unlabelled_arrivals_are_flagged_proposed_named_in_prefect_learned_and_served(workspace, stage_files):
    from prefect.flow_runs import resume_flow_run

    root = workspace
    ws = Registry(root / "ws", str(root / "remote"))
    plan = build_plan(load_params(PARAMS, {"dataset.path": str(WIKIPEDIA)}))
    of_known = np.flatnonzero(plan.queries.labels[:, :4].any(axis=1))  # held out, of the 4 categories learned
    known = plan.queries.subset(of_known[:60])
    drop(unlabelled_batch(stage_files[2], known, root / "unlabelled.npz"), root)

    outcome: dict = {}
    thread = thread_in_context(lambda: outcome.update(state=run(root, **ASK)))
    thread.start()
    paused = paused_naming_run()
    report = json.loads((ws.reports_dir / "discovery" / "v0002.json").read_text())
    assert report["unlabelled"] == 260 and report["flagged"] >= 6 and report["proposals"], report
    flagged = {f["id"] for f in report["flagged_items"]}
    assert len(flagged & set(load_batch(stage_files[2]).ids.tolist())) > 0.6 * len(flagged)  # mostly new ones
    biggest, *others = sorted(report["proposals"], key=lambda p: -p["size"])
    answers = [{"proposal": biggest["number"], "decision": "accept", "name": "found-one"}]
    if others:
        answers.append({"proposal": others[0]["number"], "decision": "merge", "merge_into": biggest["number"]})
    answers += [{"proposal": p["number"], "decision": "reject"} for p in others[1:]]
    resume_flow_run(paused.id, run_input={"answers": answers})
    thread.join(300)
    state = outcome["state"]
    assert state.is_completed(), state.message
    (done,) = state.result()
    members = biggest["members"] + (others[0]["members"] if others else [])
    assert done["kind"] == "append" and done["named"]["accepted"] == {"found-one": len(members)}
    history = json.loads((ws.state_dir / "state.json").read_text())["history"]
    assert history[-1]["novelty"]["flagged"] == report["flagged"]
    assert (root / "incoming" / "discovered-v0002.npz").exists()

    size = len(load_state(ws.state_dir).store)
    assert run(root).is_completed()  # the named category: an increment, v0003
    learned = load_state(ws.state_dir)
    assert "found-one" in learned.method.categories and learned.history[-1]["items_replaced"] == len(members)
    assert learned.store.labelled[learned.store.rows_of(members)].all() and len(learned.store) == size
    evidently = (ws.reports_dir / "monitoring" / "stage-01" / "report.html").read_text()
    assert "Unlabelled items flagged as new categories" in evidently  # the share over stages
    with serving_pipeline(root) as url:
        reply = httpx.post(url + "/search", json={"modality": "text", "k": 5, "features": [[1.0] * 1000],
                                                  "filter": {"any_of": ["found-one"]}})
        assert reply.status_code == 200 and len(reply.json()["results"][0]["image"]) == 5, reply.text

    # Nobody answers this time.
    drop(unlabelled_batch(stage_files[3], plan.queries.subset(of_known[60:90]), root / "later.npz"), root)
    state = run(root, **{**ASK, "pipeline.discovery.answer_timeout_seconds": 3})
    assert state.is_completed(), state.message
    (done,) = state.result()
    assert "error" in done["named"] and (ws.reports_dir / "discovery" / "v0004.json").exists()
    assert not (root / "incoming" / "discovered-v0004.npz").exists() and ws.tags()[-1] == version_tag(4)
    late = json.loads((ws.reports_dir / "discovery" / "v0004.json").read_text())["proposals"][0]
    answers = root / "answers.json"  # answered later, from the command line
    answers.write_text(json.dumps([{"proposal": late["number"], "decision": "accept", "name": "found-two"}]))
    argv = ["--params", PARAMS] + [f"-S{k}={json.dumps(v)}" for k, v in settings(root).items()]
    assert lhash([*argv, "name", "v0004", "--answers", str(answers)]) == 0
    assert len(load_batch(root / "incoming" / "discovered-v0004.npz")) == late["size"]
    answers.write_text(json.dumps([{"proposal": late["number"], "decision": "accept", "name": "found-one"}]))
    assert lhash([*argv, "name", "v0004", "--answers", str(answers)]) == 2  # a category of that name exists


@pytest.mark.unit
def test_an_answer_that_cannot_be_carried_out_is_refused_naming_the_proposal():
    report = {"proposals": [{"number": 0, "members": ["a", "b"]}, {"number": 1, "members": ["c"]}]}
    ok = named_groups(report, [ProposalAnswer(proposal=0, decision="accept", name="Night"),
                               ProposalAnswer(proposal=1, decision="merge", merge_into=0)], ("art",))
    assert ok == {"Night": ["a", "b", "c"]}
    for answers, words in [
        ([ProposalAnswer(proposal=0, decision="accept", name="ART")], "a category of that name exists already"),
        ([ProposalAnswer(proposal=0, decision="accept", name=" x")], "leading or trailing whitespace"),
        ([ProposalAnswer(proposal=1, decision="merge", merge_into=0)], "merge into 0, which is not accepted"),
        ([ProposalAnswer(proposal=7, decision="reject")], "proposals [7], which this run did not make"),
    ]:
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            named_groups(report, answers, ("art",))
