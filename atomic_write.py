"""Files written whole or not at all, without touching any file the user already has."""
import os
import secrets
from pathlib import Path
from typing import Callable


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` whole or not at all: write(tmp) fills a temporary file of a fresh name beside
    it, which then replaces `path`. A file the user already has (model.partial, eval.tmp, ...) is
    never overwritten or deleted. O_EXCL rather than tempfile.mkstemp: the result gets an ordinary
    new file's permissions (mkstemp's 0600 would hide a shared checkpoint from the group)."""
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.partial")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink()
        raise
