"""Noticing arrivals as they happen: a file closed after writing, or renamed into a watched
folder (the way an upload finishes), is an arrival once ``pipeline.not_an_arrival`` lets it
through, the same rule the scan applies. Hidden names (partial uploads) and other files are
ignored. ``flows/watch.py`` turns each arrival into a Prefect event that starts the deployment.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileClosedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from lifelong_hashing.operations.pipeline import not_an_arrival

OnArrival = Callable[[Path, str], None]  # the file, and the kind of folder it arrived in


class _Arrivals(FileSystemEventHandler):
    def __init__(self, folders: dict[Path, tuple[str, str]], on_arrival: OnArrival):
        self.folders, self.on_arrival = folders, on_arrival

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileMovedEvent):
            path = Path(str(event.dest_path))
        elif isinstance(event, FileClosedEvent):
            path = Path(str(event.src_path))
        else:
            return
        watched = self.folders.get(path.parent)
        if watched is not None and not_an_arrival(path, *watched) is None:
            self.on_arrival(path, watched[1])


def watch(folders: dict[Path, tuple[str, str]], on_arrival: OnArrival) -> Observer:
    """Start watching ``folders`` (each folder: its file suffix and the kind of file it takes,
    e.g. ``(".npz", "batch file")``); ``on_arrival(path, kind)`` is called from the observer's
    thread for every arrival. Returns the started observer (``stop()`` and ``join()`` it)."""
    resolved = {}
    for folder, watched in folders.items():
        folder = Path(folder).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        resolved[folder] = watched
    observer = Observer()
    handler = _Arrivals(resolved, on_arrival)
    for folder in resolved:
        observer.schedule(handler, str(folder), recursive=False)
    observer.start()
    return observer


def waiting(folders: dict[Path, tuple[str, str]]) -> list[Path]:
    """Arrivals already in ``folders`` (a watcher that starts finds what came while it was down)."""
    return sorted(entry for folder, watched in folders.items() if Path(folder).is_dir()
                  for entry in Path(folder).iterdir() if not_an_arrival(entry, *watched) is None)
