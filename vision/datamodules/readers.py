"""Readers: files on disk to checked numpy arrays and lists of samples, one place per dataset layout.

Every check on a sample (readable image, index mask of the image's size, values within the classes, matching
volume affines) lives here and raises a :class:`BadSampleError` naming the file, so the project-wide
``data.on_bad_sample`` policy has one exception family to act on. Layout discovery (which image goes with
which mask, which case belongs to which patient) raises ``FileNotFoundError``/``ValueError`` naming the path.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .classes import IGNORE_INDEX

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class BadSampleError(RuntimeError):
    """A sample that cannot be used: unreadable or truncated image, empty or malformed annotation, a mask
    with unexpected values. The message names the file."""


class CorruptImageError(BadSampleError):
    """An image file that cannot be decoded."""


class SegmentationDataError(BadSampleError, ValueError):
    """A sample that cannot be used as it is: the message names the file(s) and what is wrong."""


class InvalidCaseError(BadSampleError, ValueError):
    """A case (volume or image with its label) that cannot be used as it is; the message names it. A bad
    sample: ``data.on_bad_sample=skip`` drops the case instead (warned, counted)."""


# ---- images, masks, boxes, idx files -------------------------------------------------------------------


def read_image(path: str | Path, mode: str = "RGB") -> np.ndarray:
    """An image file as an ``HWC`` uint8 array; unreadable or truncated files raise :class:`CorruptImageError`."""
    try:
        with Image.open(path) as img:
            image = np.asarray(img.convert(mode))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise CorruptImageError(f"unreadable image {path}: {err}") from err
    return image[..., None] if image.ndim == 2 else image


def check_mask(mask: np.ndarray, allowed: Sequence[int], path: str | Path) -> np.ndarray:
    """A label mask whose values are all in ``allowed`` (e.g. class ids plus an ignore index)."""
    unexpected = np.setdiff1d(np.unique(mask), np.asarray(allowed))
    if unexpected.size:
        raise BadSampleError(f"mask {path} has unexpected values {unexpected[:8].tolist()} (allowed {list(allowed)})")
    return mask


def check_boxes(boxes: np.ndarray, path: str | Path, allow_empty: bool = False) -> np.ndarray:
    """``[N, 4]`` finite ``x1, y1, x2, y2`` boxes with positive width and height."""
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.size == 0 and not allow_empty:
        raise BadSampleError(f"annotation {path} has no boxes")
    boxes = boxes.reshape(-1, 4) if boxes.size == 0 else boxes
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise BadSampleError(f"annotation {path}: boxes of shape {list(boxes.shape)}, expected [N, 4]")
    if not np.isfinite(boxes).all() or (boxes[:, 2:] <= boxes[:, :2]).any():
        raise BadSampleError(f"annotation {path} has non-finite or empty boxes (x2 <= x1 or y2 <= y1)")
    return boxes


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST / Fashion-MNIST format), gzipped or not, as a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


# ---- semantic segmentation: one checked (image, mask) pair and the layouts that list them ----------------


def _read_image(path: Path, in_chans: int) -> np.ndarray:
    if not Path(path).is_file():
        raise FileNotFoundError(f"image file {path} is missing")  # a missing file is a layout error, not a bad sample
    return read_image(path, "L" if in_chans == 1 else "RGB")


def _read_mask(path: Path) -> np.ndarray:
    """Class ids per pixel. Palette PNGs (mode P, e.g. VOC) give their indices, not their colours; grey
    (L, I, I;16) masks give their values; RGB(A) masks are accepted only when the channels agree (a grey mask
    saved as colour), since colours have no defined class id."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            mask = np.asarray(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file {path} is missing") from None
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise CorruptImageError(f"unreadable mask {path}: {err}") from err
    if mode in ("RGB", "RGBA", "LA"):
        channels = mask[..., : 1 if mode == "LA" else 3]
        if not (channels == channels[..., :1]).all():
            raise SegmentationDataError(
                f"mask {path} is a colour ({mode}) image; expected one class id per pixel: a single-channel "
                "(mode L) or palette (mode P) PNG. Convert colours to ids first (VOC's SegmentationClass "
                "PNGs are palette images and read as ids)"
            )
        mask = channels[..., 0]
    elif mode not in ("L", "P", "I", "I;16", "1"):
        raise SegmentationDataError(f"mask {path} has unsupported image mode {mode!r}; expected L or P")
    return np.asarray(mask, dtype=np.int64)


def label_lookup(label_map: dict[int, int], ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A 256-entry table mapping stored mask ids to class ids (``label_map``); unlisted ids -> ``ignore_index``."""
    lookup = np.full(256, ignore_index, dtype=np.uint8)
    lookup[list(label_map)] = list(label_map.values())
    return lookup


def read_sample(
    image_path: Path,
    mask_path: Path,
    num_classes: int,
    in_chans: int = 3,
    reduce_zero_label: bool = False,
    ignore_index: int = IGNORE_INDEX,
    lookup: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(image HxWxC uint8, mask HxW uint8)`` with every check on the pair.

    ``lookup`` (:func:`label_lookup`) maps stored ids to class ids first, e.g. Cityscapes' ``labelIds``. ``reduce_zero_label`` (ADE20K): 0 ("other") becomes ``ignore_index`` and every
    other id moves down by one. Afterwards each mask value must be a class id ``< num_classes`` or
    ``ignore_index``.
    """
    image = _read_image(image_path, in_chans)
    mask = _read_mask(mask_path)
    if image.shape[:2] != mask.shape[:2]:
        raise SegmentationDataError(
            f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but image {image_path} is "
            f"{image.shape[1]}x{image.shape[0]}; masks must have their image's size"
        )
    if lookup is not None:
        mask = lookup[mask]
    if reduce_zero_label:
        mask = np.where(mask == 0, ignore_index, mask - 1)
        mask[mask == ignore_index - 1] = ignore_index  # the ignore value itself stays ignored
    bad = (mask >= num_classes) & (mask != ignore_index) | (mask < 0)
    if bad.any():
        values = np.unique(mask[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise SegmentationDataError(
            f"mask {mask_path} has values {shown} outside the {num_classes} classes (0..{num_classes - 1}) "
            f"and not the ignore index {ignore_index}"
            + (" (after reduce_zero_label)" if reduce_zero_label else "")
        )
    return image, mask.astype(np.uint8)


def pair_folder(
    image_root: Path, mask_root: Path, image_suffix: str | None = None, mask_suffix: str = ".png"
) -> list[tuple[Path, Path]]:
    """Every image under ``image_root`` (recursively) with the mask at the same relative path under
    ``mask_root``, its name's ``image_suffix`` (default: the extension) replaced by ``mask_suffix``."""
    if not image_root.is_dir():
        raise FileNotFoundError(f"image folder {image_root} does not exist")
    if not mask_root.is_dir():
        raise FileNotFoundError(f"mask folder {mask_root} does not exist")
    pairs, missing = [], []
    for path in sorted(image_root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or (
            image_suffix and not path.name.endswith(image_suffix)
        ):
            continue
        stem = path.name[: -len(image_suffix)] if image_suffix else path.stem
        mask = mask_root / path.parent.relative_to(image_root) / f"{stem}{mask_suffix}"
        (pairs if mask.is_file() else missing).append((path, mask))
    if missing:
        shown = "; ".join(f"{m} (for {i})" for i, m in missing[:3])
        raise FileNotFoundError(
            f"{len(missing)} image(s) under {image_root} have no mask: {shown}"
            + (" ..." if len(missing) > 3 else "")
        )
    if not pairs:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {image_root}")
    return pairs


def pair_list(
    list_file: Path, image_root: Path, mask_root: Path, image_ext: str = ".jpg", mask_ext: str = ".png"
) -> list[tuple[Path, Path]]:
    """The ids in ``list_file`` (one per line, VOC/SBD ``ImageSets`` style) as image and mask paths."""
    if not list_file.is_file():
        raise FileNotFoundError(f"split list {list_file} does not exist")
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split list {list_file} is empty")
    pairs = [(image_root / f"{i}{image_ext}", mask_root / f"{i}{mask_ext}") for i in ids]
    for kind, index in (("image", 0), ("mask", 1)):
        missing = [str(p[index]) for p in pairs if not p[index].is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} {kind}(s) listed in {list_file} are missing: "
                f"{', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")
            )
    return pairs


# ---- medical: patient-level splits, Decathlon volumes, 2-D mask folders, MedMNIST --------------------------


def split_cases(cases: list[dict], val_fraction: float, test_fraction: float, seed: int,
                patient_pattern: str | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """Train/val/test lists with every case of a patient on the same side, fixed by ``seed``.

    A case's patient is its ``case`` name, or the first group of ``patient_pattern`` (a regex searched in
    the name) when several scans belong to one patient, e.g. ``r"^(patient\\d+)_"``.
    """
    def patient(case: dict) -> str:
        if not patient_pattern:
            return case["case"]
        match = re.search(patient_pattern, case["case"])
        if match is None:
            raise InvalidCaseError(f"case {case['case']}: patient_pattern {patient_pattern!r} does not match its name")
        return match.group(1) if match.groups() else match.group(0)

    patients = sorted({patient(c) for c in cases})
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    n_test = round(test_fraction * len(order)) if test_fraction > 0 else 0
    n_val = round(val_fraction * len(order)) if val_fraction > 0 else 0
    n_test, n_val = max(n_test, test_fraction > 0), max(n_val, val_fraction > 0)  # a requested split is never empty
    if len(order) - n_test - n_val < 1:
        raise ValueError(f"{len(order)} patients cannot fill val ({n_val}), test ({n_test}) and a training split")
    test_ids, val_ids = set(order[:n_test]), set(order[n_test:n_test + n_val])
    train = [c for c in cases if patient(c) not in test_ids | val_ids]
    return train, [c for c in cases if patient(c) in val_ids], [c for c in cases if patient(c) in test_ids]


def _case_name(path: str | Path) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(path).stem


def read_decathlon(root: str | Path, num_classes: int, in_channels: int) -> list[dict]:
    """The labelled cases of ``root/dataset.json`` as ``[{"image", "label", "case"}]`` with absolute paths.

    Checks the file against the data config: the label count, the modality count, and that every listed
    file exists (a missing one is an error naming the case).
    """
    root = Path(root).expanduser()
    index = root / "dataset.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{index} not found: data.root must hold a Medical Segmentation Decathlon task (dataset.json, "
            "imagesTr/*.nii.gz, labelsTr/*.nii.gz), e.g. Task09_Spleen extracted from its .tar"
        )
    meta = json.loads(index.read_text())
    for key in ("training", "labels"):
        if key not in meta:
            raise KeyError(f"{index} has no {key!r} entry (expected the Decathlon dataset.json schema)")
    if len(meta["labels"]) != num_classes:
        raise ValueError(f"{index} lists {len(meta['labels'])} labels {meta['labels']} but data.num_classes={num_classes}")
    modalities = meta.get("modality") or {"0": "?"}
    if len(modalities) != in_channels:
        raise ValueError(f"{index} lists {len(modalities)} modalities {modalities} but data.in_channels={in_channels}")
    cases = []
    for i, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise KeyError(f"{index}: training entry {i} is {entry!r}; expected {{'image': ..., 'label': ...}}")
        image, label = (root / entry["image"]).resolve(), (root / entry["label"]).resolve()
        case = _case_name(image)
        for kind, path in (("image", image), ("label", label)):
            if not path.is_file():
                raise FileNotFoundError(f"case {case}: {kind} {path} is listed in {index} but does not exist")
        cases.append({"image": str(image), "label": str(label), "case": case})
    if not cases:
        raise ValueError(f"{index} lists no training cases")
    return cases


def check_case(image: torch.Tensor, label: torch.Tensor, case: str, in_channels: int, num_classes: int,
               image_affine=None, label_affine=None) -> None:
    """Raise :class:`InvalidCaseError` naming ``case`` unless the loaded image/label pair is usable.

    ``image`` is ``[*spatial]`` (one channel) or ``[*spatial, C]`` as read from the file, ``label`` ``[*spatial]``.
    """
    if label.ndim != 3:
        raise InvalidCaseError(f"case {case}: label has shape {tuple(label.shape)}; expected a 3-D volume")
    if image.ndim != 3 + (in_channels > 1) or (in_channels > 1 and image.shape[-1] != in_channels):
        want = "a 3-D volume" if in_channels == 1 else f"a 4-D volume with {in_channels} channels last"
        raise InvalidCaseError(
            f"case {case}: image has shape {tuple(image.shape)}; expected {want} (data.in_channels={in_channels})"
        )
    if tuple(image.shape[:3]) != tuple(label.shape):
        raise InvalidCaseError(
            f"case {case}: image shape {tuple(image.shape)} and label shape {tuple(label.shape)} differ"
        )
    if image_affine is not None and label_affine is not None:
        a, b = np.asarray(image_affine, dtype=np.float64), np.asarray(label_affine, dtype=np.float64)
        if not np.allclose(a, b, atol=1e-3):
            raise InvalidCaseError(f"case {case}: image and label affines differ:\n{a}\nvs\n{b}")
    nans = int(torch.isnan(torch.as_tensor(image)).sum())
    if nans:
        raise InvalidCaseError(f"case {case}: image has {nans} NaN voxels")
    values = torch.unique(torch.as_tensor(label))
    bad = values[(values != values.round()) | (values < 0) | (values >= num_classes)]
    if len(bad):
        raise InvalidCaseError(
            f"case {case}: label values {bad.tolist()[:10]} are outside the classes 0..{num_classes - 1} "
            f"(data.num_classes={num_classes})"
        )


def read_mask_folder(root: str | Path) -> list[dict]:
    """``root/images/<name>.<ext>`` paired with ``root/masks/<name>.<any image ext>``."""
    root = Path(root).expanduser()
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise FileNotFoundError(
            f"data.root={root} must contain images/ and masks/ with one mask per image under the same name "
            "(the Kvasir-SEG layout)"
        )
    masks = {_case_name(p): p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    cases = []
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        case = _case_name(path)
        if case not in masks:
            raise FileNotFoundError(f"case {case}: image {path} has no mask in {masks_dir}")
        cases.append({"image": str(path), "label": str(masks[case]), "case": case})
    if not cases:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {images_dir}")
    return cases


def read_medmnist(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images, labels)}`` from a MedMNIST ``.npz`` (keys ``<split>_images``, ``<split>_labels``).

    2-D images are ``[N, H, W]`` or ``[N, H, W, 3]``; 3-D ones ``[N, D, H, W]`` are returned as
    ``[N, H, W, D]`` (slices as channels: the MedMNIST "2.5-D" baseline). Labels ``[N, 1]`` become ``[N]``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"MedMNIST file {path} not found: download <flag>[_<size>].npz from the MedMNIST Zenodo record "
            "(or `python -m medmnist download`, into ~/.medmnist) and set data.root to its folder; see data/README.md"
        )
    with np.load(path) as npz:
        missing = [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels") if f"{s}_{k}" not in npz]
        if missing:
            raise KeyError(f"{path} lacks {missing}; found {sorted(npz.files)} (not a MedMNIST file?)")
        out = {}
        for split in ("train", "val", "test"):
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            if labels.ndim == 2 and labels.shape[1] != 1:
                raise ValueError(f"{path}: {split}_labels has shape {labels.shape}: multi-label tasks (ChestMNIST) "
                                 "are not single-label classification")
            if images.ndim == 4 and images.shape[-1] not in (1, 3):  # [N, D, H, W] volumes
                images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
            elif images.ndim not in (3, 4):
                raise ValueError(f"{path}: {split}_images has shape {images.shape}; expected [N,H,W], [N,H,W,3] "
                                 "or [N,D,H,W]")
            if images.dtype != np.uint8:
                raise ValueError(f"{path}: {split}_images is {images.dtype}; MedMNIST stores uint8")
            out[split] = (images, labels.reshape(len(labels)))
    return out
