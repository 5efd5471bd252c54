"""Where `llmq quantize` writes, so that no run loses or mixes anyone's data:

    .OUT.lock      held (flock) for the whole run; the kernel releases it when the process dies, so a second
                   run on the same output is refused at once and a killed run leaves no stale lock
    .OUT.partial/  finished blocks and run.json, the fingerprint of everything that changes the result
                   (model files, calibration samples, recipe, settings, versions): a re-run resumes only
                   from a work folder with the same fingerprint
    OUT/           appears by one rename when complete; --overwrite replaces only an llmq checkpoint or
                   an empty folder, never the source model or a folder around it
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from .errors import InputError, WriteFailure
from .loading import is_llmq_checkpoint

# errors that are the machine's state, not llmq's bug: the finished blocks are kept for a resume
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def check_writable_file(path: Path, option: str) -> None:
    """Before a long job: the file it ends by writing can be written (a probe file is made and removed)."""
    import tempfile

    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file path")
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{option} {path}: folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "Permission denied")
    except OSError as e:
        raise InputError(f"{option} {path} cannot be written: {e.strerror}") from None


def check_output(out: Path, source_dir: Path, overwrite: bool) -> None:
    """Refuse an output that would destroy the source model or a folder llmq did not write."""
    o, s = out.resolve(), source_dir.resolve()
    if o == s or s.is_relative_to(o):
        raise InputError(f"output {out} {'is' if o == s else 'contains'} the source model {source_dir}; choose another output folder")
    if o.is_relative_to(s):
        raise InputError(f"output {out} lies inside the source model folder {source_dir}; choose a folder outside it")
    if not out.exists():
        return
    if not overwrite:
        raise InputError(f"output folder already exists: {out} (pass --overwrite to replace it)")
    if not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder; --overwrite replaces only an llmq checkpoint")
    if any(out.iterdir()) and not is_llmq_checkpoint(out):
        raise InputError(f"output {out} is not an llmq checkpoint; --overwrite replaces only an llmq checkpoint or an empty folder")


class RunLock:
    """Exclusive use of one output path, for as long as the process lives."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}.lock"
        self.fd: int | None = None
        self.made_dirs: list[Path] = []

    def __enter__(self) -> "RunLock":
        for d in reversed([self.out.parent, *self.out.parent.parents]):
            if not d.exists():
                try:
                    d.mkdir()
                except OSError as e:
                    raise InputError(f"cannot create the output's folder {d}: {e.strerror}") from None
                self.made_dirs.append(d)
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                self._remove_made_dirs()
                raise InputError(f"cannot write beside the output {self.out}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise InputError(f"another llmq run (pid {holder}) is writing {self.out}; wait for it to finish or stop it") from None
            try:  # a run finishing between our open and flock removes the file: lock the new one instead
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self.fd = fd
            else:
                os.close(fd)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.path.unlink(missing_ok=True)  # while still held, so no other run holds a lock on a removed file
        os.close(self.fd)
        if exc_type is InputError:  # bad input leaves nothing behind, not even the folders made for it
            self._remove_made_dirs()

    def _remove_made_dirs(self) -> None:
        for d in reversed(self.made_dirs):
            try:
                d.rmdir()
            except OSError:
                break


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def files_fingerprint(paths) -> dict:
    """Size and content hash of each file (blake2b reads ~1 GB/s: seconds even for a 7B model's shards)."""
    return {p.name: {"bytes": p.stat().st_size, "blake2b": file_digest(p)} for p in sorted(set(paths))}


def prepare_work_dir(out: Path, fingerprint: dict, log) -> Path:
    """The work folder: resumed if it was made from exactly these inputs, else started afresh."""
    work = out.parent / f".{out.name}.partial"
    run_file = work / "run.json"
    if work.exists():
        old = json.loads(run_file.read_text()) if run_file.is_file() else {}
        if old == fingerprint:
            log(f"resuming from {work}")
            return work
        changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        log(f"discarding {work}: it was made from different inputs ({', '.join(changed) or 'unreadable run.json'}); starting afresh")
        shutil.rmtree(work)
    work.mkdir()
    run_file.write_text(json.dumps(fingerprint, indent=2))
    return work


def publish(work: Path, out: Path) -> None:
    """Rename the finished work folder to OUT; an old checkpoint there (checked by check_output) is set aside
    first and removed only after the new one is in place."""
    if not out.exists():
        os.replace(work, out)
        return
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old)


def write_failure(e: OSError, work: Path) -> WriteFailure | None:
    """A clear message for a full disk, a read-only or vanished folder mid-run; None for anything else."""
    if e.errno not in WRITE_ERRNOS:
        return None
    where = f" ({e.filename})" if e.filename else ""
    return WriteFailure(f"{e.strerror}{where} while writing the checkpoint; the finished blocks in {work} are kept: "
                        "fix this and run the same command to resume")
