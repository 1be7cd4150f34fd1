"""Segmentation networks: UPerNet / Semantic-FPN decoders on any timm backbone, and DToP.

Every network maps images to per-class logits ``[B, K, H, W]`` and computes its own training losses
(``training_losses(images, masks, ignore_index) -> {"loss": total, ...}``), so a segmenter with its own
objective fits beside the encoder-decoders: ``head=dtop`` is DToP (dynamic token pruning on a plain ViT,
:mod:`vision.heads.dtop`, with its ATM loss).

The decoders come from segmentation-models-pytorch: its ``tu-<name>`` encoder is ``timm.create_model(name,
features_only=True)``, so this package's registered backbones work as well as timm's, and its UPerNet
(PPM on the last stage + FPN, fused at 1/4 scale; LayerNorm on the backbone features as in mmseg's Swin/NAT
configs) and FPN (Kirillov et al.'s Semantic FPN) decoders match the mmseg heads the papers report. Two parts
are ours, because smp has no equivalent: the classifier (dropout + 1x1 conv, upsampled to the input size,
mmseg's ``conv_seg``) and the auxiliary FCN head on the third stage (mmseg's ``FCNHead``; smp's ``aux_params``
is an image-level classification head).
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import BackboneSpec
from ..models import forget_state_dict
from .dtop import create_dtop


def _smp_encoder_decoder(head: str, backbone: BackboneSpec, in_chans: int, decoder_channels: int):
    """(encoder, decoder, decoder output channels) of an smp model on the ``tu-`` (timm) encoder."""
    common = dict(in_channels=in_chans, classes=1, **backbone.smp_encoder())
    if head == "upernet":
        model = smp.UPerNet(decoder_channels=decoder_channels, **common)
        out_channels = decoder_channels
    elif head == "fpn":
        # mmseg's Semantic FPN: a 256-channel neck, a 128-channel head (pyramid = 2 x head channels); dropout
        # once, in our classifier; bilinear merging. smp's head uses GroupNorm(32 groups).
        if decoder_channels % 32:
            raise ValueError(
                f"decoder_channels={decoder_channels}: the FPN head's GroupNorm needs a multiple of 32"
            )
        model = smp.FPN(
            decoder_pyramid_channels=2 * decoder_channels,
            decoder_segmentation_channels=decoder_channels,
            decoder_dropout=0.0,
            decoder_interpolation="bilinear",
            **common,
        )
        out_channels = model.decoder.out_channels
    else:
        raise AssertionError(head)
    forget_state_dict(model.encoder)
    return model.encoder, model.decoder, out_channels


HEADS = ("upernet", "fpn", "dtop", "wau")


class FCNHead(nn.Module):
    """mmseg's auxiliary FCNHead (num_convs=1, no input concat): 3x3 conv-BN-ReLU, dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(x))


class SegmentationModel(nn.Module):
    """Backbone features -> decoder -> per-pixel logits at the input resolution.

    Inputs are zero-padded at the bottom/right to a multiple of ``size_divisor`` (the FPN's 2x merges need
    it; UPerNet and the backbones accept it) and the logits cropped back, so any image size works.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        decoder_channels: int,
        num_classes: int,
        dropout: float = 0.1,
        aux_channels: int | None = 256,
        aux_weight: float = 0.4,
        size_divisor: int = 32,
    ):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.aux_weight = aux_weight
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(decoder_channels, num_classes, 1))
        # smp's encoders list [input, 1/2 (empty for transformers), 1/4, 1/8, 1/16, 1/32]: stage 3 is [-2]
        self.aux = (
            FCNHead(encoder.out_channels[-2], num_classes, aux_channels, dropout) if aux_channels else None
        )
        self.size_divisor = size_divisor

    def _features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        height, width = images.shape[-2:]
        d = self.size_divisor
        images = F.pad(images, (0, -width % d, 0, -height % d))
        return self.encoder(images), (height, width)

    def _upsample(self, logits: torch.Tensor, size: tuple[int, int], padded: tuple[int, int]) -> torch.Tensor:
        logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
        return logits[..., : size[0], : size[1]]

    def forward_train(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits, auxiliary logits or None)``, both ``[B, K, H, W]`` at the input size."""
        features, size = self._features(images)
        padded = features[0].shape[-2:]
        logits = self._upsample(self.classifier(self.decoder(features)), size, padded)
        aux = self._upsample(self.aux(features[-2]), size, padded) if self.aux is not None else None
        return logits, aux

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features, size = self._features(images)
        return self._upsample(self.classifier(self.decoder(features)), size, features[0].shape[-2:])

    def training_losses(self, images: torch.Tensor, masks: torch.Tensor, ignore_index: int) -> dict:
        """Cross-entropy of the logits, plus ``aux_weight`` times the auxiliary head's."""
        logits, aux = self.forward_train(images)
        losses = {"ce": F.cross_entropy(logits, masks, ignore_index=ignore_index)}
        if aux is not None:
            losses["aux"] = self.aux_weight * F.cross_entropy(aux, masks, ignore_index=ignore_index)
        losses["loss"] = sum(losses.values())
        return losses

    def no_weight_decay(self) -> set[str]:
        """The backbone's own no-weight-decay names (position tables, ...), under their full paths."""
        names = set()
        for prefix, module in self.named_modules():
            if module is not self and callable(getattr(module, "no_weight_decay", None)):
                names |= {f"{prefix}.{n}" for n in module.no_weight_decay()}
        return names


class DToPSegmenter(nn.Module):
    """DToP behind the networks' interface: logits are the log of its per-class scores (so argmax, the
    validation cross-entropy and sliding windows work unchanged); training uses its own ATM loss on every head.
    ``kept`` holds the active tokens per block of the last forward ``[B, depth]``."""

    def __init__(self, dtop: nn.Module):
        super().__init__()
        self.dtop = dtop
        self.kept: torch.Tensor | None = None

    def _run(self, images: torch.Tensor) -> dict:
        out = self.dtop(images)
        self.kept = out["kept"].detach()
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images)["logits"].clamp_min(1e-6).log()

    def training_losses(self, images: torch.Tensor, masks: torch.Tensor, ignore_index: int) -> dict:
        return self.dtop.loss(self._run(images), masks, ignore_index)


def create_segmentation_model(
    head: str,
    backbone: BackboneSpec | dict,
    num_classes: int,
    in_chans: int = 3,
    decoder_channels: int = 512,
    dropout: float = 0.1,
    aux_channels: int | None = 256,
    aux_weight: float = 0.4,
    dtop: dict | None = None,
    wau: dict | None = None,
) -> nn.Module:
    """The segmentation network for ``head`` (one of ``HEADS``) on ``backbone`` (a :class:`BackboneSpec` or
    a ``configs/model`` entry). ``aux_channels=None`` drops the auxiliary head.

    ``head=dtop``: ``backbone.name`` is a plain timm ViT and ``dtop`` holds DToP's own arguments
    (``variant`` — ``dtop_vit_base`` / ``dtop_vit_large``, the official settings — and any override of it:
    ``img_size``, ``out_indices``, ``threshold``, ``top_k``, ``head_dim``, ...).

    ``head=wau``: a U-Net decoder of window-attention upsampling steps (:mod:`vision.heads.wau`), its output at
    the finest lateral scale; ``decoder_channels`` for every step unless ``wau`` (the decoder's arguments:
    ``decoder_channels`` per step, ``num_heads``, ``window_size``, ``mlp_ratio``) says otherwise."""
    if head not in HEADS:
        raise ValueError(f"unknown segmentation head {head!r}; choose from {list(HEADS)}")
    backbone = BackboneSpec.parse(backbone)
    if head == "dtop":
        if in_chans != 3:
            raise ValueError(f"head=dtop takes RGB images (in_chans=3), got in_chans={in_chans}")
        options = dict(dtop or {})
        return DToPSegmenter(create_dtop(options.pop("variant", "dtop_vit_base"), backbone=backbone,
                                         num_classes=num_classes, **options))
    if head == "wau":
        from .wau import WAUDecoder, smp_encoder

        encoder = smp_encoder(backbone, in_chans)
        decoder = WAUDecoder(encoder.out_channels, **{"decoder_channels": decoder_channels, **(wau or {})})
        return SegmentationModel(encoder, decoder, decoder.out_channels, num_classes, dropout, aux_channels,
                                 aux_weight)
    encoder, decoder, channels = _smp_encoder_decoder(head, backbone, in_chans, decoder_channels)
    return SegmentationModel(encoder, decoder, channels, num_classes, dropout, aux_channels, aux_weight)
