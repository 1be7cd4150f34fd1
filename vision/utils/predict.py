"""``predict.py``: a checkpoint alone (its saved model and data configs, class names) on images, folders or
globs; writes ``predictions.csv`` / ``predictions.json`` and an image folder into the run directory."""

from __future__ import annotations

import colorsys
import csv
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, default_collate

from .checkpoint import load_checkpoint_file

log = logging.getLogger("vision")


def predict_transform(datamodule: Any):
    """The datamodule's ``predict_transform()``, else its evaluation ``transforms(train=False)``, else None
    (float images in [0, 1]: detectors resize and normalise themselves)."""
    if hasattr(datamodule, "predict_transform"):
        return datamodule.predict_transform()
    if hasattr(datamodule, "transforms"):
        return datamodule.transforms(train=False)
    return None


def palette(count: int) -> np.ndarray:
    """``count`` distinct RGB colours (class 0 of segmentations, usually background, is black)."""
    colours = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 1.0) for i in range(count)]
    out = (np.asarray(colours) * 255).astype(np.uint8).reshape(-1, 3)
    if count:
        out[0] = 0
    return out


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Predict ``cfg.inputs`` with ``cfg.ckpt_path``; returns the output paths and the per-image results."""
    from ..datamodules.predict import PredictImages, find_images
    from .pipeline import checkpoint_file

    ckpt = checkpoint_file(cfg)
    state = load_checkpoint_file(ckpt)
    record = state.get("run_record") or {}
    saved = record.get("config") or {}
    if not saved:
        raise ValueError(f"{ckpt} holds no run config (it was written before checkpoints saved theirs); "
                         "evaluate it with eval.py and the training overrides, or retrain")
    model_cfg, data_cfg = OmegaConf.create(saved["model"]), OmegaConf.create(saved["data"])
    if len(model_cfg.get("roi_size") or ()) == 3:
        raise ValueError(f"{ckpt} is a 3-D (volume) model; predict.py reads 2-D images: evaluate volumes with eval.py")
    model = hydra.utils.instantiate(model_cfg)
    model.load_state_dict(state["state_dict"])
    datamodule = hydra.utils.instantiate(data_cfg)
    in_chans = int(data_cfg.get("in_chans", data_cfg.get("in_channels", 3)))
    paths = find_images(OmegaConf.to_container(cfg.inputs) if OmegaConf.is_config(cfg.inputs) else cfg.inputs)

    dataset = PredictImages(paths, predict_transform(datamodule), in_chans)
    # classification transforms give one size, so images batch; dense tasks keep each image's own size
    classify = "ClassificationModule" in str(model_cfg.get("_target_", ""))
    loader = DataLoader(dataset, batch_size=int(cfg.batch_size) if classify else 1, num_workers=int(cfg.num_workers),
                        collate_fn=default_collate)
    trainer = L.Trainer(accelerator=cfg.get("accelerator", "auto"), devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False)
    batches = trainer.predict(model, dataloaders=loader)

    out = Path(str(cfg.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    num_classes = int(model_cfg.get("num_classes", 0))
    names = list(record.get("class_names") or getattr(datamodule, "class_names", None) or [])
    if len(names) != num_classes:
        names = [f"class_{i}" for i in range(num_classes)]
    kind = next(iter(batches[0])) if batches else "probs"
    writer = {"probs": _write_classes, "masks": _write_masks, "detections": _write_boxes}[kind]
    results = writer(batches, paths, names, out, cfg)
    (out / "predictions.json").write_text(json.dumps(results, indent=1))
    print(f"predictions for {len(paths)} image(s): {out / 'predictions.csv'}, {out / 'predictions.json'}", flush=True)
    return {"output_dir": str(out), "results": results}


def _write_classes(batches, paths, names, out: Path, cfg: DictConfig) -> list[dict]:
    probs = torch.cat([b["probs"] for b in batches]).cpu()
    k = min(int(cfg.top_k), probs.shape[1])
    top = probs.topk(k, dim=1)
    results = [{"path": str(path), "top_k": [{"label": int(i), "class": names[int(i)], "prob": float(p)}
                                            for p, i in zip(values, indices)]}
               for path, values, indices in zip(paths, top.values, top.indices)]
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *[c for r in range(1, k + 1) for c in (f"class_{r}", f"label_{r}", f"prob_{r}")]])
        for result in results:
            writer.writerow([result["path"], *[v for t in result["top_k"]
                                               for v in (t["class"], t["label"], f"{t['prob']:.6f}")]])
    return results


def _write_masks(batches, paths, names, out: Path, cfg: DictConfig) -> list[dict]:
    masks_dir, overlay_dir = out / "masks", out / "overlays"
    masks_dir.mkdir(exist_ok=True)
    overlay_dir.mkdir(exist_ok=True)
    colours = palette(len(names))
    masks = [m.cpu().numpy() for b in batches for m in b["masks"]]
    results = []
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "mask", "overlay", "classes"])
        for i, (path, mask) in enumerate(zip(paths, masks)):
            stem = f"{i:05d}_{path.stem}"
            mask_file, overlay_file = masks_dir / f"{stem}.png", overlay_dir / f"{stem}.png"
            Image.fromarray(mask.astype(np.uint8 if len(names) <= 256 else np.uint16)).save(mask_file)
            image = np.asarray(_rgb(path), dtype=np.float32)
            blend = np.where(mask[..., None] > 0, 0.5 * image + 0.5 * colours[mask], image)
            Image.fromarray(blend.astype(np.uint8)).save(overlay_file)
            ids, counts = np.unique(mask, return_counts=True)
            shares = {names[int(c)]: round(float(n) / mask.size, 6) for c, n in zip(ids, counts)}
            results.append({"path": str(path), "mask": str(mask_file), "overlay": str(overlay_file), "classes": shares})
            writer.writerow([path, mask_file, overlay_file,
                             "; ".join(f"{n} {100 * s:.1f}%" for n, s in sorted(shares.items(), key=lambda x: -x[1]))])
    return results


def _write_boxes(batches, paths, names, out: Path, cfg: DictConfig) -> list[dict]:
    overlay_dir = out / "overlays"
    overlay_dir.mkdir(exist_ok=True)
    colours = palette(len(names) + 1)
    detections = [d for b in batches for d in b["detections"]]
    threshold = float(cfg.get("score_threshold", 0.0))
    results = []
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "label", "score", "x1", "y1", "x2", "y2"])
        for i, (path, det) in enumerate(zip(paths, detections)):
            image = _rgb(path)
            draw = ImageDraw.Draw(image)
            boxes = []
            for box, label, score in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist()):
                if score < threshold:
                    continue
                name = names[label - 1] if 0 < label <= len(names) else f"class_{label}"
                boxes.append({"class": name, "label": int(label), "score": float(score), "box_xyxy": box})
                writer.writerow([path, name, label, f"{score:.6f}", *(f"{v:.2f}" for v in box)])
                colour = tuple(int(c) for c in colours[label % len(colours)])
                draw.rectangle(box, outline=colour, width=2)
                draw.text((box[0] + 2, box[1] + 1), f"{name} {score:.2f}", fill=colour)
            overlay_file = overlay_dir / f"{i:05d}_{path.stem}.png"
            image.save(overlay_file)
            results.append({"path": str(path), "overlay": str(overlay_file), "detections": boxes})
    return results
