"""Output directories: one policy for every stage that writes one, one writer at a
time, no leftovers, and the file modes of what omniquant writes.

Policy:
- ``check_out``: before any work, the one output-directory rule of quantize, cliff,
  build-engine, make-tiny and report (an empty ``out`` refused, spared inputs, a file in
  the way, ``force`` for what exists, an existing parent).
- What ``force`` may remove (``check_removable``, checked before any work and again just
  before the removal): only a previous output of the same kind, that is a directory
  holding the ownership marker ``.omniquant-output.json`` of that kind and no entry the
  marker does not list, or an empty directory. Never ``/``, the home directory, the
  working directory or one above it, a mount point, or a symlink (its target is not
  omniquant's to remove). Everything else is refused, naming the first entries in the way.
  Every directory omniquant writes whole gets the marker (``mark_output``) when it is
  complete; ``staged_dir(kind=...)`` writes it before the rename.
- ``out_lock``: an exclusive, non-blocking ``fcntl.flock`` on ``.<out>.omniquant-lock``
  beside ``--out``, held for the whole run: a second run to the same ``--out`` stops at
  once with the holder's pid instead of replacing the first run's checkpoint. The kernel
  drops the lock of a killed run (SIGKILL included); the file it leaves is taken over
  with a note, and a lock file that cannot be opened, or a lock held while the pid in the
  file is not running, is an error naming the file to remove.
- ``clean_stale_temp_dirs``: temporary directories (``.omniquant-tmp-*``,
  ``.omniquant-old-*``) whose process is dead are removed, or moved back when they hold
  the previous checkpoint of an interrupted ``--force``.
- ``sigterm_as_interrupt``: SIGTERM is an interrupt for the whole run (lock released,
  temporary directory removed, exit 130), whatever native code it lands in.
- ``write_errors``: a full or read-only filesystem met while writing is an
  ``ExportError``, not an ``OSError`` traceback.
- ``staged_dir``: a directory is written into a temporary sibling
  (``.omniquant-tmp-<out>-<pid>``) and renamed into place only when the writer's block
  (writing and checking) succeeded; ``replace`` moves an existing ``out`` aside first
  (``.omniquant-old-<out>-<pid>``, a rename) so an interruption never leaves neither.
  It lives here, beside the lock and the stale-directory cleanup that know the same
  names, rather than in ``omniquant.checkpoint.layout``: it is an output-directory
  policy any stage can use (a report or bundle directory as well as a checkpoint).

- ``default_permissions``: files get ``0666 & ~umask`` (safetensors writes 0600).

``filelock`` would do the locking, but it is not a dependency and the pid in the file
(for the message) needs the raw descriptor anyway.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from omniquant.errors import ExportError, OmniquantError, arg_ref

TEMP_PREFIX = ".omniquant-tmp-"
OLD_PREFIX = ".omniquant-old-"
#: Name prefixes of the temporary directories (the new output, and the old one moved
#: aside by ``replace``). A directory so named is never a finished output.
TEMP_PREFIXES = (TEMP_PREFIX, OLD_PREFIX)

#: The ownership marker in every directory omniquant writes whole: ``{"kind", "entries"}``.
OUTPUT_MARKER = ".omniquant-output.json"
#: The kinds of output, as the marker and the messages name them.
CHECKPOINT = "checkpoint"
ENGINE_BUNDLE = "engine bundle"
CLIFF = "cliff output"
TINY_MODEL = "make-tiny model"
#: How many entries a refusal names.
_SHOWN = 5


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def clean_stale_temp_dirs(out: Path, say: Callable[[str], None]) -> None:
    """Remove temporary directories that dead quantize runs left beside ``out``.

    ``.omniquant-tmp-<out>-<pid>`` is an unfinished new checkpoint: removed.
    ``.omniquant-old-<out>-<pid>`` is the previous checkpoint that ``--force`` moved aside:
    when the run died before moving the new one in (``out`` is missing), it is moved back,
    else removed. Only directories whose process is gone are touched; the caller holds
    the lock of ``out``, so no live run can be writing them.
    """
    for prefix in TEMP_PREFIXES:
        for stale in sorted(out.parent.glob(f"{prefix}{out.name}-*")):
            pid = stale.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            if prefix == OLD_PREFIX and not out.exists():
                os.replace(stale, out)
                say(f"restored {out} from {stale.name}, left by an interrupted --force run")
            else:
                shutil.rmtree(stale, ignore_errors=True)
                say(f"removed {stale}, left by a run that did not finish (pid {pid})")


class out_lock:
    """Exclusive lock of an output directory: ``fcntl.flock`` on ``.<out>.omniquant-lock``
    beside it, taken without waiting.

    Two runs to one ``--out`` would otherwise both pass the existence check and the
    later rename would replace the other's checkpoint. The lock file is removed on
    release; an acquirer re-checks that the file it locked is still the one on disk.
    """

    def __init__(self, out: Path, say: Callable[[str], None] | None = None):
        self.path = out.parent / f".{out.name}.omniquant-lock"
        self.out = out
        self.say = say or (lambda _msg: None)
        self.fd: int | None = None

    def __enter__(self):
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise self._unopenable(exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise self._held(holder) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # released and removed by its holder meanwhile: take the new one
        stale = _holder(fd)
        if stale is not None and stale != os.getpid():  # a killed run's file, lock dropped
            self.say(f"note: took over {self.path}, left by a run that was killed (pid {stale})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None
        return False

    def _unopenable(self, exc: OSError) -> ExportError:
        if not self.path.exists():
            return ExportError(
                f"cannot create the lock file {self.path} ({exc.strerror}); choose a "
                f"writable {arg_ref('out')}.",
                arg="out",
                value=self.out,
            )
        try:
            holder = _holder_pid(self.path.read_bytes())
        except OSError:
            holder = None
        left = f"pid {holder}, not running" if holder and not _pid_alive(holder) else "pid unknown"
        return ExportError(
            f"the lock file {self.path} ({left}) cannot be opened ({exc.strerror}). If no "
            f"omniquant run is writing {arg_ref('out')}, it was left by a killed run: remove "
            f"{self.path} and run again.",
            arg="out",
            value=self.out,
        )

    def _held(self, holder: int | None) -> ExportError:
        if holder is not None and not _pid_alive(holder):
            return ExportError(
                f"the lock file {self.path} is locked, but pid {holder} written in it is not "
                f"running: a process it started still holds the lock, or a run on another "
                f"host writes this directory. Stop that process; if nothing is writing "
                f"{arg_ref('out')}, remove {self.path} and run again.",
                arg="out",
                value=self.out,
            )
        return ExportError(
            f"another omniquant run (pid {holder or '?'}) is writing it; "
            f"wait for it to finish or choose another {arg_ref('out')}.",
            arg="out",
            value=self.out,
        )


def _holder_pid(data: bytes) -> int | None:
    text = data[:32].decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _holder(fd: int) -> int | None:
    """The pid a lock file holds (None: empty or not a pid)."""
    return _holder_pid(os.pread(fd, 32, 0))


class sigterm_as_interrupt:
    """SIGTERM raises ``KeyboardInterrupt`` for the whole run (main thread only), so the
    temporary directory and the lock are released as on Ctrl-C and the CLI exits 130.

    A ``KeyboardInterrupt`` raised inside native code can come back as another exception
    (safetensors' ``get_tensor`` turns it into ``ValueError``); once the signal arrived,
    whatever escapes is reported as the interrupt it is.
    """

    def __init__(self):
        self.signum: int | None = None
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            self.signum = signum
            raise KeyboardInterrupt(f"signal {signum}")

        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not in the main thread
            self._old = None
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        if (
            self.signum is not None
            and exc_type is not None
            and not issubclass(exc_type, KeyboardInterrupt)
        ):
            raise KeyboardInterrupt(f"signal {self.signum}") from None
        return False


def locked_out(func):
    """Run ``quantize`` holding the lock of its ``out`` (third argument), SIGTERM
    turned into an interrupt."""

    @functools.wraps(func)
    def wrapper(model, recipe, out, *args, **kwargs):
        with sigterm_as_interrupt(), out_lock(out_path(out).absolute(), kwargs.get("log")):
            return func(model, recipe, out, *args, **kwargs)

    return wrapper


class write_errors:
    """A full or read-only filesystem while writing becomes an ``ExportError``.

    safetensors reports write failures as ``SafetensorError("... I/O error: No space
    left on device (os error 28)")``, not ``OSError``; both are caught.
    """

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        if issubclass(exc_type, OSError):
            reason = exc.strerror or str(exc)
        elif exc_type.__name__ == "SafetensorError" and "os error" in str(exc):
            reason = str(exc).rsplit("I/O error: ", 1)[-1]
        else:
            return False
        raise ExportError(
            f"writing the checkpoint failed ({reason}); nothing was left "
            f"behind. Free space or choose another {arg_ref('out')}.",
            arg="out",
            value=self.out,
        ) from exc


class staged_dir:
    """Write a directory in a temporary sibling; rename it into place when the block succeeds.

    ::

        with staged_dir(out, replace=force) as tmp:
            write_files(tmp)
            check(tmp)  # raising here leaves ``out`` untouched
        # ``out`` is now the new directory

    The temporary directory is ``.omniquant-tmp-<out>-<pid>`` beside ``out``, created
    empty on entry; on any exception, Ctrl-C included, it is removed and ``out`` is left
    as it was. On success an existing ``out`` (``replace`` only) is moved aside to
    ``.omniquant-old-<out>-<pid>``, the new directory renamed into place, the old one
    removed. Filesystem errors (full, read-only) become ``ExportError`` (``write_errors``).
    The caller holds ``out_lock(out)``; ``clean_stale_temp_dirs`` removes what a killed
    run left.

    Args:
        out: The directory to produce.
        replace: Replace an existing ``out``; without it an ``out`` that appeared while
            the block ran is an ``ExportError``. The existing ``out`` must still be one
            ``check_removable`` allows for ``kind`` when the block ends.
        kind: The output kind: the marker (``mark_output``) is written into the new
            directory before the rename, and an ``out`` to replace must be of that kind.
    """

    def __init__(self, out: Path, *, replace: bool, kind: str | None = None):
        self.out = Path(out)
        self.replace = replace
        self.kind = kind
        self.tmp = self.out.parent / f"{TEMP_PREFIX}{self.out.name}-{os.getpid()}"
        self.old = self.out.parent / f"{OLD_PREFIX}{self.out.name}-{os.getpid()}"

    def __enter__(self) -> Path:
        with write_errors(self.out):
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return write_errors(self.out).__exit__(exc_type, exc, tb)
        try:
            with write_errors(self.out):
                if self.out.exists() and not self.replace:  # appeared while the block ran
                    raise ExportError(
                        f"created by someone else during this run; pass {arg_ref('force')} to "
                        f"replace it, or choose another {arg_ref('out')}.",
                        arg="out",
                        value=self.out,
                    )
                if self.kind is not None:
                    mark_output(self.tmp, self.kind)
                if self.out.exists() or self.out.is_symlink():
                    if self.kind is not None:  # re-checked: it may have changed meanwhile
                        check_removable(self.out, self.kind)
                    os.replace(self.out, self.old)
                os.replace(self.tmp, self.out)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if self.old.exists():
            shutil.rmtree(self.old)
        return False


def default_permissions(root: Path) -> None:
    """Give every file under ``root`` the mode a plain ``open()`` would: ``0o666 & ~umask``.

    safetensors' ``save_file`` (and so ``save_pretrained``) creates its file through a
    private temporary, mode 0600, while the JSON files beside it get 0644: a server running
    as another user could read the configs but not the weights.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def out_path(out: str | Path, error: type[OmniquantError] = ExportError) -> Path:
    """``out`` as a ``Path``, refusing an empty one before any work.

    ``Path("")`` is ``.``: an unset ``$OUT`` in ``--out "$OUT"`` would otherwise name the
    working directory. Callers take ``str`` from the CLI for this reason.
    """
    if out is None or (isinstance(out, str) and not out.strip()):
        raise error(
            f"is empty; name the output directory (an unset variable in {arg_ref('out')} "
            '"$OUT" gives this).',
            arg="out",
            value='""',
        )
    return Path(out).expanduser()


def mark_output(directory: Path, kind: str, also: tuple[str, ...] = ()) -> None:
    """Write the ownership marker listing every entry now in ``directory``, plus ``also``
    (entries the writer will still create, for an output filled in place).

    ``force`` later removes the directory only while it holds nothing else.
    """
    present = {p.name for p in Path(directory).iterdir() if p.name != OUTPUT_MARKER}
    entries = sorted(present | set(also))
    (Path(directory) / OUTPUT_MARKER).write_text(
        json.dumps({"kind": kind, "entries": entries}, indent=2) + "\n"
    )


def _marker(directory: Path) -> dict | None:
    try:
        data = json.loads((directory / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(data, dict)
        and isinstance(data.get("kind"), str)
        and isinstance(data.get("entries"), list)
    )
    return data if ok else None


def _protected(out: Path) -> str | None:
    """Why ``out`` may never be removed, or None."""
    if out.is_symlink():
        return (
            f"is a symlink to {os.readlink(out)}; omniquant never removes a link's target. "
            f"Remove the link yourself or give its target as {arg_ref('out')}"
        )
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == Path(real.anchor):
        return "is the filesystem root"
    if real == Path.home().resolve():
        return "is your home directory"
    if real == cwd or real in cwd.parents:
        return "is the working directory or a directory above it"
    if os.path.ismount(real):
        return "is a mount point"
    return None


def check_removable(out: Path, kind: str, error: type[OmniquantError] = ExportError) -> None:
    """Refuse to remove ``out`` unless it is a previous ``kind`` output or empty.

    Args:
        out: The existing directory ``force`` would replace.
        kind: The output kind of the command (``CHECKPOINT``, ``ENGINE_BUNDLE``...).
        error: The stage's error class.

    Raises:
        error: Naming ``out``, what is in the way (the first entries) and the fix.
    """
    out = Path(out)
    why = _protected(out)
    if why is not None:
        raise error(
            f"{why}; {arg_ref('force')} removes only a previous {kind}.", arg="out", value=out
        )
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    marker = _marker(out)
    fix = f"Remove them yourself if they can go, or choose another {arg_ref('out')}."
    if marker is None:
        shown = ", ".join(entries[:_SHOWN]) + (
            f" (and {len(entries) - _SHOWN} more)" if len(entries) > _SHOWN else ""
        )
        raise error(
            f"holds files omniquant did not write ({shown}); {arg_ref('force')} replaces only "
            f"a previous {kind} or an empty directory. {fix}",
            arg="out",
            value=out,
        )
    if marker["kind"] != kind:
        raise error(
            f"holds another command's output ({marker['kind']}); {arg_ref('force')} replaces "
            f"only a previous {kind}. Choose another {arg_ref('out')}, or remove it yourself.",
            arg="out",
            value=out,
        )
    foreign = [e for e in entries if e != OUTPUT_MARKER and e not in marker["entries"]]
    if foreign:
        shown = ", ".join(foreign[:_SHOWN]) + (
            f" (and {len(foreign) - _SHOWN} more)" if len(foreign) > _SHOWN else ""
        )
        raise error(
            f"holds a previous {kind} and files omniquant did not write ({shown}); "
            f"{arg_ref('force')} would delete them. {fix}",
            arg="out",
            value=out,
        )


def check_out(
    out: Path,
    *,
    force: bool,
    error: type[OmniquantError] = ExportError,
    spares: tuple[tuple[Path, str], ...] = (),
    nested: bool = False,
    files: tuple[str, ...] | None = None,
    kind: str = CHECKPOINT,
) -> None:
    """The one output-directory policy of every stage that writes one (quantize, cliff,
    build-engine, report), checked before any work starts.

    - ``out`` must not be, or contain, an input it spares (``force`` would delete it);
      with ``nested`` it must not lie inside one either (a bundle inside its checkpoint
      would be copied into itself).
    - An existing ``out`` that is not a directory is refused.
    - The output is the whole directory (``files`` None): an existing ``out`` needs
      ``force``, and ``force`` replaces it only where ``check_removable`` allows for
      ``kind``. Or it is ``files`` in a directory that may hold other things (the
      report): only those files existing need ``force``, and only they are replaced.
    - Its parent directory must exist.

    Args:
        out: The output directory.
        force: Replace what exists.
        error: The stage's error class.
        spares: ``(path, what)`` of inputs the output must not destroy.
        nested: Refuse an ``out`` inside a spared input too.
        files: The files that make the output, when ``out`` is shared.
        kind: The output kind of a whole-directory output: what ``force`` may replace.

    Raises:
        error: naming the ``out`` argument, what is wrong and the fix.
    """
    out = Path(out)
    out_r = out.resolve()
    for source, what in spares:
        src_r = Path(source).resolve()
        if nested and (out_r == src_r or out_r in src_r.parents or src_r in out_r.parents):
            raise error(
                f"must not contain, or be inside, the {what} {source}; choose another "
                f"{arg_ref('out')}.",
                arg="out",
                value=out,
            )
        if out_r == src_r or out_r in src_r.parents:
            raise error(
                f"contains the {what} {source}; replacing {arg_ref('out')} would delete it. "
                f"Choose an {arg_ref('out')} outside it.",
                arg="out",
                value=out,
            )
    exists = out.exists() or out.is_symlink()
    if exists and not out.is_dir():
        raise error("exists and is not a directory.", arg="out", value=out)
    if files is None and exists and not force:
        raise error(
            f"already exists; pass {arg_ref('force')} to overwrite it.", arg="out", value=out
        )
    if files is None and exists:
        check_removable(out, kind, error)
    held = [f for f in files or () if (out / f).exists()]
    if held and not force:
        raise error(
            f"already holds {', '.join(held)}; pass {arg_ref('force')} to overwrite, "
            "or choose another directory.",
            arg="out",
            value=out,
        )
    if not exists and not out.parent.is_dir():
        raise error(f"parent directory {out.parent} does not exist.", arg="out", value=out)
