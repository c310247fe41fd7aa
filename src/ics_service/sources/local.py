"""Local files: paths, folders (walked recursively, images recognised by content) and globs."""

from __future__ import annotations

import glob
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ..errors import ImageTooLarge, SourceNotFound, SourceUnreadable
from ..imaging import IMAGE_EXTENSIONS, SNIFF_BYTES, looks_like_image

log = logging.getLogger(__name__)

_GLOB_CHARS = frozenset("*?[")


def _strip_scheme(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


class LocalSource:
    def list(self, spec: str) -> Iterator[str]:
        path = Path(_strip_scheme(spec)).expanduser()
        if path.is_dir():
            yield from _walk(path)
        elif not path.exists() and _GLOB_CHARS & set(spec):
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                log.warning("no file matches %s", spec)
            for match in matches:
                p = Path(match)
                if p.is_dir():
                    yield from _walk(p)
                else:
                    yield str(p.absolute())
        else:
            # A named file is an item even when it is missing or not an image: it then
            # fails with a clear error instead of silently disappearing from the batch.
            yield str(path.absolute())

    def read(self, uri: str, max_bytes: int) -> bytes:
        path = _strip_scheme(uri)
        try:
            # stat first: opening a FIFO or a device could block or never end.
            st = os.stat(path)
            if stat.S_ISDIR(st.st_mode):
                raise SourceUnreadable(f"{path} is a folder, not a file")
            if not stat.S_ISREG(st.st_mode):
                raise SourceUnreadable(f"{path} is not a regular file")
            if st.st_size > max_bytes:
                raise ImageTooLarge(f"file is {st.st_size:,} bytes, over max_bytes={max_bytes:,}")
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except FileNotFoundError:
            raise SourceNotFound(f"no such file: {path}") from None
        except PermissionError:
            raise SourceUnreadable(f"permission denied reading {path}") from None
        except OSError as e:
            raise SourceUnreadable(f"cannot read {path}: {e.strerror or e}") from None
        if len(data) > max_bytes:
            raise ImageTooLarge(f"file grew over max_bytes={max_bytes:,} while being read")
        return data


def _walk(root: Path) -> Iterator[str]:
    """Image files under root, recursively, in a stable order; hidden entries are skipped."""
    for dirpath, dirnames, filenames in os.walk(root, onerror=_warn_walk):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            if _is_image_file(full, name):
                yield os.path.abspath(full)


def _is_image_file(path: str, name: str) -> bool:
    # An image extension is enough (a broken photo.jpg must be reported, not skipped);
    # otherwise the content decides, so extensionless or misnamed images are found too.
    if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            return looks_like_image(f.read(SNIFF_BYTES))
    except OSError:
        return False


def _warn_walk(error: OSError) -> None:
    log.warning("cannot list %s: %s", error.filename, error.strerror)
