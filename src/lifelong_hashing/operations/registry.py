"""The pipeline's workspace: a git + DVC repository in which every promoted model is one commit
tagged ``model-vN``.

    <workspace>/
      dvc.yaml        a frozen ``increment`` stage whose outputs the flow records with ``dvc commit``
      dvc.lock        their hashes and the params used (git)
      params.yaml     the params of the last increment (git)
      manifest.json   content hashes of the batches already processed (git)
      metrics.json    stage×task matrices, average mAP, forgetting (git; ``dvc metrics``)
      plots/          mAP per task across stages (git; ``dvc plots show``)
      state/ models/versions/ batches/ reports/    DVC outputs, pushed to the remote
      models/CURRENT  the served version (not versioned: promotion and rollback move it)
      .work/ .lock    candidates being built, the ledger of failed attempts per batch
                      (``.work/attempts.json``) and the lock one run holds (ignored)

A version is recorded only after every step succeeded; until then the candidate lives in
``.work/``, and ``restore`` puts the last committed version back if recording fails halfway.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from filelock import FileLock, Timeout

from lifelong_hashing.config import Params
from lifelong_hashing.engine.metrics import DIRECTIONS
from lifelong_hashing.inference.versions import list_versions, promote, version_name, version_number, versions_dir
from lifelong_hashing.operations.monitoring import stage_report_name

OUTPUTS = ("state", "models/versions", "batches", "reports")
TAG = re.compile(r"^model-v(\d+)$")


def version_tag(number: int) -> str:
    """The git tag of version ``number`` in the workspace."""
    return f"model-v{number}"
STAGE = "increment"

_DVC_YAML = {
    "stages": {STAGE: {
        "cmd": "python -m flows.pipeline",
        "frozen": True,  # the Prefect flow runs the increment; `dvc commit` records it
        "params": [{"params.yaml": None}],
        "outs": list(OUTPUTS),
        "metrics": [{"metrics.json": {"cache": False}}],
    }},
    "plots": [{f"mAP per task, {name}": {"template": "task_lines", "x": "stage",
                                         "y": {f"plots/map_{direction}.csv": "map"}}}
              for direction, name in ((key, d.name) for key, d in DIRECTIONS.items())],
}
_IGNORED = ["/.work/", "/.lock", "/models/CURRENT", "/models/.CURRENT.*"]
# A Vega-Lite line per task (DVC's built-in templates colour by revision only).
TASK_LINES_TEMPLATE = {
    "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
    "data": {"values": "<DVC_METRIC_DATA>"},
    "title": "<DVC_METRIC_TITLE>",
    "width": 400, "height": 300,
    "mark": {"type": "line", "point": True, "tooltip": {"content": "data"}},
    "encoding": {
        "x": {"field": "<DVC_METRIC_X>", "type": "ordinal", "title": "stage"},
        "y": {"field": "<DVC_METRIC_Y>", "type": "quantitative", "title": "mAP", "scale": {"zero": False}},
        "color": {"field": "task", "type": "nominal"},
        "strokeDash": {"field": "rev", "type": "nominal"},
    },
}


class RegistryError(RuntimeError):
    pass


class RegistryBusy(RegistryError):
    pass


def run_tool(args: list[str], cwd: Path) -> str:
    """git or DVC in ``cwd``; a failure raises with the tool's own message."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RegistryError(f"`{' '.join(args[2:] if args[0] == sys.executable else args)}` failed in {cwd}: "
                            f"{detail[-1] if detail else f'exit {proc.returncode}'}")
    return proc.stdout


def write_task_lines_template(repo: Path) -> None:
    target = repo / ".dvc" / "plots" / "task_lines.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(TASK_LINES_TEMPLATE, indent=2) + "\n")


@dataclass(frozen=True)
class Registry:
    root: Path
    remote: str  # a folder (created on first use) or any DVC remote URL

    @staticmethod
    def from_params(params: Params) -> Registry:
        remote = params.pipeline.remote
        if "://" not in remote:
            remote = str(Path(remote).resolve())
        return Registry(Path(params.pipeline.workspace).resolve(), remote)

    # ---- layout -----------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def batches_dir(self) -> Path:
        return self.root / "batches"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def work_dir(self) -> Path:
        return self.root / ".work"

    @property
    def versions_dir(self) -> Path:
        return versions_dir(self.models_dir)

    def batch_work_dir(self, key: str) -> Path:
        """Where one batch's candidate is built until it is recorded."""
        return self.work_dir / key

    def validation_reports_dir(self, key: str) -> Path:
        return self.reports_dir / "validation" / key

    def monitoring_report_dir(self, stage: int) -> Path:
        return self.reports_dir / "monitoring" / stage_report_name(stage)

    @property
    def evidently_workspace(self) -> Path:
        return self.reports_dir / "workspace"

    @property
    def attempts_path(self) -> Path:
        """Failed attempts per batch content hash: kept across runs, and by ``restore``."""
        return self.work_dir / "attempts.json"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    # ---- tools ------------------------------------------------------------------------------
    def git(self, *args: str) -> str:
        return run_tool(["git", *args], self.root)

    def dvc(self, *args: str) -> str:
        return run_tool([sys.executable, "-m", "dvc", *args], self.root)

    def lock(self, timeout: float) -> FileLock:
        """Held for a whole run: a second run waits up to ``timeout`` seconds, then fails clearly."""
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / ".lock", timeout=timeout)

    def acquire(self, timeout: float) -> FileLock:
        lock = self.lock(timeout)
        try:
            lock.acquire()
        except Timeout as err:
            raise RegistryBusy(f"{self.root} is busy: another pipeline run held it for {timeout:g} s") from err
        return lock

    # ---- lifecycle --------------------------------------------------------------------------
    def init(self) -> None:
        """Create the repository and its DVC project on first use, and point it at the remote
        (kept in ``.dvc/config.local``: where the data goes is the machine's business, not git's)."""
        if not ((self.root / ".dvc").is_dir() and (self.root / ".git").exists()):
            self._create()
        self.dvc("remote", "add", "--local", "-d", "-f", "storage", self.remote)

    def _create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / ".git").exists():
            self.git("init", "-q", "-b", "main")
        self.git("config", "user.name", "lifelong-hashing pipeline")
        self.git("config", "user.email", "pipeline@lifelong-hashing.invalid")
        self.dvc("init", "-q")
        self.dvc("config", "core.analytics", "false")
        write_task_lines_template(self.root)
        (self.root / "dvc.yaml").write_text(yaml.safe_dump(_DVC_YAML, sort_keys=False, allow_unicode=True))
        (self.root / ".gitignore").write_text("\n".join(_IGNORED) + "\n")
        self.manifest_path.write_text(json.dumps({"batches": {}}, indent=2) + "\n")
        self.git("add", "-A")
        self.git("commit", "-q", "-m", "Pipeline workspace")

    def tags(self) -> list[str]:
        names = [t for t in self.git("tag", "--list", "model-v*").split() if TAG.match(t)]
        return sorted(names, key=lambda t: int(TAG.match(t).group(1)))

    def next_number(self) -> int:
        """Version numbers never repeat, even after a rollback removed later versions' folders."""
        tagged = [int(TAG.match(t).group(1)) for t in self.tags()]
        on_disk = [version_number(name) for name in list_versions(self.models_dir)]
        return max(tagged + on_disk, default=0) + 1

    def record(self, number: int, message: str, push_retries: int) -> str:
        """Record the outputs now in place as version ``number``: ``dvc commit``, push the data,
        then commit and tag in git. Returns the tag."""
        tag = version_tag(number)
        self.dvc("commit", "-f", "-q", STAGE)
        self.push(push_retries)
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        self.git("tag", tag)
        return tag

    def push(self, retries: int) -> None:
        """``dvc push``, retried: a remote can be briefly unreachable."""
        for attempt in range(retries + 1):
            try:
                self.dvc("push", "-q")
                return
            except RegistryError:
                if attempt == retries:
                    raise
                time.sleep(2**attempt)

    def restore(self) -> None:
        """Put the last committed version back: tracked files from git, outputs from the DVC cache;
        anything a failed run left behind goes."""
        self.git("reset", "-q", "--hard", "HEAD")
        self.git("clean", "-fdq")
        if (self.root / "dvc.lock").exists():
            self.dvc("checkout", "--force", "-q")
        for left in self.work_dir.glob("*"):
            if left != self.attempts_path:
                shutil.rmtree(left, ignore_errors=True)

    def rollback(self, tag: str) -> str:
        """Make ``tag``'s version the current one, as a new commit (history is kept), and serve it.
        Returns the version name now served."""
        if not (self.root / ".git").exists():
            raise RegistryError(f"{self.root}: no pipeline workspace yet (the first pipeline run creates it)")
        match = TAG.match(tag)
        if not match or tag not in self.tags():
            raise RegistryError(f"{self.root}: no version tag {tag!r} (have {self.tags()})")
        if self.git("status", "--porcelain", "--untracked-files=no").strip():
            raise RegistryError(f"{self.root}: uncommitted changes; refusing to roll back over them")
        self.git("checkout", tag, "--", ".")
        try:
            self.dvc("checkout", "--force", "-q")
        except RegistryError:
            self.dvc("pull", "--force", "-q")  # cache cleared: fetch from the remote
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", f"Roll back to {tag}")
        name = version_name(int(match.group(1)))
        promote(self.models_dir, name)
        return name
