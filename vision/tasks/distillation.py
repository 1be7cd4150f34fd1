"""Knowledge distillation from a frozen teacher backbone, as DynamicViT trains (raoyongming/DynamicViT
``losses.py``, ``DistillDiffPruningLoss_dynamic`` with ``mse_token=True``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..backbone import BackboneSpec


class Distillation:
    """A teacher backbone by name and two losses on the student's training forward:
    ``logit_weight * KL(teacher || student)`` over the logits (``batchmean``), and ``token_weight * MSE``
    between the student's and the teacher's ``forward_features`` patch tokens (after each one's prefix
    tokens; shapes must agree), restricted to the tokens the student kept when it exposes a
    ``token_keep_mask [B, N]`` (DynamicViT). Official DynamicViT weights: 0.5 and 0.5.

    A plain object, not a module: the teacher (built by :meth:`build`, loaded from ``pretrained_file``,
    frozen, always in eval mode) is never trained, checkpointed or DDP-wrapped.
    """

    def __init__(self, teacher: BackboneSpec | dict, logit_weight: float = 0.5, token_weight: float = 0.5):
        self.spec = BackboneSpec.parse(teacher, where="distill.teacher")
        self.logit_weight, self.token_weight = logit_weight, token_weight
        self.teacher: nn.Module | None = None

    def build(self, num_classes: int, in_chans: int) -> None:
        path = self.spec.pretrained_file
        if path is None:
            rank_zero_warn("distill.teacher.pretrained_file is null: distilling from an untrained teacher")
        elif not Path(path).is_file():
            raise FileNotFoundError(f"distill.teacher.pretrained_file: no such file {path}")
        teacher = self.spec.create(num_classes=num_classes, in_chans=in_chans)
        self.teacher = teacher.requires_grad_(False).eval()

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        self.teacher.to(device=device, dtype=dtype)

    def losses(self, student: nn.Module, images: torch.Tensor, logits: torch.Tensor,
               features: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``{"distill_logits", "distill_tokens"}`` (weighted; a zero weight leaves its term out).
        ``features``: the student's ``forward_features`` that gave ``logits`` (needed for the token term)."""
        with torch.no_grad():
            teacher_features = self.teacher.forward_features(images)
            teacher_logits = self.teacher.forward_head(teacher_features)
        parts = {}
        if self.logit_weight:
            kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), reduction="batchmean",
                          log_target=True)
            parts["distill_logits"] = self.logit_weight * kl
        if self.token_weight:
            parts["distill_tokens"] = self.token_weight * self.token_loss(student, features, teacher_features)
        return parts

    def token_loss(self, student: nn.Module, features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        tokens = features[:, getattr(student, "num_prefix_tokens", 0):]
        target = teacher_features[:, getattr(self.teacher, "num_prefix_tokens", 0):]
        if tokens.shape != target.shape:
            raise ValueError(f"token distillation: student tokens {tuple(tokens.shape)} vs teacher "
                             f"{self.spec.name} tokens {tuple(target.shape)}")
        mask = getattr(student, "token_keep_mask", None)
        if mask is not None:
            keep = mask.reshape(-1) > 0.5
            if not keep.any():  # nothing kept: no token loss, as officially
                return features.new_zeros(())
            tokens, target = tokens.flatten(0, 1)[keep], target.flatten(0, 1)[keep]
        return (tokens - target).pow(2).mean()
