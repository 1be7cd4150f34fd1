"""Checkpoint files: atomic writes, safe reads, and where ``ckpt_path=last`` points."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..weights import UnsafeCheckpointError, load_checkpoint_file  # noqa: F401  (re-exported)

log = logging.getLogger("vision")


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the same folder and renames it over the target, so a crash
    during a save leaves the previous file intact; reads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file follows the umask like the rest
            os.replace(tmp, path)  # atomic on POSIX (same filesystem)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if weights_only is False:
            raise ValueError(f"{type(self).__name__} loads checkpoints with weights_only=True only ({path})")
        return load_checkpoint_file(path, map_location=map_location or "cpu")


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """``last``: the newest of ``<output_dir>/checkpoints/last*.ckpt`` and the SLURM requeue checkpoints
    ``<output_dir>/hpc_ckpt_*.ckpt`` (``None``, a fresh start, when there are none); a path as given."""
    if ckpt_path != "last":
        return ckpt_path
    output_dir = Path(output_dir)
    found = [*(output_dir / "checkpoints").glob("last*.ckpt"), *output_dir.glob("hpc_ckpt_*.ckpt")]
    if not found:
        log.warning("ckpt_path=last: no last*.ckpt in %s/checkpoints: starting a fresh run", output_dir)
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime_ns)
    log.info("ckpt_path=last: resuming from %s", newest)
    return str(newest)
