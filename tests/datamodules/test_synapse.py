"""Synapse / ACDC in the TransUNet-family layouts (vision/datamodules/synapse.py), bad cases, per-organ table."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vision.datamodules.readers import InvalidCaseError
from vision.datamodules.synapse import ACDCDataModule, SynapseDataModule, write_synthetic_synapse
from vision.tasks.medical import MedicalSegmentationModule, case_table


def _slice(k: int, size=(20, 18)) -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(k).random(size, dtype=np.float32)
    label = np.zeros(size, np.uint8)
    label[2:8, 3:9] = k % 9
    return image, label


def write_synapse(root: Path) -> Path:
    """Two training cases of two slices each and one test volume, as TransUNet's release lays them out."""
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    (root / "lists").mkdir()
    names = []
    for case in (5, 6):
        for z in range(2):
            image, label = _slice(case + z)
            np.savez(root / "train_npz" / f"case{case:04d}_slice{z:03d}.npz", image=image, label=label)
            names.append(f"case{case:04d}_slice{z:03d}")
    volume = np.stack([_slice(k, (20, 18))[1] for k in (1, 2, 3)]).astype(np.float32)  # [D, H, W], float labels
    with h5py.File(root / "test_vol_h5" / "case0001.npy.h5", "w") as f:
        f["image"], f["label"] = np.random.default_rng(0).random(volume.shape, dtype=np.float32), volume
    (root / "lists" / "train.txt").write_text("\n".join(names) + "\n")
    (root / "lists" / "test_vol.txt").write_text("case0001\n")
    return root


def synapse(root, **kw) -> SynapseDataModule:
    dm = SynapseDataModule(str(root), num_classes=9, patch_size=(16, 16), batch_size=2, num_workers=0, **kw)
    dm.setup()
    return dm


def test_synapse_layout_batches(tmp_path):
    dm = synapse(write_synapse(tmp_path))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16) and batch["label"].shape == (2, 1, 16, 16)
    assert batch["label"].dtype == torch.int64 and batch["label"].max() > 0
    (volume,) = list(dm.test_dataloader())
    assert volume["image"].shape == (1, 1, 20, 18, 3) and volume["case"] == ["case0001"]
    assert volume["label"][0, 0, 2, 3].tolist() == [1, 2, 3]  # slice z of the file is the last axis
    assert len(dm.val_set) == 0  # no validation unless asked: the release has none
    assert len(synapse(tmp_path, val_cases=["case0001"]).val_set) == 1
    with pytest.raises(ValueError, match="case0099"):
        synapse(tmp_path, val_cases=["case0099"])


def _corrupt(root: Path, kind: str) -> str:
    """Break the first training slice in one way; returns what the error must name."""
    path = root / "train_npz" / "case0005_slice000.npz"
    image, label = _slice(5)
    if kind == "label_values":
        label[0, 0] = 9  # Synapse has labels 0..8
        np.savez(path, image=image, label=label)
    elif kind == "fractional_label":
        np.savez(path, image=image, label=label + 0.5)
    elif kind == "shape_mismatch":
        np.savez(path, image=image, label=label[:-1])
    elif kind == "missing_key":
        np.savez(path, data=image, label=label)
    elif kind == "missing_file":
        path.unlink()
    elif kind == "unreadable":
        path.write_bytes(b"not an npz")
    return path.name


@pytest.mark.parametrize("kind", ["label_values", "fractional_label", "shape_mismatch", "missing_key",
                                  "missing_file", "unreadable"])
def test_bad_slice_names_the_file_or_is_skipped(tmp_path, kind):
    root = write_synapse(tmp_path)
    name = _corrupt(root, kind)
    dm = synapse(root)
    with pytest.raises(InvalidCaseError, match=name):
        dm.train_set[0]
    dm = synapse(root, on_bad_sample="skip")
    with pytest.warns(UserWarning, match=name):
        samples = [dm.train_set[i] for i in range(len(dm.train_set))]
    assert samples[0] is None and all(s is not None for s in samples[1:]) and dm.skipped == 1


def test_bad_volume_and_missing_list(tmp_path):
    root = write_synapse(tmp_path)
    with h5py.File(root / "test_vol_h5" / "case0001.npy.h5", "r+") as f:
        del f["label"]
        f["label"] = np.full((3, 20, 18), 12, np.float32)
    with pytest.raises(InvalidCaseError, match="case0001.npy.h5.*label values"):
        synapse(root).test_set[0]
    (root / "lists" / "test_vol.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test_vol.txt"):
        synapse(root)
    with pytest.raises(ValueError, match="num_classes=4"):
        SynapseDataModule(str(root), num_classes=4)


def write_acdc(root: Path) -> Path:
    """Two training slices, one validation slice and one test volume, as the MT-UNet release lays them out."""
    for split in ("train", "valid", "test"):
        (root / split).mkdir(parents=True)
    (root / "lists").mkdir()
    for k in range(2):
        image, label = _slice(k + 1)
        np.savez(root / "train" / f"p{k}_slice.npz", img=image, label=label % 4)
    np.savez(root / "valid" / "p9_slice.npz", img=image, label=label % 4)
    np.savez(root / "test" / "p7_volume.npz", img=np.zeros((4, 20, 18), np.float32),
             label=np.ones((4, 20, 18), np.uint8) * 3)
    (root / "lists" / "train.txt").write_text("p0_slice.npz\np1_slice.npz\n")
    (root / "lists" / "valid.txt").write_text("p9_slice.npz\n")
    (root / "lists" / "test.txt").write_text("p7_volume.npz\n")
    return root


def test_acdc_layout(tmp_path):
    write_acdc(tmp_path)
    dm = ACDCDataModule(str(tmp_path), num_classes=4, patch_size=(16, 16), batch_size=2, num_workers=0)
    dm.setup()
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 1, 16, 16)
    assert dm.val_set[0]["image"].shape == (1, 20, 18, 1)  # a validation slice as a one-slice volume
    assert dm.test_set[0]["label"].shape == (1, 20, 18, 4) and dm.test_set[0]["label"].max() == 3


def test_synthetic_synapse_is_deterministic_and_refuses_real_data(tmp_path):
    a, b = write_synthetic_synapse(tmp_path / "a", num_train=2, num_test=1, size=32, depth=4), tmp_path / "b"
    write_synthetic_synapse(b, num_train=2, num_test=1, size=32, depth=4)
    first = np.load(a / "train_npz" / "case0001_slice002.npz")
    assert np.array_equal(first["image"], np.load(b / "train_npz" / "case0001_slice002.npz")["image"])
    with h5py.File(a / "test_vol_h5" / "case0003.npy.h5") as f:
        assert set(np.unique(f["label"][:])) == set(range(9))  # every organ in the test volume
    real = write_synapse(tmp_path / "real")
    with pytest.raises(FileExistsError, match="not a synthetic set"):
        write_synthetic_synapse(real)


def test_slice_trained_network_scores_volumes_and_prints_the_organ_table(capsys):
    module = MedicalSegmentationModule({"name": "resnet18"}, num_classes=3, roi_size=(16, 16), network="unet",
                                       context=0, net_kwargs={"channels": [4, 8], "strides": [2]}).eval()
    with torch.no_grad():
        assert module.predict(torch.randn(1, 1, 20, 18, 3)).shape == (1, 3, 20, 18, 3)
    module.cases["test_dice"].update(torch.tensor([[1.0, float("nan")], [0.5, 0.25]]))
    module.cases["test_hd95"].update(torch.tensor([[2.0, float("nan")], [4.0, 6.0]]))
    module.log = lambda *a, **k: None
    module._log_cases("test")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split() == ["class_1", "0.7500", "3.00"] and lines[2].split() == ["class_2", "0.2500", "6.00"]
    assert lines[3].split() == ["mean", "0.5000", "4.50"]
    assert case_table({"dice": [0.5, 0.5], "hd95": [1.0, 1.0]}, ["liver"]).splitlines()[1].startswith("liver")


@pytest.mark.parametrize("decoder", ["wau", "unet"])
def test_quickstart_wau_step(compose_cfg, tmp_path, decoder):
    from vision.utils import train

    quick = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true", "data.num_workers=0",
             "callbacks.rich_progress_bar=null", "trainer.fast_dev_run=true"]
    extra = [] if decoder == "wau" else [
        "model.decoder=unet", "~model.net_kwargs", "+model.net_kwargs={decoder_channels: [16, 16, 8, 8, 8]}"]
    cfg = compose_cfg("train", ["experiment=quickstart_wau", *quick, f"data.root={tmp_path / 'synapse'}",
                                "data.synthetic.num_train=2", "data.synthetic.num_test=1", "data.synthetic.size=32",
                                "data.synthetic.depth=4", "data.patch_size=[32,32]", "data.batch_size=2", *extra])
    metrics, objects = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and 0 <= metrics["test/dice"] <= 1
    assert {f"test/dice_{k}" for k in range(1, 9)} <= set(metrics)
    uses_wau = any(type(m).__name__ == "WAUStep" for m in objects["model"].modules())
    assert uses_wau == (decoder == "wau")


@pytest.mark.parametrize("name, data, write", [("synapse_wau", "SynapseDataModule", write_synapse),
                                               ("acdc_wau", "ACDCDataModule", write_acdc)])
def test_paper_recipes_compose_and_train_a_step(compose_cfg, tmp_path, name, data, write):
    from vision.utils import train

    cfg = compose_cfg("train", [f"experiment={name}"])
    assert cfg.data._target_.endswith(data) and cfg.model.decoder == "wau" and cfg.data.patch_size == [224, 224]
    assert cfg.model.lambda_dice == cfg.model.lambda_ce == 0.5 and cfg.data.batch_size == 24
    root = write(tmp_path / name)
    cfg = compose_cfg("train", [f"experiment={name}", "trainer.accelerator=cpu", "trainer.devices=1",
                                "trainer.precision=32-true", "data.num_workers=0", "callbacks.rich_progress_bar=null",
                                "trainer.fast_dev_run=true", f"data.root={root}", "data.patch_size=[32,32]",
                                "data.batch_size=2"])
    metrics, _ = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and 0 <= metrics["test/dice"] <= 1
