"""Images stored as byte ranges inside bigger files (the members of ``.tar`` shards).

A source whose images are not files of their own gives its index a
:class:`Members` table: row ``i``'s image is ``size[i]`` bytes at byte
``offset[i]`` of ``files[file[i]]``. Reading one is a seek and a read, so any
row can be read on its own, in any order, by any process: extraction resumes
at any block and DataLoader workers (forked or spawned) share nothing but
paths and numbers. Each read opens the file anew; next to decoding an image
that costs nothing, and no file handle crosses a fork.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcpipe.extract.images import ImageSkip


@dataclass(frozen=True, eq=False)
class Members:
    """Where each row's bytes are.

    Attributes:
        files: the container files (tar shards), absolute or relative to the working folder.
        file: (N,) int32, which of ``files`` holds row i.
        offset: (N,) int64, byte offset of row i's data in its file.
        size: (N,) int64, its length in bytes.
    """

    files: tuple[Path, ...]
    file: np.ndarray
    offset: np.ndarray
    size: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.file)
        assert self.offset.shape == (n,) and self.size.shape == (n,), "file, offset and size must be (N,)"
        assert n == 0 or 0 <= int(self.file.min()) <= int(self.file.max()) < len(self.files)

    def __len__(self) -> int:
        return len(self.file)

    def take(self, rows: np.ndarray) -> "Members":
        """The rows ``rows`` (in the order given); ``files`` is kept whole."""
        return Members(self.files, self.file[rows], self.offset[rows], self.size[rows])

    def read(self, i: int) -> bytes:
        """The bytes of row ``i``; ImageSkip (missing, unreadable, truncated) when they cannot be read."""
        path = self.files[int(self.file[i])]
        size = int(self.size[i])
        try:
            with open(path, "rb") as f:
                f.seek(int(self.offset[i]))
                data = f.read(size)
        except FileNotFoundError:
            raise ImageSkip("missing", f"shard {path.name} is gone") from None
        except OSError as exc:
            raise ImageSkip("unreadable", f"shard {path.name}: {exc.strerror or exc}") from None
        if len(data) < size:
            raise ImageSkip("truncated", f"{len(data)} of {size} bytes left in shard {path.name}")
        return data
