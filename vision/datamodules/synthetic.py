"""The offline data every quickstart trains on, generated on first use, deterministic in its parameters.

Fashion-MNIST scenes (:func:`make_fashion_scenes`): an offline detection / instance / semantic segmentation set.

Several Fashion-MNIST garments are pasted onto a noisy canvas at varied scales, tints and positions,
partly overlapping (a later item occludes an earlier one). Each scene is written once, in the layouts
the real datasets use, so the detection and segmentation datamodules read it like COCO or ADE20K::

    <root>/images/<split>/<id>.png               RGB canvas
    <root>/masks/<split>/<id>.png                semantic mask: 0 background, 1 + Fashion-MNIST class
    <root>/annotations/instances_<split>.json    COCO instances: xywh boxes, uncompressed-RLE masks
    <root>/scenes.json                           the generation parameters (the cache key)

Generation is deterministic in its parameters and idempotent: a root whose ``scenes.json`` matches is
reused, anything else is regenerated into a temporary folder and moved into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .classes import FASHION_MNIST_CLASSES
from .readers import read_idx

CLASSES = FASHION_MNIST_CLASSES
FOREGROUND = 32  # a garment pixel is one brighter than this in the resized 0-255 item

# Source garments per split: training scenes never reuse validation or test garments.
_SOURCES = {"train": ("train", 0, 50_000), "val": ("train", 50_000, 60_000), "test": ("t10k", 0, 10_000)}


def rle_encode(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a binary HxW mask (column-major runs, starting with a zero run)."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def rle_decode(rle: dict) -> np.ndarray:
    """Inverse of :func:`rle_encode` (uncompressed RLE only)."""
    h, w = rle["size"]
    values = np.arange(len(rle["counts"])) % 2
    flat = np.repeat(values.astype(np.uint8), rle["counts"])
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {h}x{w}={h * w}")
    return flat.reshape((h, w), order="F")


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def render_scene(garments: np.ndarray, labels: np.ndarray, rng: np.random.Generator, canvas: int,
                 items: tuple[int, int], size: tuple[int, int], max_box_iou: float = 0.5,
                 max_hidden: float = 0.4) -> tuple[np.ndarray, np.ndarray, list]:
    """One scene: ``(RGB image HxWx3 uint8, semantic mask HxW uint8, [(class, visible mask)])``.

    An item is placed where its box overlaps every earlier box by at most ``max_box_iou`` (IoU) and it hides
    at most ``max_hidden`` of any earlier item's visible pixels (20 tries, else the scene has fewer items)."""
    image = rng.normal(rng.uniform(10, 50), 8, (canvas, canvas, 1)).clip(0, 255) * np.ones(3)
    owner = np.full((canvas, canvas), -1, dtype=np.int64)  # which placed item each pixel shows
    placed: list[tuple[int, tuple[int, int, int, int], int]] = []  # (class, box, full area)
    for _ in range(rng.integers(items[0], items[1] + 1)):
        pick = rng.integers(len(garments))
        side = int(rng.integers(size[0], size[1] + 1))
        item = np.asarray(Image.fromarray(garments[pick]).resize((side, side), Image.BILINEAR), dtype=np.float64)
        item_mask = item > FOREGROUND
        if item_mask.sum() < 16:
            continue
        for _attempt in range(20):
            x, y = (int(v) for v in rng.integers(0, canvas - side + 1, 2))
            ys, xs = np.nonzero(item_mask)
            box = (x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1)
            region = owner[y:y + side, x:x + side]
            hidden = np.bincount(region[item_mask & (region >= 0)], minlength=len(placed))
            visible = np.bincount(owner[owner >= 0], minlength=len(placed))
            if all(_box_iou(box, b) <= max_box_iou for _, b, _ in placed) and \
                    all(hidden[i] <= max_hidden * visible[i] for i in range(len(placed))):
                break
        else:
            continue  # no free spot: leave the scene with fewer items
        tint = rng.uniform(0.45, 1.0, 3)
        patch = image[y:y + side, x:x + side]
        patch[item_mask] = item[item_mask][:, None] * tint
        region[item_mask] = len(placed)
        placed.append((int(labels[pick]), box, int(item_mask.sum())))

    semantic = np.zeros((canvas, canvas), dtype=np.uint8)
    instances = []
    for index, (label, _, _) in enumerate(placed):
        mask = owner == index
        semantic[mask] = label + 1
        instances.append((label, mask))
    return image.round().astype(np.uint8), semantic, instances


def _coco_annotations(mask: np.ndarray, label: int, image_id: int, ann_id: int) -> dict:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {
        "id": ann_id, "image_id": image_id, "category_id": label + 1, "iscrowd": 0,
        "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
        "area": int(mask.sum()), "segmentation": rle_encode(mask),
    }


def make_fashion_scenes(
    root: str | Path,
    fashion_root: str | Path,
    splits: dict[str, int] | None = None,
    canvas: int = 128,
    items: tuple[int, int] = (2, 5),
    size: tuple[int, int] = (28, 64),
    seed: int = 0,
    max_box_iou: float = 0.5,
    max_hidden: float = 0.4,
) -> Path:
    """Write (or reuse) the scene set under ``root``; returns ``root``.

    Args:
        root: output folder (a cache; safe to delete).
        fashion_root: folder with Fashion-MNIST's idx files (``data/fashion-mnist``).
        splits: number of scenes per split, default ``{"train": 2000, "val": 200, "test": 200}``.
        canvas: scene side in pixels. items: min/max garments per scene. size: min/max garment side.
        max_box_iou, max_hidden: how much items may overlap (see :func:`render_scene`).
        seed: the scenes depend only on this and the arguments above.
    """
    root, fashion_root = Path(root), Path(fashion_root)
    splits = dict(splits or {"train": 2000, "val": 200, "test": 200})
    unknown = set(splits) - set(_SOURCES)
    if unknown:
        raise ValueError(f"unknown scene split(s) {sorted(unknown)}; choose from {sorted(_SOURCES)}")
    if not canvas > size[1] >= size[0] > 0 or not items[1] >= items[0] > 0:
        raise ValueError(f"need canvas > size[1] >= size[0] > 0 and items[1] >= items[0] > 0; got "
                         f"canvas={canvas}, size={size}, items={items}")
    params = {"version": 1, "splits": splits, "canvas": canvas, "items": list(items), "size": list(size),
              "seed": seed}
    if (max_box_iou, max_hidden) != (0.5, 0.4):  # the defaults keep the caches written before these options
        params.update(max_box_iou=max_box_iou, max_hidden=max_hidden)
    marker = root / "scenes.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root

    sources = {}
    for name in {s for s, _, _ in _SOURCES.values()}:
        files = [fashion_root / f"{name}-images-idx3-ubyte.gz", fashion_root / f"{name}-labels-idx1-ubyte.gz"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"Fashion-MNIST files not found: {', '.join(missing)} (data/fashion-mnist "
                                    "embeds them; see data/README.md)")
        sources[name] = tuple(read_idx(f) for f in files)

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        categories = [{"id": i + 1, "name": name, "supercategory": "garment"} for i, name in enumerate(CLASSES)]
        for split_index, (split, count) in enumerate(sorted(splits.items())):
            source, start, stop = _SOURCES[split]
            garments, labels = (a[start:stop] for a in sources[source])
            rng = np.random.default_rng([seed, split_index])
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "masks" / split).mkdir(parents=True)
            images, annotations = [], []
            for image_id in range(1, count + 1):
                image, semantic, instances = render_scene(garments, labels, rng, canvas, items, size, max_box_iou,
                                                          max_hidden)
                name = f"{image_id:06d}.png"
                Image.fromarray(image).save(tmp / "images" / split / name)
                Image.fromarray(semantic).save(tmp / "masks" / split / name)
                images.append({"id": image_id, "file_name": name, "height": canvas, "width": canvas})
                for label, mask in instances:
                    annotations.append(_coco_annotations(mask, label, image_id, len(annotations) + 1))
            (tmp / "annotations").mkdir(exist_ok=True)
            coco = {"images": images, "annotations": annotations, "categories": categories}
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        (tmp / "scenes.json").write_text(json.dumps(params))
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


# ---- medical: MONAI synthetic volumes (Decathlon layout) and 2-D images (Kvasir-SEG layout) ------------


def _generated(root: Path, params: dict, index: str) -> bool:
    """Whether ``root`` already holds the synthetic set made with ``params``; refuse to overwrite real data."""
    path = root / index
    if not path.exists():
        return False
    try:
        stored = json.loads(path.read_text()).get("synthetic")
    except (json.JSONDecodeError, AttributeError):
        stored = None
    if stored is None:
        raise FileExistsError(f"{path} is not a synthetic set: set data.synthetic=null to read the data in {root}")
    return stored == params


def _fresh(root: Path, folders: tuple[str, ...]) -> None:
    for name in folders:
        shutil.rmtree(root / name, ignore_errors=True)
        (root / name).mkdir(parents=True)
    (root / ".gitignore").write_text("*\n")  # generated data stays out of the repository


def _finish(root: Path, index: str, content: dict) -> None:
    tmp = root / f".{index}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(content, indent=1))
    tmp.replace(root / index)  # the index appears last, so a half-written set is regenerated


def write_synthetic_decathlon(root: str | Path, num_cases: int = 16, size: int = 64, num_classes: int = 3,
                              num_objs: int = 6, rad_max: int = 12, noise: float = 0.3, seed: int = 0) -> Path:
    """Write MONAI ``create_test_image_3d`` volumes as a Decathlon task (``dataset.json``, ``imagesTr``,
    ``labelsTr``, NIfTI) into ``root``: ``num_classes - 1`` sphere classes told apart by intensity.

    Deterministic in ``seed``; a second call with the same arguments does nothing. Every volume holds
    every class (redrawn otherwise): the generator rescales intensities per volume, so a missing class
    would shift the others' intensities. The affine (1.5 x 1.5 x 2 mm, LPS-flipped axes) exercises
    orientation and spacing.
    """
    import nibabel as nib
    from monai.data import create_test_image_3d

    root = Path(root).expanduser()
    params = dict(num_cases=num_cases, size=size, num_classes=num_classes, num_objs=num_objs, rad_max=rad_max,
                  noise=noise, seed=seed)
    if _generated(root, params, "dataset.json"):
        return root
    if size <= 2 * rad_max:
        raise ValueError(f"synthetic size={size} must exceed 2 * rad_max={2 * rad_max}")
    _fresh(root, ("imagesTr", "labelsTr"))
    affine = np.diag([-1.5, -1.5, 2.0, 1.0])
    rng = np.random.RandomState(seed)
    training = []
    for i in range(num_cases):
        while True:
            image, label = create_test_image_3d(size, size, size, num_objs=num_objs, rad_max=rad_max, rad_min=4,
                                                noise_max=noise, num_seg_classes=num_classes - 1, random_state=rng)
            if len(np.unique(label)) == num_classes:
                break
        name = f"synthetic_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    _finish(root, "dataset.json", {
        "name": "Synthetic", "description": "MONAI create_test_image_3d spheres (vision.datamodules.medical)",
        "tensorImageSize": "3D", "modality": {"0": "synthetic"},
        "labels": {"0": "background", **{str(k): f"class_{k}" for k in range(1, num_classes)}},
        "numTraining": num_cases, "numTest": 0, "training": training, "test": [], "synthetic": params,
    })
    return root


def write_synthetic_masks(root: str | Path, num_images: int = 64, size: int = 96, num_objs: int = 4,
                          rad_max: int = 16, noise: float = 0.3, seed: int = 0) -> Path:
    """Write MONAI ``create_test_image_2d`` images (RGB PNG) and binary masks (0/255 PNG) as
    ``root/images`` + ``root/masks``, the Kvasir-SEG layout. Deterministic and idempotent."""
    from monai.data import create_test_image_2d

    root = Path(root).expanduser()
    params = dict(num_images=num_images, size=size, num_objs=num_objs, rad_max=rad_max, noise=noise, seed=seed)
    if _generated(root, params, "synthetic.json"):
        return root
    _fresh(root, ("images", "masks"))
    rng = np.random.RandomState(seed)
    tint = np.array([1.0, 0.55, 0.45])  # reddish, polyp-like
    for i in range(num_images):
        image, label = create_test_image_2d(size, size, num_objs=num_objs, rad_max=rad_max, rad_min=5,
                                            noise_max=noise, num_seg_classes=1, random_state=rng)
        rgb = (np.clip(image[..., None] * tint, 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"synthetic_{i:03d}.png")
        Image.fromarray((label > 0).astype(np.uint8) * 255).save(root / "masks" / f"synthetic_{i:03d}.png")
    _finish(root, "synthetic.json", {"description": "MONAI create_test_image_2d discs", "synthetic": params})
    return root
