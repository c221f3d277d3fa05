"""Files in and out, in one place: lines read with the file and line named in errors, and every output
written atomically (a crash or a full disk leaves the old file or the new one, never half of one)."""
import gzip
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

from seq2seq import Seq2SeqError


def read_lines(path: str | Path, errors: str = "strict", hint: str = "") -> list[str]:
    """The lines of a UTF-8 file (`-`: stdin); see `iter_lines`."""
    return list(iter_lines(path, errors, hint))


def iter_lines(path: str | Path, errors: str = "strict", hint: str = "") -> Iterator[str]:
    """The lines of a UTF-8 file (`-`: stdin), one at a time as they arrive, split on \\n only, so that
    every other control character stays inside its line. Invalid UTF-8 is an error naming the file and
    line (+ `hint`), unless errors="replace". A file ending in .gz is read through gzip as it is."""
    name = "<stdin>" if str(path) == "-" else str(path)
    try:
        stream = sys.stdin.buffer if name == "<stdin>" else (gzip.open if name.endswith(".gz") else open)(path, "rb")
    except OSError as e:
        raise Seq2SeqError(f"{name}: cannot read ({e.strerror or e})") from None
    with stream if name != "<stdin>" else nullcontext():
        try:
            for lineno, line in enumerate(stream, 1):  # a binary stream splits on \n only
                try:
                    yield line.removesuffix(b"\n").decode("utf-8", errors=errors).removesuffix("\r")
                except UnicodeDecodeError as e:
                    raise Seq2SeqError(f"{name}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start}){hint}") from None
        except (OSError, EOFError) as e:  # a torn or foreign .gz
            raise Seq2SeqError(f"{name}: cannot read ({getattr(e, 'strerror', None) or e})") from None


@contextmanager
def atomic_write(path: str | Path, mode: str = "w"):
    """Open a temporary file beside `path`; when the block ends, fsync it and rename it over `path`.

    A crash or a full disk leaves the old file or the new one, never half of one; an error becomes
    one line naming the file.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except (OSError, RuntimeError) as e:  # RuntimeError: how torch.save reports a failed write
        with suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise Seq2SeqError(f"{path}: cannot write (is the disk full? {str(e).splitlines()[0]})") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def temporary_path(path: Path) -> Path:
    """Where `atomic_write` writes before the rename: a hidden file beside `path`."""
    return path.with_name(f".{path.name}.tmp")


def write_error(path: str | Path, e: OSError) -> Seq2SeqError:
    if isinstance(e, FileExistsError):  # mkdir of a parent that is a file
        reason = f"{e.filename} is not a directory"
    elif isinstance(e, NotADirectoryError):
        reason = "a parent in the path is not a directory"
    else:
        reason = e.strerror or str(e)
    return Seq2SeqError(f"{path}: cannot write ({reason})")


def check_output(path: str, input_path: str = "-") -> None:
    """Before any work: the output can be created, and it is not the input (which stays untouched)."""
    if path == "-":
        return
    target = Path(path)
    if input_path != "-" and target.exists() and target.resolve() == Path(input_path).resolve():
        raise Seq2SeqError(f"{path}: output= is the input file; choose another so the input stays untouched")
    # a file beside it, as atomic_write's will be; one per process (translate devices=N checks in each)
    probe = target.with_name(f".{target.name}.{os.getpid()}.probe")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise write_error(path, e) from None


def write_output(path: str, text: str) -> None:
    """A file is written atomically (a full disk leaves no half-written output); - is stdout."""
    with open_output(path) as out:
        out.write(text)


@contextmanager
def open_output(path: str):
    """A file, written atomically when the block ends (`atomic_write`), or stdout (`-`), where a failing
    write (a closed pipe, a full disk) is one line naming <stdout>."""
    if path != "-":
        with atomic_write(path) as f:
            yield f
        return
    try:
        yield sys.stdout
        sys.stdout.flush()
    except OSError as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python exits
        raise Seq2SeqError(f"<stdout>: cannot write ({e.strerror or e})") from None
