"""Writing output files whole or not at all."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from refprism.errors import OutputError


def atomic_write(out: Path, write) -> Path:
    """Call write(tmp) on a temporary path beside `out` (same suffix), then rename it over `out`.

    A failure at any point removes the temporary file and leaves `out` as it was: never a half-written file.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.stem}.{uuid.uuid4().hex[:12]}.tmp{out.suffix}")
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"could not write {out}: {e.strerror or e} (nothing was written)") from None
        raise
    return out
