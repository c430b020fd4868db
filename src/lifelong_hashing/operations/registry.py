"""The pipeline's workspace: a git + DVC repository and its GTO model registry. Every version is
one commit, registered as the DVC artifact ``hashing-model`` (``artifacts:`` in ``dvc.yaml``)
with a SemVer tag, ``hashing-model@v1.N.0`` for version folder ``vN``: the minor is the version
number; the major names the code space every version shares (stored codes are never rewritten,
so each version is compatible with the codes before it). A recorded version is assigned the
stage ``staging`` (exported, parity and monitoring checks passed); promotion assigns ``prod``;
rollback assigns ``prod`` to an earlier version. ``gto show`` and ``gto history`` in the
workspace say what is where.

    <workspace>/
      dvc.yaml        a frozen ``increment`` stage whose outputs the flow records with ``dvc commit``
      dvc.lock        their hashes and the params used (git)
      params.yaml     the params of the last increment (git)
      manifest.json   content hashes of the batches already processed (git)
      metrics.json    stage×task matrices, average mAP, forgetting (git; ``dvc metrics``)
      plots/          mAP per task across stages (git; ``dvc plots show``)
      state/ models/versions/ batches/ reports/    DVC outputs, pushed to the remote
      .gto            the registry's stages (staging, prod)
      gx/             the data contract: GX's File Data Context, the suite batches meet (git)
      models/CURRENT  the served version: the service's fast local copy of the ``prod`` stage
                      (not versioned; promotion and rollback write it after assigning ``prod``)
      .work/ .lock    candidates being built, the ledger of attempts per batch
                      (``.work/attempts.json``), the journal of a recording in progress, the
                      space kept for a restore (``.work/reserve``) and the lock one run holds
                      (ignored)

A version is recorded only after every step succeeded; until then the candidate lives in
``.work/``. Recording is a transaction: ``begin`` checks the disk has room for it and writes a
journal, ``record`` makes the DVC commit, push, git commit, registration and ``staging``, ``finish``
removes the journal. A failure in between calls ``restore``; a run killed in between leaves the journal (or
uncommitted changes), and the next run's ``recover`` finishes the version (its commit was made,
only its registration is missing) or undoes it, before anything reads the workspace. Nothing trusts an
uncommitted file.
"""

from __future__ import annotations

import errno
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
from lifelong_hashing.files import write_json, write_text
from lifelong_hashing.inference.versions import (
    VersionError,
    check_servable,
    list_versions,
    point_serving_at,
    version_name,
    version_number,
    versions_dir,
)
from lifelong_hashing.operations.data_contract import CONTEXT_DIR
from lifelong_hashing.operations.monitoring import stage_report_name


def _import_gto_without_its_logging_setup() -> None:
    """Import GTO (DVC's artifact calls import it too) with its import-time logging set-up cut to
    its own logger. ``gto.log`` calls ``logging.config.dictConfig``, which flushes and closes every
    handler the process already has: inside a Prefect flow run, Prefect's API log handler then
    waits for its queue to reach the server, seconds of every pipeline run
    (bench/results/run_budget.json), and the run's handlers are closed under it."""
    import logging
    import logging.config

    if "gto" in sys.modules:
        return
    configure = logging.config.dictConfig
    logging.config.dictConfig = lambda config: logging.getLogger("gto").setLevel(config["loggers"]["gto"]["level"])
    try:
        import gto  # noqa: F401
    finally:
        logging.config.dictConfig = configure


_import_gto_without_its_logging_setup()

OUTPUTS = ("state", "models/versions", "batches", "reports")
ARTIFACT = "hashing-model"
STAGES = ("staging", "prod")
TAG = re.compile(rf"^{ARTIFACT}@v1\.(\d+)\.0$")
_VERSION_TEXT = re.compile(r"^(?:hashing-model@)?v1\.(\d+)\.0$")
STAGE = "increment"
# Kept free for ``restore`` (removed first, so git and DVC can write on a full disk)
RESERVE_BYTES = 64 << 20


def semver(number: int) -> str:
    """The registry's version of version folder ``v{number:04d}``."""
    return f"v1.{number}.0"


def version_tag(number: int) -> str:
    """The GTO tag that registers version ``number`` in the workspace."""
    return f"{ARTIFACT}@{semver(number)}"


def parse_version(text: str) -> int:
    """A version as people write it (``v0003``, ``v1.3.0`` or ``hashing-model@v1.3.0``): its number."""
    match = _VERSION_TEXT.match(text)
    if match:
        return int(match.group(1))
    try:
        return version_number(text)
    except VersionError:
        raise RegistryError(f"{text!r} is not a version: v0003, v1.3.0 or {ARTIFACT}@v1.3.0") from None


_DVC_YAML = {
    "artifacts": {ARTIFACT: {"path": "models/versions", "type": "model", "labels": ["cross-modal-hashing"],
                             "desc": "ONNX encoders and codes; registry version v1.N.0 is the folder vN there"}},
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
        raise RegistryError(f"`{' '.join(args[2:] if args[0] == sys.executable else args)}` failed in {cwd}: "
                            f"{tool_error_line(proc.stderr or proc.stdout) or f'exit {proc.returncode}'}")
    return proc.stdout


def tool_error_line(output: str) -> str:
    """The line of a tool's output that says what went wrong: DVC's last ``ERROR:`` line (its
    closing advertisement for support is not it), else the last line."""
    lines = [line.strip() for line in output.splitlines()
             if line.strip() and "Having any troubles?" not in line]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or [""])[-1]


def write_task_lines_template(repo: Path) -> None:
    target = repo / ".dvc" / "plots" / "task_lines.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, TASK_LINES_TEMPLATE)


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
    def contract_dir(self) -> Path:
        """The data contract: Great Expectations' File Data Context (``operations.data_contract``)."""
        return self.root / CONTEXT_DIR

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
    def journal_path(self) -> Path:
        """The recording in progress (``begin`` to ``finish``): what ``recover`` completes or undoes."""
        return self.work_dir / "recording.json"

    @property
    def reserve_path(self) -> Path:
        return self.work_dir / "reserve"

    @property
    def pinned_dir(self) -> Path:
        """Copies of the batches a run is working on: it reads these, never the incoming files."""
        return self.work_dir / "pinned"

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
        """A DVC command, not quiet: with ``-q`` DVC does not say why it failed."""
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
        self.keep_reserve()

    def keep_reserve(self) -> None:
        """Hold ``RESERVE_BYTES`` of the disk in ``.work/reserve`` (if they are free), so that a
        restore on a full disk can release them first and still write."""
        reserve = self.reserve_path
        if reserve.exists() and reserve.stat().st_size >= RESERVE_BYTES:
            return
        reserve.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(reserve, "wb") as fh:
                os.posix_fallocate(fh.fileno(), 0, RESERVE_BYTES)
        except OSError:
            reserve.unlink(missing_ok=True)  # no room now: the next run tries again

    def _create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / ".git").exists():
            self.git("init", "-q", "-b", "main")
        self.git("config", "user.name", "lifelong-hashing pipeline")
        self.git("config", "user.email", "pipeline@lifelong-hashing.invalid")
        self.dvc("init", "-q")
        self.dvc("config", "core.analytics", "false")
        write_task_lines_template(self.root)
        write_text(self.root / "dvc.yaml", yaml.safe_dump(_DVC_YAML, sort_keys=False, allow_unicode=True))
        write_text(self.root / ".gitignore", "\n".join(_IGNORED) + "\n")
        write_text(self.root / ".gto", yaml.safe_dump({"stages": list(STAGES), "types": ["model"]}))
        write_json(self.manifest_path, {"batches": {}})
        self.git("add", "-A")
        self.git("commit", "-q", "-m", "Pipeline workspace")

    def tags(self) -> list[str]:
        """The registration tags of every recorded version, oldest first."""
        names = [t for t in self.git("tag", "--list", f"{ARTIFACT}@*").split() if TAG.match(t)]
        return sorted(names, key=lambda t: int(TAG.match(t).group(1)))

    def next_number(self) -> int:
        """Version numbers never repeat, even after a rollback removed later versions' folders."""
        tagged = [int(TAG.match(t).group(1)) for t in self.tags()]
        on_disk = [version_number(name) for name in list_versions(self.models_dir)]
        return max(tagged + on_disk, default=0) + 1

    def begin(self, number: int, need_bytes: int) -> None:
        """Open the recording of version ``number``: refuse it, changing nothing, when the disk
        has less room than it needs (``need_bytes`` of new files, which the DVC cache and a
        local remote on the same disk copy again); else write the journal ``recover`` reads."""
        copies = 3 if self._remote_shares_disk() else 2
        free = shutil.disk_usage(self.root).free
        if free < copies * need_bytes + RESERVE_BYTES:
            raise OSError(errno.ENOSPC, f"{self.root}: {free:,} bytes free, recording version {number} needs about "
                                        f"{copies * need_bytes + RESERVE_BYTES:,}; nothing was changed")
        head = self.git("rev-parse", "HEAD").strip()
        write_json(self.journal_path, {"number": number, "tag": version_tag(number), "head": head})

    def record(self, number: int, message: str, push_retries: int) -> str:
        """Record the outputs now in place as version ``number``: ``dvc commit``, push the data,
        then commit in git, register the commit and assign it ``staging``. Returns the registration tag."""
        self.dvc("commit", "-f", STAGE)
        self.push(push_retries)
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.register(number)

    def finish(self) -> None:
        """Close the recording: the version is complete."""
        self.journal_path.unlink(missing_ok=True)

    def push(self, retries: int) -> None:
        """``dvc push``, retried: a remote can be briefly unreachable. A failed push leaves
        partial uploads in a folder remote; they are removed."""
        for attempt in range(retries + 1):
            try:
                self.dvc("push")
                return
            except RegistryError:
                self.clean_remote()
                if attempt == retries:
                    raise
                time.sleep(2**attempt)

    def clean_remote(self) -> int:
        """Remove the partial uploads (``*.tmp``, DVC's names for files in transit) a killed or
        failed push left in a folder remote; how many. Other remotes clean up themselves."""
        folder = Path(self.remote)
        if "://" in self.remote or not folder.is_dir():
            return 0
        partial = list(folder.rglob("*.tmp"))
        for path in partial:
            path.unlink(missing_ok=True)
        return len(partial)

    def restore(self) -> None:
        """Put the last committed version back: tracked files from git, outputs from the DVC cache;
        anything a failed run left behind goes. The reserve is released first, so this works on a
        full disk; it is taken again when there is room."""
        self.reserve_path.unlink(missing_ok=True)
        self._remove_stale_git_locks()
        self.git("reset", "-q", "--hard", "HEAD")
        self.git("clean", "-fdq")
        if (self.root / "dvc.lock").exists():
            self.dvc("checkout", "--force")
        self.clear_work()
        self.keep_reserve()

    def clear_work(self, keep_pinned: bool = True) -> None:
        """Remove what runs built in ``.work/``: candidates, and with ``keep_pinned=False`` the
        pinned batch copies (a run's own are still needed after a restore). The attempt ledger,
        the reserve and the journal stay."""
        kept = {"attempts.json", "reserve", self.journal_path.name} | ({"pinned"} if keep_pinned else set())
        for left in self.work_dir.glob("*"):
            if left.name in kept:
                continue
            if left.is_dir() and not left.is_symlink():
                shutil.rmtree(left, ignore_errors=True)
            else:
                left.unlink(missing_ok=True)

    def recover(self) -> str | None:
        """Finish or undo what a run that was killed left behind; called with the lock held,
        before anything reads the workspace. A version whose git commit was made is finished
        (registered and in ``staging``); anything less (a journal without that commit, or uncommitted changes to
        tracked files or DVC outputs) is undone. Returns what was done, or None."""
        if not (self.root / ".git").exists():
            return None
        self._remove_stale_git_locks()
        removed = self.clean_remote()
        done = None
        journal = json.loads(self.journal_path.read_text()) if self.journal_path.exists() else None
        if journal and journal["tag"] not in self.tags():
            head = self.git("rev-parse", "HEAD").strip()
            parent = self.git("rev-parse", "HEAD~1").strip() if head != journal["head"] else None
            if parent == journal["head"]:  # the commit holds the whole version (pushed before it)
                if self.uncommitted():
                    self.restore()
                self.register(journal["number"])
                done = f"finished recording {journal['tag']} (committed; the registration was missing)"
            else:
                self.restore()
                done = f"undid the unfinished recording of {journal['tag']}"
        elif journal and not self.was_in_stage(journal["number"], "staging"):
            self.assign(journal["number"], "staging")
            done = f"finished recording {journal['tag']} (registered; staging was missing)"
        elif self.uncommitted():
            self.restore()
            done = "undid uncommitted changes (a run stopped before recording)"
        self.finish()
        if removed:
            done = (done + "; " if done else "") + f"removed {removed} partial uploads from the remote"
        return done

    def uncommitted(self) -> bool:
        """Tracked files or DVC outputs differ from the last commit."""
        if self.git("status", "--porcelain").strip():
            return True
        return (self.root / "dvc.lock").exists() and json.loads(self.dvc("status", "--json") or "{}") != {}

    def _remove_stale_git_locks(self) -> None:
        """A git command killed midway leaves ``*.lock`` files that fail every later one. The
        pipeline's lock is held, so no git command of ours is running here."""
        git_dir = self.root / ".git"
        for lock in [git_dir / "index.lock", git_dir / "HEAD.lock", *git_dir.glob("refs/**/*.lock")]:
            lock.unlink(missing_ok=True)

    def _remote_shares_disk(self) -> bool:
        if "://" in self.remote:
            return False
        folder = Path(self.remote)
        while not folder.exists():
            folder = folder.parent
        return folder.stat().st_dev == self.root.stat().st_dev

    # ---- the model registry (GTO) -------------------------------------------------------------
    def register(self, number: int) -> str:
        """Register HEAD as version ``number`` and assign it ``staging`` (it was exported and
        passed its checks before it was committed). Returns the registration tag."""
        from gto.api import register

        register(self.root, ARTIFACT, "HEAD", version=semver(number), message=f"Version {version_name(number)}")
        self.assign(number, "staging")
        return version_tag(number)

    def assign(self, number: int, stage: str) -> None:
        """Put version ``number`` in ``stage`` (a no-op when it is there already). GTO orders a
        stage's assignments by their tags' time, in whole seconds: a new one waits for the next
        second, so the latest assignment is never ambiguous."""
        from gto.api import assign

        if self.in_stage(stage) == number:
            return
        times = self.git("for-each-ref", "--format=%(creatordate:unix)", f"refs/tags/{ARTIFACT}#{stage}#*").split()
        wait = max(map(int, times), default=0) + 1 - time.time()
        if wait > 0:
            time.sleep(wait)
        assign(self.root, ARTIFACT, stage, version=semver(number), force=True,
               message=f"{version_name(number)} to {stage}")

    def in_stage(self, stage: str) -> int | None:
        """The version the registry has in ``stage`` (``dvc.api.artifacts_show``), or None."""
        from dvc.api import artifacts_show
        from dvc.exceptions import ArtifactNotFoundError

        try:
            rev = artifacts_show(ARTIFACT, stage=stage, repo=str(self.root))["rev"]
        except ArtifactNotFoundError:
            return None
        return self.version_at(rev)

    def version_at(self, rev: str) -> int | None:
        """The version registered at commit ``rev``, or None (a rollback commit registers none)."""
        names = [t for t in self.git("tag", "--points-at", rev, "--list", f"{ARTIFACT}@*").split() if TAG.match(t)]
        return int(TAG.match(names[0]).group(1)) if names else None

    def was_in_stage(self, number: int, stage: str) -> bool:
        """Whether version ``number`` was ever assigned ``stage``: a stage tag on its commit (the
        version tag is an annotated tag, so it is peeled to the commit first)."""
        commit = f"{version_tag(number)}^{{commit}}"
        return bool(self.git("tag", "--points-at", commit, "--list", f"{ARTIFACT}#{stage}#*").split())

    def serve(self, number: int) -> str:
        """Assign ``prod`` to version ``number`` and point serving at it, once it loads as the
        service loads it (a version that cannot serve is refused, and nothing moves). Returns
        the version folder's name."""
        name = version_name(number)
        check_servable(self.models_dir, name)
        self.assign(number, "prod")
        point_serving_at(self.models_dir, name)
        return name

    def rollback(self, version: str) -> str:
        """Make ``version``'s model, code store and history the current ones again, as a new
        commit (history is kept, and the next increment builds on it), and put it back in
        ``prod``. Returns the version name now served."""
        if not (self.root / ".git").exists():
            raise RegistryError(f"{self.root}: no pipeline workspace yet (the first pipeline run creates it)")
        number = parse_version(version)
        tag = version_tag(number)
        if tag not in self.tags():
            raise RegistryError(f"{self.root}: no version {version!r} in the registry (have "
                                f"{[version_name(int(TAG.match(t).group(1))) for t in self.tags()]})")
        if self.git("status", "--porcelain", "--untracked-files=no").strip():
            raise RegistryError(f"{self.root}: uncommitted changes; refusing to roll back over them")
        self.git("checkout", tag, "--", ".")
        try:
            self.dvc("checkout", "--force")
        except RegistryError:
            self.dvc("pull", "--force")  # cache cleared: fetch from the remote
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", f"Roll back to {version_name(number)} ({semver(number)})")
        return self.serve(number)
