"""The run directory: how its files are written, read back and replaced.

Writing. Every file is written to ``<name>.tmp`` beside it, flushed, fsynced
and renamed over the old one (:func:`atomic_write_bytes`), so a reader sees
the old file or the new one, never a torn one; when the write fails (disk
full, read-only filesystem) the ``.tmp`` is removed, the old file is left as
it was and the error (an ``OSError``) names the file. ``metrics.jsonl`` is
appended to, one line per epoch (:func:`append_line`); a failed append is cut
back to the previous end of the file, and a line torn by a crash is dropped
when the run is resumed (:func:`keep_metrics_through`).

Reading. ``config.json`` (:func:`read_config`), ``checkpoint.pt``
(:func:`load_checkpoint`) and ``metrics.jsonl`` are read back by ``mars eval``
and ``mars train --resume``. A checkpoint is loaded with
``torch.load(weights_only=True, map_location="cpu")`` (tensors, numbers,
strings and plain containers only: loading never runs code from the file;
tensors saved on any device load on the CPU) after the CRC-32 of
every record of its zip archive has been verified (``torch.load`` does not
check them, so a flipped byte would otherwise load as a wrong weight); then
its structure is checked, and its weights and optimiser state must be finite.
Every problem is a :class:`RunFileError` whose message starts with the file's
path and says what is wrong.

New directories. :func:`open_output` refuses an empty path, a path that is a
file or lies under a file, and an existing non-empty directory; with
``overwrite`` it accepts an existing *run* directory (only run files in it;
for ``mars compare``, only its tables, plots and run directories) and the new
run is built in a sibling directory ``.<name>.new-XXXXXXXX`` that replaces the
old one only once it is complete (:meth:`OutputDir.commit`): in one step with
``renameat2(RENAME_EXCHANGE)`` on Linux, else with two renames under a journal
``.<name>.swap`` that the next mars command on ``<name>`` completes
(:func:`recover_interrupted_swap`) if the process is killed between them. A
symlink given as the directory is followed: the run is written at its target
and the link stays.

One writer. A process that writes a run directory (a new run, ``--resume``,
``--overwrite`` of it) holds an ``fcntl.flock`` on its ``.lock`` file
(:class:`RunLock`) until it ends; another is refused with
:class:`RunInUseError` (``RUN is in use by process PID``). The kernel drops
the lock of a process that dies, so a stale ``.lock`` never blocks.
"""
from __future__ import annotations

import ctypes
import errno
import json
import numbers
import os
import re
import secrets
import shutil
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: run directories are not locked
    fcntl = None

import torch

from .config import ConfigError, TrainConfig

__all__ = [
    "RunFileError", "RUN_FILES", "COMPARE_FILES", "CONFIG_FILE", "CHECKPOINT_FILE", "METRICS_FILE",
    "atomic_write_bytes", "write_text", "write_json", "save_checkpoint", "append_line",
    "read_json", "read_config", "load_checkpoint", "check_config_matches", "check_data_matches", "read_metrics",
    "keep_metrics_through",
    "OutputDir", "open_output", "LOCK_FILE", "RunLock", "RunInUseError", "lock_run", "recover_interrupted_swap",
]

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"  # held by the one process writing the run (RunLock)
RUN_FILES = frozenset({CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, "results.csv", "summary.json", "usage.pt",
                       "score_by_observed.png", "expert_usage.png"})
COMPARE_FILES = frozenset({"compare.md", "compare.json", "compare_by_observed.png"})
# config.json keys that may differ from the checkpoint's copy: the epoch budget
# (to extend a run), the kernel backend and the device (the weights depend on
# neither; --resume RUN --device moves a run).
MUTABLE_KEYS = ("epochs", "model.backend", "device")


class RunFileError(ValueError):
    """A file of a run directory (or the directory itself) is missing,
    unreadable, malformed or does not fit the run; ``path`` names it."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {message}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _with_filename(exc: OSError, path: Path) -> OSError:
    """The same error, naming ``path`` when it names no file (a failed write)."""
    if exc.filename is not None:
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), os.fspath(path))


# ------------------------------------------------------------------ writing
def atomic_write_bytes(path: str | os.PathLike, write) -> None:
    """``write(f)`` into ``<path>.tmp``, fsync, rename over ``path``. On any
    failure the ``.tmp`` is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _with_filename(exc, path) from exc
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=1) + "\n")


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save to a temporary file, fsync, then rename: never a torn file."""
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` and a newline, fsynced; a failed append is cut back to
    the previous end of the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = 0
    try:
        with open(path, "ab") as f:
            f.write((line + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        try:
            os.truncate(path, size)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _with_filename(exc, path) from exc
        raise


# ------------------------------------------------------------------ reading
def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise RunFileError(path, f"file not found; expected {what}") from None
    except IsADirectoryError:
        raise RunFileError(path, f"is a directory; expected {what}") from None
    except OSError as e:
        raise RunFileError(path, f"cannot read it ({e.strerror or e}); expected {what}") from None


def read_json(path: str | os.PathLike, what: str):
    path = Path(path)
    raw = _read_bytes(path, what)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RunFileError(path, f"not UTF-8 text ({e.reason} at byte {e.start}); expected {what}") from None
    except json.JSONDecodeError as e:
        raise RunFileError(path, f"invalid JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected {what}") from None
    except RecursionError:
        raise RunFileError(path, f"JSON nested too deeply; expected {what}") from None


def read_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The run's ``config.json``, checked like a new configuration."""
    path = Path(run_dir) / CONFIG_FILE
    obj = read_json(path, "the run's configuration (a JSON object written by mars train)")
    try:
        return TrainConfig.from_dict(obj)
    except (ConfigError, TypeError, ValueError) as e:
        raise RunFileError(path, f"invalid configuration: {e}") from None


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _tensors(obj, where: str, path: Path, *, allow_none: bool = False) -> None:
    """``obj`` is a dict of name -> tensor with finite floating values."""
    if obj is None and allow_none:
        return
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise RunFileError(path, f"{where} is not a dict of named tensors; not a checkpoint written by mars train")
    for name, v in obj.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise RunFileError(path, f"{where}[{name!r}] holds NaN or infinite values; the checkpoint is corrupt")


def _byte_tensor(obj, where: str, path: Path) -> None:
    if not isinstance(obj, torch.Tensor) or obj.dtype != torch.uint8 or obj.dim() != 1:
        raise RunFileError(path, f"{where} is not an RNG state (a 1-D uint8 tensor); not a checkpoint written by mars train")


def _optimizer_state(obj, where: str, path: Path) -> None:
    if not isinstance(obj, dict) or not isinstance(obj.get("state"), dict) or not isinstance(obj.get("param_groups"), list):
        raise RunFileError(path, f"{where} is not an optimiser state dict; not a checkpoint written by mars train")
    for key, entry in obj["state"].items():
        if not isinstance(entry, dict):
            raise RunFileError(path, f"{where}: the state of parameter {key!r} is not a dict")
        for name, v in entry.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise RunFileError(path, f"{where}: {name} of parameter {key!r} holds NaN or infinite values; "
                                         "the checkpoint is corrupt")


def _verify_archive(path: Path) -> None:
    """The checkpoint is a zip archive (torch.save's format) whose records all
    match their CRC-32."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise RunFileError(path, "file not found; expected the run's checkpoint (written after every epoch)") from None
    except OSError as e:
        raise RunFileError(path, f"cannot read it ({e.strerror or e})") from None
    if path.is_dir():
        raise RunFileError(path, "is a directory; expected the run's checkpoint file")
    if size == 0:
        raise RunFileError(path, "is empty (0 bytes); expected a checkpoint written by mars train")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except PermissionError as e:
        raise RunFileError(path, f"cannot read it ({e.strerror or e})") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise RunFileError(path, f"not a checkpoint written by mars train: not a complete torch.save archive "
                                 f"({_first_line(e)}); truncated or corrupt?") from None
    except Exception as e:  # zlib errors and the like from a damaged archive
        raise RunFileError(path, f"corrupt archive ({_first_line(e)})") from None
    if bad is not None:
        raise RunFileError(path, f"corrupt: the checksum of record {bad!r} does not match its data")


def _safe_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        import pickle

        if isinstance(e, pickle.UnpicklingError):
            lines = [l.strip() for l in str(e).splitlines() if l.strip()]
            detail = next((l for l in lines if not l.startswith(("Weights only load failed", "Check the documentation"))
                           and "weights_only" not in l), "")
            raise RunFileError(path, "refusing to load it: it holds objects other than tensors, numbers, strings and "
                                     "plain containers, which a checkpoint written by mars train never does"
                                     f"{' (' + detail + ')' if detail else ''}") from None
        raise RunFileError(path, f"not a readable checkpoint ({_first_line(e)})") from None


def load_checkpoint(path: str | os.PathLike, *, resume: bool) -> dict:
    """Read ``checkpoint.pt`` safely and check what ``mars eval`` (the best
    weights) or, with ``resume``, ``--resume`` (also the weights, optimiser,
    RNG states and epoch) needs. Raises :class:`RunFileError`."""
    path = Path(path)
    _verify_archive(path)
    state = _safe_load(path)
    if not isinstance(state, dict):
        raise RunFileError(path, f"holds a {type(state).__name__}, not a dict; not a checkpoint written by mars train")
    required = ("best", "model", "epoch", "generator", "torch_rng", "optimizer") if resume else ("best",)
    missing = [k for k in required if k not in state]
    if missing:
        raise RunFileError(path, f"missing {', '.join(missing)}; not a checkpoint written by mars train")
    best = state["best"]
    if not isinstance(best, dict) or not {"score", "epoch", "state"} <= set(best):
        raise RunFileError(path, "best is not a dict with score, epoch, state; not a checkpoint written by mars train")
    if not isinstance(best["score"], numbers.Real) or not _is_int(best["epoch"]):
        raise RunFileError(path, "best: score must be a number and epoch an integer")
    _tensors(best["state"], "best.state", path, allow_none=resume)
    if best["state"] is None and not resume:
        raise RunFileError(path, "holds no best weights (no epoch was validated); resume the run to train it further")
    if "config" in state and not isinstance(state["config"], dict):
        raise RunFileError(path, "config is not a dict; not a checkpoint written by mars train")
    if not isinstance(state.get("data_fingerprint"), (str, type(None))):
        raise RunFileError(path, "data_fingerprint is not a string; not a checkpoint written by mars train")
    if resume:
        if not _is_int(state["epoch"]) or state["epoch"] < 0:
            raise RunFileError(path, f"epoch must be an integer >= 0, got {state['epoch']!r}")
        _tensors(state["model"], "model", path)
        _byte_tensor(state["generator"], "generator", path)
        _byte_tensor(state["torch_rng"], "torch_rng", path)
        for key in ("torch_rng_by_rank", "cuda_rng_by_rank"):  # cuda_rng_by_rank: written on a GPU only
            by_rank = state.get(key)
            if by_rank is not None:
                if not isinstance(by_rank, list) or not by_rank:
                    raise RunFileError(path, f"{key} is not a non-empty list of RNG states")
                for i, rng in enumerate(by_rank):
                    _byte_tensor(rng, f"{key}[{i}]", path)
        _optimizer_state(state["optimizer"], "optimizer", path)
        per_rank = state.get("optimizer_by_rank")
        if per_rank is not None:
            if not isinstance(per_rank, list) or not per_rank:
                raise RunFileError(path, "optimizer_by_rank is not a non-empty list of optimiser states")
            for i, o in enumerate(per_rank):
                _optimizer_state(o, f"optimizer_by_rank[{i}]", path)
    return state


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_config_matches(state: dict, cfg: TrainConfig, config_path: str | os.PathLike,
                         checkpoint_path: str | os.PathLike) -> None:
    """``config.json`` describes the model and run the checkpoint was saved
    from (``epochs`` and ``model.backend`` may differ)."""
    saved = state.get("config")
    if saved is None:
        return
    try:
        saved_cfg = TrainConfig.from_dict(saved)
    except (ConfigError, TypeError, ValueError) as e:
        raise RunFileError(checkpoint_path, f"the configuration saved in it is invalid ({e})") from None
    ours, theirs = _flat(cfg.to_dict()), _flat(saved_cfg.to_dict())
    diff = [k for k in ours if k not in MUTABLE_KEYS and ours[k] != theirs.get(k)]
    if diff:
        k = diff[0]
        more = f" and {len(diff) - 1} more" if len(diff) > 1 else ""
        raise RunFileError(config_path, f"does not match the configuration saved in {Path(checkpoint_path).name} "
                                        f"({k}: {ours[k]!r} here, {theirs.get(k)!r} in the checkpoint{more}); "
                                        f"restore it (only {', '.join(MUTABLE_KEYS[:-1])} and {MUTABLE_KEYS[-1]} "
                                        "may change)")


def check_data_matches(state: dict, fingerprint: str | None, train_set, source: str,
                       checkpoint_path: str | os.PathLike) -> None:
    """The data loaded for ``mars eval`` or ``--resume`` (from ``source``) is
    the data the run was trained on: the fingerprint saved in the checkpoint
    (:func:`mars.data.data_fingerprint`; runs from before it was saved have
    none) and the standardisation fitted on the training split (modalities,
    dimensions and, within float rounding, values). Raises
    :class:`RunFileError` naming ``source``."""
    run = Path(checkpoint_path).parent
    saved = state.get("data_fingerprint")
    if saved is not None and fingerprint is not None and saved != fingerprint:
        raise RunFileError(source, f"is not the data the run {run} was trained on (data fingerprint {fingerprint}, the "
                                   f"run's {saved}): it changed since, or another folder is read; restore that data "
                                   "or train a new run")
    std, fitted = state.get("standardizer"), getattr(train_set, "standardizer", None)
    if not isinstance(std, dict) or fitted is None:
        return
    why = None
    try:
        mods = [str(m) for m in std["modalities"]]
        if mods != list(fitted.modalities):
            why = f"modalities {list(fitted.modalities)}, the run's {mods}"
        else:
            for m in mods:
                for name, ours, theirs in (("mean", fitted.mean[m], std["mean"][m]), ("std", fitted.std[m], std["std"][m])):
                    theirs = torch.as_tensor(theirs).float()
                    if ours.shape != theirs.shape or not torch.allclose(ours.float(), theirs, rtol=1e-4, atol=1e-6):
                        why = f"the training split's {name} of modality {m!r} differs"
                        break
                if why:
                    break
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise RunFileError(checkpoint_path, "its standardizer is malformed; not a checkpoint written by mars train") from None
    if why:
        raise RunFileError(source, f"is not the data the run {run} was trained on ({why}); restore that data or train "
                                   "a new run")


def _metric_epoch(line: str):
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    if isinstance(record, dict) and _is_int(record.get("epoch")):
        return record["epoch"]
    return None


def read_metrics(path: str | os.PathLike) -> tuple[list[str], list[int], bool]:
    """The complete lines of ``metrics.jsonl`` and their epochs, and whether a
    torn trailing line (no newline, or not a JSON record: an append cut short)
    was left out. A bad line before the last is a :class:`RunFileError`."""
    path = Path(path)
    raw = _read_bytes(path, "one JSON record per epoch")
    text = raw.decode("utf-8", errors="replace")
    parts = text.split("\n")
    tail = parts.pop()  # "" when the file ends with a newline
    lines = [(i + 1, p) for i, p in enumerate(parts) if p.strip()]
    torn = bool(tail)
    if lines and _metric_epoch(lines[-1][1]) is None and not tail:
        lines.pop()  # a complete-looking last line that does not parse: cut short, padded by the filesystem
        torn = True
    kept, epochs = [], []
    for number, line in lines:
        epoch = _metric_epoch(line)
        if epoch is None:
            raise RunFileError(path, f"line {number} is not a JSON object with an integer \"epoch\"; "
                                     "fix or delete that line to resume")
        kept.append(line)
        epochs.append(epoch)
    return kept, epochs, torn


def keep_metrics_through(path: str | os.PathLike, epoch: int) -> None:
    """Drop a torn trailing line and the lines of epochs after ``epoch`` (a
    run killed between logging an epoch and checkpointing it repeats that
    epoch on resume)."""
    path = Path(path)
    if not path.exists():
        return
    lines, epochs, torn = read_metrics(path)
    kept = [line for line, e in zip(lines, epochs) if e <= epoch]
    if torn or len(kept) != len(lines):
        write_text(path, "".join(line + "\n" for line in kept))


# ------------------------------------------------------------ one writer per run directory
class RunInUseError(RunFileError):
    """Another process holds the run directory's lock (it is training,
    resuming or replacing that run)."""

    def __init__(self, path: str | os.PathLike, pid: int | None, doing: str = ""):
        self.path, self.pid = os.fspath(path), pid
        who = f"process {pid}" if pid else "another process"
        ValueError.__init__(self, f"{self.path} is in use by {who}{doing} (one writer per run directory: mars train, "
                                  "--resume and --overwrite lock it); wait for that process to finish or stop it")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


class RunLock:
    """An exclusive advisory lock on a directory: ``fcntl.flock`` on its
    ``.lock`` file, which then holds the owner's PID. The kernel drops the lock
    when the process ends, however it ends, so a lock left by a killed process
    never blocks; the file itself stays (removing it would let two processes
    lock two different files of the same name). Without ``fcntl`` (not POSIX)
    it locks nothing."""

    def __init__(self, fd: int | None, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def acquire(cls, directory: str | os.PathLike, shown: str | os.PathLike | None = None) -> "RunLock":
        """Lock ``directory`` (which must exist) or raise :class:`RunInUseError`
        naming ``shown`` (default: the directory)."""
        path = Path(directory) / LOCK_FILE
        if fcntl is None:
            return cls(None, path)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise RunInUseError(shown if shown is not None else directory, pid) from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the name still leads to the file we locked (not one removed or replaced meanwhile)
                same = os.path.samestat(os.stat(path), os.fstat(fd))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return cls(fd, path)
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def _swap_journal(target: Path) -> Path:
    """``.NAME.swap`` beside ``target`` (``/`` has no sibling: a name that never exists)."""
    return target.with_name(f".{target.name}.swap") if target.name else target / ".no-swap-journal"


def recover_interrupted_swap(target: str | os.PathLike) -> bool:
    """Complete a replacement of ``target`` that a killed ``--overwrite``
    left half done (only where the atomic exchange is unavailable and the
    swap is two renames under a journal, :meth:`OutputDir.commit`): the new
    run, complete before the journal was written, is moved into place and the
    old one removed. Returns whether there was one to complete; a journal
    still held by a live process is :class:`RunInUseError`."""
    target = Path(os.path.realpath(os.fspath(target)))
    journal = _swap_journal(target)
    if not os.path.lexists(journal):
        return False
    try:
        fd = os.open(journal, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False  # completed meanwhile
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunInUseError(target, None, " (it is replacing it)") from None
        if not os.path.exists(journal) or not os.path.samestat(os.stat(journal), os.fstat(fd)):
            return False
        try:
            names = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
            old, new = names["old"], names["new"]
            pattern = re.compile(re.escape(f".{target.name}.") + r"(old|new)-[0-9a-f]{8}")
            if not (isinstance(old, str) and isinstance(new, str) and pattern.fullmatch(old) and pattern.fullmatch(new)):
                raise ValueError("unexpected names")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
            raise RunFileError(journal, "not a replacement journal written by mars (remove it if you know where the "
                                        "run is)") from None
        old, new = target.with_name(old), target.with_name(new)
        have_new = new.is_dir() and not new.is_symlink()
        if have_new and target.is_dir() and not os.path.lexists(old):
            os.rename(target, old)  # killed before the first rename: the new run was complete, move it in
        if not os.path.lexists(target):
            if have_new:
                os.rename(new, target)  # killed between the two renames
            elif old.is_dir():
                os.rename(old, target)  # the new run is gone: the old one goes back
        os.unlink(journal)
    finally:
        os.close(fd)
    if target.is_dir() and old.is_dir() and not old.is_symlink() and (_is_run_dir(old) or _is_compare_dir(old)):
        shutil.rmtree(old, ignore_errors=True)
    return True


def lock_run(run_dir: str | os.PathLike) -> RunLock:
    """The lock of an existing run directory (``--resume``): an interrupted
    replacement of it is completed first (:func:`recover_interrupted_swap`)."""
    recover_interrupted_swap(run_dir)
    if os.path.lexists(_swap_journal(Path(os.path.realpath(os.fspath(run_dir))))):
        raise RunInUseError(run_dir, None, " (it is replacing it)")
    return RunLock.acquire(os.path.realpath(os.fspath(run_dir)), shown=run_dir)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directories ``a`` and ``b`` in one step (Linux
    ``renameat2(RENAME_EXCHANGE)``); False where the system or the
    filesystem does not support it (nothing was changed then)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


# ------------------------------------------------------------ output directory
_COMPARE_PLOT = re.compile(r"expert_usage_.+\.png")


def _names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()} - {LOCK_FILE}


def _is_run_dir(path: Path) -> bool:
    names = _names(path)
    allowed = RUN_FILES | {f + ".tmp" for f in RUN_FILES}
    return bool(names & {CONFIG_FILE, CHECKPOINT_FILE, METRICS_FILE}) and names <= allowed


def _compare_file(name: str) -> bool:
    name = name.removesuffix(".tmp")
    return name in COMPARE_FILES or bool(_COMPARE_PLOT.fullmatch(name))


def _is_compare_dir(path: Path) -> bool:
    entries = [e for e in path.iterdir() if e.name != LOCK_FILE]
    return bool(entries) and all((e.is_dir() and not e.is_symlink() and _is_run_dir(e)) if e.is_dir()
                                 else _compare_file(e.name) for e in entries)


@dataclass
class OutputDir:
    """A new run (or compare) directory: written in ``build``, which is the
    directory itself, or with ``overwrite`` of an existing one a sibling that
    :meth:`commit` swaps in once the run is complete. ``path`` is the
    directory as given (absolute), ``target`` where it really is (a symlinked
    ``--out`` is followed: the run goes to the link's target and the link
    stays). The directories are locked (:class:`RunLock`) until
    :meth:`release`."""

    path: Path
    build: Path
    target: Path | None = None
    locks: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self):
        if self.target is None:
            self.target = self.path

    def __getstate__(self):  # sent to the other ranks under torchrun: without the locks (rank 0's)
        return {k: v for k, v in self.__dict__.items() if k != "locks"}

    def __setstate__(self, state):
        self.__dict__.update(state, locks=[])

    @property
    def replacing(self) -> bool:
        return self.build != self.target

    def commit(self) -> None:
        """Swap the new directory in, atomically: one
        ``renameat2(RENAME_EXCHANGE)``, then the old run (now in the sibling)
        is removed. Where the exchange is unsupported, two renames under a
        journal ``.NAME.swap`` that the next mars command on NAME completes
        if this process is killed between them (:func:`recover_interrupted_swap`)."""
        if not self.replacing:
            return
        target, build = self.target, self.build
        if _exchange(build, target):
            old = build  # holds the old run now
        else:
            old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
            self._swap_with_journal(old)
        self.build = target
        for lock in self.locks[:-1]:  # the old run's; the last is the new run's (now at target)
            lock.release()
        del self.locks[:-1]
        shutil.rmtree(old, ignore_errors=True)

    def _swap_with_journal(self, old: Path) -> None:
        target, build = self.target, self.build
        journal = _swap_journal(target)
        tmp = journal.with_name(journal.name + f".{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)  # locked before it appears under its name
            os.write(fd, json.dumps({"target": target.name, "old": old.name, "new": build.name}).encode())
            os.fsync(fd)
            os.rename(tmp, journal)
            try:
                os.rename(target, old)
            except BaseException:
                os.unlink(journal)  # nothing moved
                raise
            try:
                os.rename(build, target)
            except Exception:
                os.rename(old, target)  # put the old run back (an interrupt here is like a kill: left to recovery)
                os.unlink(journal)
                raise
            os.unlink(journal)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)  # drops the journal's lock: a journal left behind is completed by the next command

    def discard(self) -> None:
        """Remove an unfinished replacement (the old directory stays)."""
        if self.replacing:
            shutil.rmtree(self.build, ignore_errors=True)

    def release(self) -> None:
        """Drop the locks (at the end of the run, whatever its outcome)."""
        for lock in self.locks:
            lock.release()
        self.locks.clear()


def open_output(path: str | os.PathLike, *, overwrite: bool = False, kind: str = "run") -> OutputDir:
    """Check ``path`` as the directory of a new run (``kind="run"``) or of
    ``mars compare`` (``kind="compare"``), create what is needed and lock it.

    Refused (:class:`RunFileError`): an empty path; a path naming a file or
    under a file; an existing non-empty directory unless ``overwrite``; with
    ``overwrite``, a directory that is not a run (compare) directory, or the
    current directory or one of its parents; a directory another process
    holds (:class:`RunInUseError`: it is training, resuming or replacing it).
    A symlink is followed: the run is written at its target."""
    text = os.fspath(path)
    if not text.strip():
        raise RunFileError(text, "an empty path; expected a directory for the run (e.g. runs/mine)")
    path = Path(os.path.abspath(text))  # "runs/x/..": the sibling of the directory it names
    target = Path(os.path.realpath(path))
    for parent in reversed([target, *target.parents]):
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == target else f"lies under {os.path.relpath(parent)}, which is a file"
            raise RunFileError(text, f"{where}; expected a directory for the run")
    recover_interrupted_swap(target)
    if os.path.lexists(_swap_journal(target)):
        raise RunInUseError(text, None, " (it is replacing it)")
    names = sorted(_names(target)) if target.is_dir() else []
    if names:
        if not overwrite:
            listed = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise RunFileError(text, f"already exists and is not empty ({listed}); pass --overwrite to replace it "
                                     "(the old one stays until the new one is complete) or choose another --out")
        looks_right = _is_run_dir if kind == "run" else _is_compare_dir
        if not looks_right(target):
            raise RunFileError(text, f"is not a mars {'run' if kind == 'run' else 'compare'} directory (it holds other "
                                     "files); --overwrite replaces only those; choose another --out")
        here = Path.cwd().resolve()
        if target == here or target in here.parents:
            raise RunFileError(text, "is the current directory or one of its parents; refusing to replace it")
        old_lock = RunLock.acquire(target, shown=text)
        try:
            if not looks_right(target):  # changed before we held it
                raise RunFileError(text, f"changed while being checked; it is not a mars {kind} directory now")
            while True:
                build = target.with_name(f".{target.name}.new-{secrets.token_hex(4)}")
                try:
                    build.mkdir()
                    break
                except FileExistsError:
                    continue
            return OutputDir(path=path, build=build, target=target, locks=[old_lock, RunLock.acquire(build)])
        except BaseException:
            old_lock.release()
            raise
    target.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(target, shown=text)
    if _names(target):  # another process wrote a run there before we held it
        lock.release()
        raise RunFileError(text, "already exists and is not empty (another process wrote it meanwhile); choose "
                                 "another --out, or pass --overwrite to replace it")
    return OutputDir(path=path, build=target, target=target, locks=[lock])
