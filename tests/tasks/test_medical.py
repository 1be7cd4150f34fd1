"""Medical imaging: readers and their bad inputs, synthetic sets, 2.5-D slicing, Dice/HD95 on known masks,
and a training step of every medical experiment (offline, tiny data)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from _resume import assert_resumes_mid_epoch
from PIL import Image

from vision.datamodules.classification import MedMNISTDataModule
from vision.datamodules.medical import DecathlonDataModule, MaskFolderDataModule
from vision.datamodules.readers import InvalidCaseError, check_case, read_medmnist, split_cases
from vision.datamodules.synthetic import write_synthetic_decathlon, write_synthetic_masks
from vision.datamodules.transforms import load_case_transform
from vision.tasks.medical import (
    MedicalSegmentationModule,
    SliceWise,
    case_metrics,
    create_network,
    slice_stacks,
)
from vision.utils import train

QUICK = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true", "data.num_workers=0",
         "callbacks.rich_progress_bar=null", "trainer.fast_dev_run=true"]
TINY3D = dict(num_cases=6, size=32, num_classes=3, num_objs=3, rad_max=6, seed=1)


@pytest.fixture(scope="module")
def decathlon(tmp_path_factory) -> Path:
    return write_synthetic_decathlon(tmp_path_factory.mktemp("msd") / "task", **TINY3D)


def copy_task(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def datamodule(root: Path, **kw) -> DecathlonDataModule:
    args = dict(num_classes=3, patch_size=(32, 32, 8), num_samples=2, batch_size=2, num_workers=0,
                crop_foreground=False, val_fraction=0.2, test_fraction=0.2)
    return DecathlonDataModule(str(root), **{**args, **kw})


# ---- synthetic sets --------------------------------------------------------------------------------

def test_synthetic_decathlon_is_deterministic_idempotent_and_complete(decathlon, tmp_path):
    meta = json.loads((decathlon / "dataset.json").read_text())
    assert meta["numTraining"] == len(meta["training"]) == 6 and len(meta["labels"]) == 3
    first = decathlon / meta["training"][0]["label"]
    stamp = first.stat().st_mtime_ns
    write_synthetic_decathlon(decathlon, **TINY3D)  # same arguments: nothing rewritten
    assert first.stat().st_mtime_ns == stamp
    other = write_synthetic_decathlon(tmp_path / "again", **TINY3D)
    for entry in meta["training"]:
        for key in ("image", "label"):
            a, b = nib.load(decathlon / entry[key]), nib.load(other / entry[key])
            np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
            np.testing.assert_array_equal(a.affine, b.affine)
        assert set(np.unique(np.asarray(nib.load(decathlon / entry["label"]).dataobj))) == {0, 1, 2}


def test_synthetic_writer_refuses_real_data(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "Spleen", "training": []}))
    with pytest.raises(FileExistsError, match="data.synthetic=null"):
        write_synthetic_decathlon(tmp_path, **TINY3D)


# ---- Decathlon reader and its bad inputs -----------------------------------------------------------

def test_decathlon_batches_and_patient_split(decathlon):
    dm = datamodule(decathlon)
    dm.setup()
    names = {split: {c["case"] for c in cases} for split, cases in dm.cases.items()}
    assert len(names["val"]) == len(names["test"]) == 1 and len(names["train"]) == 4
    assert not (names["train"] & names["val"]) and not (names["train"] & names["test"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 32, 32, 8) and batch["label"].shape == (4, 1, 32, 32, 8)
    volume = next(iter(dm.val_dataloader()))
    assert volume["image"].shape == (1, 1, 32, 32, 32)
    assert torch.allclose(volume["image"].affine[0].diagonal()[:3].double(), torch.tensor([1.5, 1.5, 2.0]).double())
    assert abs(float(volume["image"].mean())) < 0.2  # z-scored


def test_split_keeps_a_patients_scans_together():
    cases = [{"case": f"patient{p}_scan{s}"} for p in range(6) for s in range(3)]
    train_, val, test = split_cases(cases, 0.2, 0.2, seed=3, patient_pattern=r"^(patient\d+)_")
    patients = [{c["case"].split("_")[0] for c in part} for part in (train_, val, test)]
    assert all(len(part) % 3 == 0 for part in (train_, val, test))
    assert not (patients[0] & patients[1]) and not (patients[0] & patients[2]) and not (patients[1] & patients[2])
    assert split_cases(cases, 0.2, 0.2, seed=3, patient_pattern=r"^(patient\d+)_") == (train_, val, test)


def _rewrite(root: Path, index: int, image=None, label=None, image_affine=None):
    meta = json.loads((root / "dataset.json").read_text())
    entry = meta["training"][index]
    if image is not None:
        nib.save(nib.Nifti1Image(image, image_affine if image_affine is not None else np.diag([-1.5, -1.5, 2, 1])),
                 root / entry["image"])
    if label is not None:
        nib.save(nib.Nifti1Image(label, np.diag([-1.5, -1.5, 2, 1])), root / entry["label"])
    return Path(entry["image"]).name.removesuffix(".nii.gz")


BAD_CASES = {
    "shape": (dict(label=np.zeros((32, 32, 30), np.uint8)), "shape"),
    "affine": (dict(image=np.zeros((32, 32, 32), np.float32), image_affine=np.diag([1.0, 1.0, 1.0, 1.0])), "affines"),
    "label values": (dict(label=np.full((32, 32, 32), 7, np.uint8)), "outside the classes"),
    "nan": (dict(image=np.full((32, 32, 32), np.nan, np.float32)), "NaN"),
    "4-D": (dict(image=np.zeros((32, 32, 32, 2), np.float32)), "3-D volume"),
}


@pytest.mark.parametrize("kind", list(BAD_CASES))
def test_bad_volume_is_an_error_naming_the_case(decathlon, tmp_path, kind):
    root = copy_task(decathlon, tmp_path / "task")
    change, message = BAD_CASES[kind]
    case = _rewrite(root, 2, **change)
    with pytest.raises(InvalidCaseError, match=f"case {case}.*{message}"):
        datamodule(root, synthetic=None).setup()


def test_bad_volumes_are_skipped_on_request(decathlon, tmp_path):
    root = copy_task(decathlon, tmp_path / "task")
    bad_values = _rewrite(root, 2, label=np.full((32, 32, 32), 7, np.uint8))
    meta = json.loads((root / "dataset.json").read_text())
    (root / meta["training"][4]["image"]).write_bytes(b"not a NIfTI file")
    unreadable = Path(meta["training"][4]["image"]).name.removesuffix(".nii.gz")
    with pytest.raises(InvalidCaseError, match=f"case ({bad_values}: label values|{unreadable}: cannot read)"):
        datamodule(root, synthetic=None).setup()  # the first bad case met stops
    case = {**meta["training"][4], "case": unreadable}
    case = {k: str(root / v) if k != "case" else v for k, v in case.items()}
    with pytest.raises(InvalidCaseError, match=f"case {unreadable}: cannot read image .*{unreadable}.nii.gz"):
        load_case_transform(1, 3)(case)
    dm = datamodule(root, synthetic=None, on_bad_sample="skip")
    with pytest.warns(UserWarning, match="skipping case") as warned:
        dm.setup()
    assert dm.skipped == 2 and len(warned) == 2
    kept = {c["case"] for cases in dm.cases.values() for c in cases}
    assert len(kept) == 4 and not kept & {bad_values, unreadable}
    assert next(iter(dm.train_dataloader()))["image"].shape[0] == 4


@pytest.mark.parametrize("kind", ["decathlon", "mask folder"])
def test_training_loader_resumes_mid_epoch_with_the_same_patches(decathlon, masks2d, kind):
    def loader():
        if kind == "decathlon":
            dm = datamodule(decathlon, batch_size=1)
        else:
            dm = MaskFolderDataModule(str(masks2d), patch_size=(32, 32), batch_size=2, num_workers=0,
                                      val_fraction=0.2, test_fraction=0.2)
        dm.setup()
        return dm.train_dataloader()

    assert_resumes_mid_epoch(loader, lambda batch: batch["image"])


def test_missing_listed_file_names_the_case(decathlon, tmp_path):
    root = copy_task(decathlon, tmp_path / "task")
    meta = json.loads((root / "dataset.json").read_text())
    (root / meta["training"][1]["label"]).unlink()
    with pytest.raises(FileNotFoundError, match="case synthetic_001: label .* does not exist"):
        datamodule(root).setup()


def test_dataset_json_must_match_the_config(decathlon):
    with pytest.raises(ValueError, match="3 labels .* data.num_classes=2"):
        datamodule(decathlon, num_classes=2).setup()


def test_check_case_accepts_multichannel_volumes():
    check_case(torch.zeros(8, 8, 8, 2), torch.zeros(8, 8, 8), "c", in_channels=2, num_classes=2)
    with pytest.raises(InvalidCaseError, match="case c: image has shape \\(8, 8, 8\\); expected a 4-D volume"):
        check_case(torch.zeros(8, 8, 8), torch.zeros(8, 8, 8), "c", in_channels=2, num_classes=2)


# ---- 2-D mask folders ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def masks2d(tmp_path_factory) -> Path:
    return write_synthetic_masks(tmp_path_factory.mktemp("masks") / "set", num_images=12, size=48, rad_max=8)


def test_mask_folder_batches(masks2d):
    dm = MaskFolderDataModule(str(masks2d), patch_size=(32, 32), batch_size=4, num_workers=0,
                              val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].shape == (4, 1, 32, 32)
    assert set(batch["label"].unique().tolist()) <= {0, 1}
    assert next(iter(dm.val_dataloader()))["label"].sum() > 0


def test_mask_folder_bad_inputs(masks2d, tmp_path):
    import shutil

    root = Path(shutil.copytree(masks2d, tmp_path / "set"))
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(root / "masks" / "synthetic_003.png")
    dm = MaskFolderDataModule(str(root), patch_size=(32, 32), batch_size=2, num_workers=0, val_fraction=0,
                              test_fraction=0)
    dm.setup()
    index = [c["case"] for c in dm.train_set.cases].index("synthetic_003")
    with pytest.raises(InvalidCaseError, match="case synthetic_003: image .* is \\(48, 48\\) but mask"):
        dm.train_set[index]
    Image.fromarray(np.full((48, 48), 9, np.uint8)).save(root / "masks" / "synthetic_003.png")
    dm = MaskFolderDataModule(str(root), patch_size=(32, 32), batch_size=2, num_workers=0, binary_masks=False,
                              val_fraction=0, test_fraction=0)
    dm.setup()
    with pytest.raises(InvalidCaseError, match="case synthetic_003: mask .* values \\[9\\] outside"):
        dm.train_set[index]
    good = (root / "images" / "synthetic_004.png").read_bytes()
    (root / "images" / "synthetic_004.png").write_bytes(good[: len(good) // 2])
    dm = MaskFolderDataModule(str(root), patch_size=(32, 32), batch_size=2, num_workers=0, val_fraction=0,
                              test_fraction=0, on_bad_sample="skip")
    dm.setup()
    with pytest.warns(UserWarning, match="skipping"):
        batches = list(dm._loader(dm.train_set, train=False))
    seen = sum(len(batch["case"]) for batch in batches if batch is not None)  # None: a batch of bad cases only
    assert dm.skipped == 1 and seen == len(dm.train_set) - 1
    (root / "masks" / "synthetic_005.png").unlink()
    with pytest.raises(FileNotFoundError, match="case synthetic_005: image .* has no mask"):
        MaskFolderDataModule(str(root), num_workers=0).setup()


# ---- MedMNIST --------------------------------------------------------------------------------------

def write_medmnist(path: Path, shape: tuple[int, ...], classes: int, n: int = 16, label_cols: int = 1) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, classes, (n, label_cols))
    np.savez(path, **arrays)
    return path


def test_medmnist_2d_and_3d(tmp_path):
    write_medmnist(tmp_path / "pathmnist.npz", (28, 28, 3), 9)
    dm = MedMNISTDataModule(str(tmp_path), flag="pathmnist", num_classes=9, in_chans=3, image_size=28,
                            batch_size=4, num_workers=0, backbone="resnet18", mean=[0.5], std=[0.5])
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 28, 28) and labels.dtype == torch.int64
    write_medmnist(tmp_path / "organmnist3d_64.npz", (64, 64, 64), 11, n=4)
    splits = read_medmnist(tmp_path / "organmnist3d_64.npz")
    assert splits["train"][0].shape == (4, 64, 64, 64) and splits["train"][1].shape == (4,)
    dm3 = MedMNISTDataModule(str(tmp_path), flag="organmnist3d", size=64, num_classes=11, in_chans=1,
                             image_size=64, batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match="64 channels .* data.in_chans=1"):
        dm3.setup()


def test_medmnist_bad_files(tmp_path):
    write_medmnist(tmp_path / "chestmnist.npz", (28, 28), 2, label_cols=14)
    with pytest.raises(ValueError, match="multi-label"):
        read_medmnist(tmp_path / "chestmnist.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        read_medmnist(tmp_path / "missing.npz")
    write_medmnist(tmp_path / "bloodmnist.npz", (28, 28, 3), 8)
    dm = MedMNISTDataModule(str(tmp_path), flag="bloodmnist", num_classes=4, in_chans=3, image_size=28,
                            batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match="labels span 0..7 but data.num_classes=4"):
        dm.setup()


# ---- slicing and metrics ---------------------------------------------------------------------------

def test_slice_stacks_hold_neighbours_and_slicewise_reassembles():
    volume = torch.randn(2, 2, 5, 6, 7)
    stacks = slice_stacks(volume, context=1)  # [B, D, C*3, H, W], channel order (c, neighbour)
    assert stacks.shape == (2, 7, 6, 5, 6)
    torch.testing.assert_close(stacks[1, 3, 3:6], volume[1, 1, ..., 2:5].permute(2, 0, 1))
    torch.testing.assert_close(stacks[0, 0, 0], volume[0, 0, ..., 0])  # repeated beyond the first slice
    net = torch.nn.Conv2d(6, 4, 3, padding=1)
    out = SliceWise(net, context=1, chunk=5)(volume)
    assert out.shape == (2, 4, 5, 6, 7)
    torch.testing.assert_close(out[:, :, ..., 4], net(stacks[:, 4]), atol=1e-5, rtol=1e-5)


def test_dice_and_hd95_on_known_masks():
    label = torch.zeros(1, 1, 20, 20, 20, dtype=torch.long)
    label[..., 5:15, 5:15, 5:15] = 1            # a 10^3 cube of class 1
    pred = torch.zeros_like(label)
    pred[..., 7:17, 5:15, 5:15] = 1             # the same cube shifted by 2 voxels along x
    dice, hd = case_metrics(pred, label, num_classes=3, spacing=torch.tensor([[1.5, 1.0, 2.0]]))
    assert dice[0, 0].item() == pytest.approx(2 * 8 * 100 / 2000)   # overlap 8x10x10 of two 1000-voxel cubes
    assert hd[0, 0].item() == pytest.approx(2 * 1.5)                 # every surface point moves by <= 2 voxels in x
    assert torch.isnan(dice[0, 1]) and torch.isnan(hd[0, 1])         # class 2 absent: skipped
    dice, hd = case_metrics(torch.zeros_like(label), label, num_classes=2)   # class 1 missed, pixel units
    assert dice[0, 0].item() == 0 and hd[0, 0].item() == pytest.approx((3 * 20**2) ** 0.5)  # the diagonal


def test_module_aggregates_per_class_over_cases():
    module = MedicalSegmentationModule({"name": "resnet18"}, num_classes=3, roi_size=(8, 8), network="unet",
                                       net_kwargs={"channels": [4, 8], "strides": [2]})
    module.cases["val_dice"].update(torch.tensor([[1.0, float("nan")], [0.5, 0.25]]))
    module.cases["val_hd95"].update(torch.tensor([[2.0, float("nan")], [4.0, 6.0]]))
    logged = {}
    module.log = lambda key, value, **kw: logged.__setitem__(key, float(value))
    assert module._log_cases("val") == pytest.approx((0.75 + 0.25) / 2)
    assert logged["val/dice_1"] == 0.75 and logged["val/dice_2"] == 0.25 and logged["val/hd95"] == pytest.approx(4.5)


@pytest.mark.parametrize("backbone", ["biformer_tiny"])
def test_smp_on_a_registered_backbone_trains_slicewise(backbone):
    """A backbone of this package under smp's tu- encoder, 2.5-D: one optimiser step lowers nothing to NaN."""
    torch.manual_seed(0)
    module = MedicalSegmentationModule({"name": backbone}, num_classes=2, roi_size=(64, 64, 4), network="smp",
                                       decoder="fpn", context=1, slices_per_patch=2)
    assert any(type(m).__module__.startswith("vision.") for m in module.net.encoder.modules())
    image, label = torch.randn(1, 1, 64, 64, 4), (torch.rand(1, 1, 64, 64, 4) > 0.7).long()
    x, y = module._training_slices(image, label)
    assert x.shape == (2, 3, 64, 64) and y.shape == (2, 1, 64, 64)
    loss = module.loss(module.net(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert sum(p.grad.abs().sum() for p in module.net.encoder.parameters() if p.grad is not None) > 0
    with torch.no_grad():
        assert module.eval().predict(image).shape == (1, 2, 64, 64, 4)


def test_create_network_rejects_unknown_names():
    with pytest.raises(ValueError, match="network='nope'"):
        create_network("nope", {"name": "resnet18"}, 1, 2, 3)
    with pytest.raises(ValueError, match="set model.context=0"):
        MedicalSegmentationModule({"name": "resnet18"}, num_classes=2, roi_size=(32, 32), context=1)


# ---- a training step of every medical experiment ---------------------------------------------------

def _synthetic3d(root: Path) -> list[str]:
    return [f"data.root={root}", "data.synthetic.num_cases=6", "data.synthetic.size=32",
            "data.synthetic.rad_max=6", "data.synthetic.num_objs=3", "data.val_fraction=0.2", "data.test_fraction=0.2"]


@pytest.mark.parametrize("network", ["smp", "unet"])
def test_quickstart_medical_step(compose_cfg, tmp_path, network):
    extra = ["data.patch_size=[32,32,8]"] if network == "smp" else [
        "model.network=unet", "data.patch_size=[32,32,32]", "~model.net_kwargs",
        "+model.net_kwargs={channels: [4, 8, 16], strides: [2, 2], num_res_units: 1}"]
    cfg = compose_cfg("train", ["experiment=quickstart_medical", *QUICK, *_synthetic3d(tmp_path / "msd"), *extra])
    metrics, objects = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and 0 <= metrics["test/dice"] <= 1 and metrics["test/hd95"] >= 0
    assert {"val/dice_1", "val/dice_2", "val/hd95_2", "val/dice_best"} <= set(metrics)
    trainer = objects["trainer"]  # fast_dev_run swaps the CSV logger for a dummy: PNGs go to the run's root
    overlays = list(Path(trainer.log_dir or trainer.default_root_dir).glob("medical_overlays/*.png"))
    assert overlays and Image.open(overlays[0]).size[0] == 3 * 32 + 4 * 2  # image | truth | prediction


def test_quickstart_medical_nat3d_step(compose_cfg, tmp_path):
    """The 3-D neighborhood-attention U-Net recipe (model.network=nat_unet3d), shrunk."""
    cfg = compose_cfg("train", ["experiment=quickstart_medical_nat3d", *QUICK, *_synthetic3d(tmp_path / "msd"),
                                "data.patch_size=[16,16,16]", "model.net_kwargs.embed_dim=8"])
    assert cfg.model.network == "nat_unet3d"
    metrics, objects = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and 0 <= metrics["test/dice"] <= 1
    assert any(name.endswith("attn.rpb") for name, _ in objects["model"].net.named_parameters())


def test_msd_spleen_recipe_step(compose_cfg, tmp_path):
    """The Decathlon recipe's transforms (spacing, CT window, foreground crop) on a Decathlon-layout task."""
    root = write_synthetic_decathlon(tmp_path / "Task09", **{**TINY3D, "num_classes": 2})
    cfg = compose_cfg("train", ["experiment=msd_spleen", *QUICK, f"data.root={root}", "data.patch_size=[32,32,32]",
                                "data.num_samples=1", "data.batch_size=1", "model.net_kwargs.channels=[4,8,16,32,64]"])
    assert cfg.data.pixdim == [1.5, 1.5, 2.0] and cfg.data.intensity_range == [-57, 164]
    metrics, _ = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and 0 <= metrics["test/dice"] <= 1


def test_quickstart_medical2d_step(compose_cfg, tmp_path):
    cfg = compose_cfg("train", ["experiment=quickstart_medical2d", *QUICK, f"data.root={tmp_path / 'set'}",
                                "data.synthetic.num_images=16", "data.synthetic.size=64", "data.patch_size=[64,64]",
                                "data.batch_size=4"])
    metrics, _ = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and 0 <= metrics["test/dice"] <= 1
    assert (tmp_path / "set" / "images" / "synthetic_015.png").is_file()


def test_medmnist_recipe_step(compose_cfg, tmp_path):
    write_medmnist(tmp_path / "pathmnist.npz", (28, 28, 3), 9)
    cfg = compose_cfg("train", ["experiment=medmnist", *QUICK, f"data.root={tmp_path}", "data.batch_size=4",
                                "data.eval_batch_size=4"])
    metrics, _ = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and 0 <= metrics["test/acc"] <= 1


def test_smp_backbone_loads_a_local_pretrained_file(tmp_path):
    import timm

    source = timm.create_model("resnet18", channels=[8, 16, 32, 64])
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    backbone = {"name": "resnet18", "pretrained_file": str(tmp_path / "resnet18.pth"),
                "kwargs": {"channels": [8, 16, 32, 64]}}
    net = create_network("smp", backbone, in_channels=3, num_classes=2, spatial_dims=2)
    torch.testing.assert_close(dict(net.encoder.model.named_parameters())["layer4.1.conv2.weight"],
                               source.layer4[1].conv2.weight)
