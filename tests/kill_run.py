"""One pipeline run that kills itself with SIGKILL at a chosen point: the crash test's harness.

    python tests/kill_run.py POINT [flows.pipeline arguments]

POINT is ``after:<step>`` (a step of ``operations.pipeline`` or ``Registry.begin`` returned),
``before:<step>`` (also ``point_serving_at``: the pointer write after ``prod`` was assigned),
``after:gto <register|assign>`` (GTO wrote the tag: it writes through its own git library, not
a subprocess), ``after:<tool> <command>`` (``git commit``, ``dvc push``, ...: the command
finished) or ``inside:<tool> <command>:<seconds>`` (that many seconds into the command). The
whole process group dies at once, the flow and its git and DVC children, as when a machine loses
power or an operator kills the run: nothing gets to clean up. Exits normally (status 0 or 1)
only when the point was never reached.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading

import gto.api

from flows.pipeline import main
from lifelong_hashing.operations import pipeline, registry


def die() -> None:
    os.killpg(0, signal.SIGKILL)


def at_step(when: str, owner, name: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        if when == "before":
            die()
        result = original(*args, **kwargs)
        die()
        return result

    setattr(owner, name, wrapped)


def at_tool(when: str, command: str, delay: float) -> None:
    original, words = registry.run_tool, command.split()

    def wrapped(args: list[str], cwd):
        named = ["dvc", *args[3:]] if args[:3] == [sys.executable, "-m", "dvc"] else args
        if named[: len(words)] == words:
            if when == "inside":
                threading.Timer(delay, die).start()
            else:
                original(args, cwd)
                die()
        return original(args, cwd)

    registry.run_tool = wrapped


def install(point: str) -> None:
    when, _, what = point.partition(":")
    if what.split()[0] in ("git", "dvc"):
        command, _, delay = what.partition(":")
        at_tool(when, command, float(delay or 0))
    elif what.startswith("gto "):
        at_step(when, gto.api, what.split()[1])
    elif what == "begin":
        at_step(when, registry.Registry, "begin")
    elif what == "point_serving_at":
        at_step(when, registry, what)
    else:
        at_step(when, pipeline, what)


if __name__ == "__main__":
    os.setpgid(0, 0)  # a group of its own: the kill takes the children along, not the test
    install(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
