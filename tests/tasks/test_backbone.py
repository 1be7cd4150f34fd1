"""The backbone spec and the one weight loader: every task's backbone path refuses pickled code, naming the file."""

import argparse
import subprocess
import sys

import pytest
import timm
import torch

from vision.backbone import BackboneSpec
from vision.heads.segmentation import create_segmentation_model
from vision.tasks.classification import ClassificationModule
from vision.tasks.detection import create_detector
from vision.tasks.distillation import Distillation
from vision.tasks.medical import create_network
from vision.weights import UnsafeCheckpointError

RESNET = dict(name="resnet18", kwargs=dict(channels=[8, 16, 32, 64]))
VIT = dict(name="vit_tiny_patch16_224", kwargs=dict(patch_size=8, embed_dim=64, depth=4, num_heads=2))

# every task's way from a backbone config to weights (each must go through vision.weights)
BACKBONE_PATHS = {
    "classification": lambda b: ClassificationModule(b, num_classes=3),
    "detection": lambda b: create_detector("retinanet", b, num_classes=2, min_size=64, max_size=64),
    "segmentation_upernet": lambda b: create_segmentation_model("upernet", b, 3, decoder_channels=32),
    "segmentation_fpn": lambda b: create_segmentation_model("fpn", b, 3, decoder_channels=32),
    "segmentation_dtop": lambda b: create_segmentation_model("dtop", {**b, **VIT}, 3, dtop={"variant": "dtop_tiny"}),
    "medical_smp": lambda b: create_network("smp", b, in_channels=3, num_classes=2, spatial_dims=2),
    "distillation_teacher": lambda b: Distillation(b).build(num_classes=3, in_chans=3),
}


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "pickled_code.pth"
    torch.save({"args": argparse.Namespace(lr=1), "model": {}}, path)  # loading it would run pickled code
    return path


@pytest.mark.parametrize("task", sorted(BACKBONE_PATHS))
def test_every_task_refuses_a_pickled_code_file(task, pickled):
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*pickled_code.pth"):
        BACKBONE_PATHS[task]({**RESNET, "pretrained_file": str(pickled)})


def test_a_plain_file_loads_and_a_head_of_another_size_is_replaced(tmp_path):
    source = timm.create_model("resnet18", channels=[8, 16, 32, 64], num_classes=5)
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)  # DDP-style
    spec = BackboneSpec.parse({**RESNET, "pretrained_file": str(path)})
    same = spec.create(num_classes=5)
    torch.testing.assert_close(same.fc.weight, source.fc.weight)
    other = spec.create(num_classes=3)  # fine-tuning on another label set: body loaded, head fresh
    torch.testing.assert_close(other.conv1.weight, source.conv1.weight)
    assert other.fc.weight.shape == (3, 64)
    assert "state_dict" not in same.pretrained_cfg  # the loaded tensors are not kept twice


def test_spec_parses_configs_and_names_bad_keys():
    spec = BackboneSpec.parse({"name": "nat_mini", "drop_path_rate": 0.2, "pretrained_file": None,
                               "kwargs": {"dilation_policy": "reduce"}, "out_indices": [1, 2]})
    assert spec == BackboneSpec("nat_mini", 0.2, None, {"dilation_policy": "reduce"}, (1, 2))
    assert BackboneSpec.parse(spec.to_dict()) == spec and BackboneSpec.parse("resnet18").name == "resnet18"
    assert spec.timm_kwargs(num_classes=0) == {"dilation_policy": "reduce", "drop_path_rate": 0.2, "num_classes": 0}
    with pytest.raises(ValueError, match=r"model.backbone: unknown keys \['pretrained'\]"):
        BackboneSpec.parse({"name": "nat_mini", "pretrained": True})
    with pytest.raises(ValueError, match="distill.teacher"):
        BackboneSpec.parse({"kwargs": {}}, where="distill.teacher")


def test_loading_weights_imports_no_training_pipeline(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", channels=[8, 8, 8, 8]).state_dict(), path)
    code = (f"import sys, vision; vision.create_model('resnet18', pretrained_file={str(path)!r}, channels=[8, 8, 8, 8]);"
            "print(sorted(m for m in ('lightning', 'hydra', 'omegaconf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
