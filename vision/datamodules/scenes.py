"""Moved to :mod:`vision.datamodules.synthetic`; this name stays importable."""

from .synthetic import (  # noqa: F401
    CLASSES,
    FOREGROUND,
    _box_iou,
    make_fashion_scenes,
    render_scene,
    rle_decode,
    rle_encode,
)
