"""Checkpoints in object storage (ckpt.remote): uploaded in the background, downloaded where the
run directory lacks them.

The bucket holds each checkpoint under its local name (`step_N.pt`, or `step_N/...` for a
strategy's directory) and `index.json`, the one record of what is there:

    {"format": 1, "complete": {NAME: {"step": N, "files": {OBJECT: [bytes, sha256]}}},
     "best": NAME | null, "uploading": {"name": NAME, "files": [OBJECT, ...]} | null,
     "stale": [OBJECT, ...]}

A checkpoint is complete only once the index written after its last object names it: an upload
cut short (the job killed) leaves its name under "uploading", which the next job reports and
deletes. keep-k and best apply as they do locally: the newest `keep` complete checkpoints stay,
and the best one besides.

One upload is in flight at a time, from a snapshot of hard links (the local keep-k may prune or
replace the checkpoint meanwhile); a checkpoint saved while one uploads waits for it, and a newer
one supersedes a waiting one (the best is kept waiting too): the training loop never waits for
the network, and the bucket gets the newest checkpoint as soon as the link allows.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distnn import faults, fsio, storage
from distnn.checkpoint_files import NAME, step_of
from distnn.errors import UserError, reason

INDEX = "index.json"
STAGING = ".upload"


def marker(path: Path) -> Path:
    """Beside a checkpoint downloaded from the bucket: it is not the run's own file (the safe
    loader's rules apply to it, whichever process lists it later)."""
    return path.with_name(f".{path.name}.remote")


def empty_index() -> dict[str, Any]:
    return {"format": 1, "complete": {}, "best": None, "uploading": None, "stale": []}


def read_index(remote: storage.Remote) -> dict[str, Any]:
    """The bucket's index; an empty one where there is none yet."""
    url = storage.shown(remote.url(INDEX))
    try:
        index = json.loads(remote.read(INDEX))
    except FileNotFoundError:
        return empty_index()
    except storage.PERMANENT as e:
        raise UserError(f"cannot read {url} (ckpt.remote): {reason(e)}") from None
    except ValueError as e:
        raise UserError(f"{url} is not JSON: {e}") from None
    if not isinstance(index, dict) or index.get("format") != 1:
        raise UserError(
            f"{storage.shown(remote.url(INDEX))} is not a distnn checkpoint index (format 1)"
        )
    return {**empty_index(), **index}


def _files(path: Path) -> list[tuple[str, Path]]:
    """(object name, local file) of a checkpoint file or directory, in name order."""
    if path.is_file():
        return [(path.name, path)]
    return sorted(
        (f"{path.name}/{p.relative_to(path).as_posix()}", p) for p in path.rglob("*") if p.is_file()
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(storage.remote.CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _link_copy(path: Path, into: Path) -> Path:
    """`path` (a file or directory) as hard links in `into`: a snapshot that costs no copy."""
    into.mkdir(parents=True)
    out = into / path.name
    if path.is_dir():
        shutil.copytree(path, out, copy_function=os.link)
    else:
        os.link(path, out)
    return out


@dataclass
class Upload:
    name: str
    step: int
    snapshot: Path  # hard links, in a directory of its own under STAGING
    best: bool


class Mirror:
    """Rank 0's uploader: a thread with at most one upload in flight."""

    def __init__(self, remote: storage.Remote, local_dir: Path, keep: int, index: dict) -> None:
        self.remote, self.keep, self.index = remote, keep, index
        self.staging = local_dir / STAGING
        fsio.remove(self.staging)  # snapshots of a job that was killed
        self.fault = faults.from_env()
        self.deletes = True  # until the store says it cannot (HTTP)
        self.failed: str | None = None  # the last upload, if it gave up: why
        self._waiting: dict[str, Upload] = {}  # "best" (older), "latest"
        self._busy: Upload | None = None
        self._closing = False
        self._count = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="distnn-ckpt-upload", daemon=True)
        self._thread.start()

    def submit(self, path: Path, best: bool) -> None:
        self._count += 1
        try:
            snapshot = _link_copy(path, self.staging / str(self._count))
        except OSError as e:  # the local checkpoint is intact; the next one tries again
            _warn(f"checkpoint {path.name} is not uploaded: cannot snapshot it: {reason(e)}")
            return
        upload = Upload(path.name, step_of(path.name), snapshot, best)
        with self._cond:
            older = self._waiting.pop("latest", None)
            if upload.best:
                self._drop(self._waiting.pop("best", None))
            elif older is not None and older.best:
                self._drop(self._waiting.pop("best", None))
                self._waiting["best"], older = older, None
            self._drop(older)
            self._waiting["latest"] = upload
            self._cond.notify_all()

    def pending(self) -> list[str]:
        """The checkpoints not in the bucket yet, in flight first."""
        with self._cond:
            return [u.name for u in (self._busy, *self._waiting.values()) if u is not None]

    def wait(self, timeout: float | None = None) -> bool:
        """Whether every submitted checkpoint went (uploaded, or given up) within `timeout`."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (self._busy is None and not self._waiting) or not self._thread.is_alive(),
                timeout,
            )

    def close(self) -> None:
        """The upload in flight and those waiting finish first."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        fsio.remove(self.staging)

    def _drop(self, upload: Upload | None) -> None:
        if upload is not None:
            fsio.remove(upload.snapshot.parent)

    def _run(self) -> None:
        self._clean()  # what forget() marked: the index already says so
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._closing)
                if not self._waiting:
                    return
                upload = self._waiting.pop("best", None) or self._waiting.pop("latest")
                self._busy = upload
            try:
                self._upload(upload)
                self.failed = None
            except Exception as e:  # the next checkpoint tries again; the local one is intact
                self.failed = f"checkpoint {upload.name} was not uploaded: {reason(e)}"
                _warn(f"{self.failed} ({storage.shown(self.remote.root)})")
                cut = self.index["uploading"]
                if cut is not None:  # what arrived of it goes with the next clean
                    self.index["stale"] += cut["files"]
                    self.index["uploading"] = None
            finally:
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()
                with contextlib.suppress(OSError):
                    self._drop(upload)

    def _upload(self, upload: Upload) -> None:
        start = time.monotonic()
        files = _files(upload.snapshot)
        self.index["complete"].pop(upload.name, None)  # the same step saved again
        names = [name for name, _ in files]
        # Objects of an earlier attempt at this name, not yet deleted: these are wanted again.
        self.index["stale"] = [o for o in self.index["stale"] if o not in names]
        self.index["uploading"] = {"name": upload.name, "files": names}
        self._write_index()
        done = {}
        for name, path in files:
            done[name] = [path.stat().st_size, _sha256(path)]
            self.remote.put(path, name)
            if self.fault is not None:
                self.fault.check(upload.step, 0, "upload")
        self.index["complete"][upload.name] = {"step": upload.step, "files": done}
        self.index["uploading"] = None
        if upload.best:
            self.index["best"] = upload.name
        self._prune()
        self._write_index()
        self._clean()
        size = sum(n for n, _ in done.values())
        print(
            f"checkpoint {upload.name} uploaded to {storage.shown(self.remote.root)} "
            f"({size / 2**20:.1f} MiB in {time.monotonic() - start:.1f} s)",
            flush=True,
        )

    def _prune(self) -> None:
        """keep-k in the bucket: the newest `keep` complete checkpoints and the best stay."""
        complete = self.index["complete"]
        newest = sorted(complete, key=lambda n: complete[n]["step"])[-self.keep :]
        for name in [n for n in complete if n not in newest and n != self.index["best"]]:
            gone = list(complete.pop(name)["files"])
            if self.deletes:
                self.index["stale"] += gone

    def _clean(self) -> None:
        """Delete what the index no longer names (the index went first: a kill in between
        leaves objects the next clean deletes, never an index naming deleted ones)."""
        stale = self.index["stale"]
        if not stale:
            return
        try:
            while stale:
                self.remote.remove(stale[0])
                stale.pop(0)
            self._write_index()
        except NotImplementedError:
            _warn(
                f"{storage.shown(self.remote.root)} deletes nothing: superseded checkpoints "
                "stay there, unnamed by its index (ckpt.keep applies where the store deletes)"
            )
            self.deletes = False
            stale.clear()
            with contextlib.suppress(Exception):  # else written with the next upload
                self._write_index()
        except Exception as e:  # tried again after the next upload
            _warn(f"cannot delete superseded checkpoint objects yet: {reason(e)}")

    def _write_index(self) -> None:
        write_index(self.remote, self.index)


def write_index(remote: storage.Remote, index: dict[str, Any]) -> None:
    remote.write(INDEX, (json.dumps(index, indent=1) + "\n").encode())


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def forget(index: dict[str, Any], after: int) -> list[str]:
    """What a run continuing from step `after` will not continue from, moved to the index's
    stale list (a cut-short upload too): their names."""
    gone = [n for n, c in index["complete"].items() if c["step"] > after]
    for name in gone:
        index["stale"] += list(index["complete"].pop(name)["files"])
    if index["uploading"] is not None:
        gone.append(index["uploading"]["name"])
        index["stale"] += index["uploading"]["files"]
        index["uploading"] = None
    if index["best"] not in index["complete"]:
        index["best"] = None
    return gone


def newest(index: dict[str, Any]) -> str | None:
    complete = index["complete"]
    return max(complete, key=lambda n: complete[n]["step"], default=None)


def download(remote: storage.Remote, index: dict[str, Any], name: str, into: Path) -> Path:
    """The complete checkpoint `name` at `into`/name, each file checked against the index's
    size and sha256, published by a rename; once per run directory whichever process of the
    node (or of the nodes sharing it) asks first."""
    files = index["complete"][name]["files"]
    _check_names(remote, name, files)
    into.mkdir(parents=True, exist_ok=True)
    path = into / name
    fd = os.open(into / ".download.lock", os.O_RDWR | os.O_CREAT | fsio.NOFOLLOW, 0o600)
    with fsio.lock_held(fd):
        fcntl.flock(fd, fcntl.LOCK_EX)
        if marker(path).exists() and path.exists():  # another process fetched it meanwhile
            return path
        tmp = fsio.temp_path(path)
        try:
            for obj, (size, sha256) in files.items():
                target = tmp.parent / (tmp.name + obj[len(name) :])
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as out:
                    try:
                        _, digest = remote.download(obj, out, size)
                    except storage.PERMANENT as e:
                        raise UserError(
                            f"cannot download {storage.shown(remote.url(obj))}, which {INDEX} "
                            f"names: {reason(e)}"
                        ) from None
                if digest != sha256:
                    raise storage.Unverified(
                        f"{storage.shown(remote.url(obj))}: sha256 {digest[:16]}… downloaded, "
                        f"{INDEX} says {sha256[:16]}…"
                    )
            fsio.write_text(marker(path), storage.shown(remote.url(name)) + "\n")
            fsio.remove(path)  # one of the same name that did not load
            fsio.replace(tmp, path)
        finally:
            fsio.remove(tmp)
    return path


def _check_names(remote: storage.Remote, name: str, files: dict[str, Any]) -> None:
    """The index comes from the bucket: it names a checkpoint of this run and objects inside it,
    never a path that would land elsewhere."""
    inside = all(
        obj == name or (obj.startswith(name + "/") and ".." not in obj.split("/")) for obj in files
    )
    if not (NAME.match(name) and files and inside):
        raise UserError(
            f"{storage.shown(remote.url(INDEX))} names {name!r} with objects "
            f"{sorted(files)[:3]}: not a checkpoint of this run (step_NNNNNNNN[.pt][/...])"
        )
