"""seq2seq: an English<->Japanese Transformer translation toolkit built around attention."""
import os
from contextlib import contextmanager, suppress
from pathlib import Path


class Seq2SeqError(Exception):
    """A problem with the user's input (corpus, config, checkpoint, text), shown as one line.

    The message names the file and, where there is one, the line: ``train.en:17: invalid UTF-8``.
    ``run.py`` prints it without a traceback and exits with status 1.
    """


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
