"""DToP: dynamic token pruning for semantic segmentation on a plain ViT.

Paper: "Dynamic Token Pruning in Plain Vision Transformers for Semantic Segmentation" (Tang et al., ICCV 2023,
https://arxiv.org/abs/2308.01045). Architecture as in zbwxp/Dynamic-Token-Pruning (``ViT_prune`` +
``PruneHead``, ``config/prune/prune_segvit_ade20k*.py``):

- a plain ViT (any timm ``VisionTransformer`` by name, so its pretrained weights load through timm) run
  without its class token and without a final norm; the input is zero-padded bottom/right to a multiple of
  the patch size (the official ``PatchEmbed(padding="corner")``) and the position embedding is resized
  bicubically to the token grid;
- after each block in ``out_indices`` an attention-to-mask (ATM, SegViT) head: one learned query per class
  cross-attends the tokens still active; its head-averaged pre-softmax attention is the per-class mask logit
  of each token, and a 2-way linear on the query gives "present / absent";
- grading: ``P = softmax(cls)[..., present] * sigmoid(mask)``; a token whose ``max_k P > threshold`` is easy
  and exits, except the ``top_k`` most confident easy tokens of each class, which stay;
- later blocks and heads run per image on the remaining tokens only (batched while none has exited);
- the canvas of mask logits keeps, for every token, the logits of the head where it exited (survivors take
  the last head's); final scores are ``softmax(cls_last)[..., present] * sigmoid(canvas)``, upsampled
  bilinearly to the input.

Pruning is active in training too (the exit decision takes no gradient); :meth:`DToP.loss` applies the ATM
loss (per class query: 2-way CE, no-object weight 0.1; sigmoid focal + dice on the masks of the classes
present; weights 1 / 20 / 1) to every head, each head's masks being its canvas as in the official code.

Variants (:data:`VARIANTS`, built with :func:`create_dtop`): ``dtop_vit_base`` (ViT-B/16 at 512 px, heads
after blocks 5, 7, 11, threshold 0.9, head width 384 / 6 heads), ``dtop_vit_large`` (ViT-L/16 at 640 px, 7,
15, 23, threshold 0.95, width 512 / 8 heads), and ``dtop_tiny`` for tests. DToP is a segmenter, not a timm
backbone, so it lives with the segmentation heads and is not registered with timm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ..backbone import BackboneSpec

__all__ = ["VARIANTS", "DToP", "ATMHead", "create_dtop"]

# Official configurations (config/prune/prune_segvit_ade20k.py and prune_segvit_ade20k_large.py).
VARIANTS: dict[str, dict] = {
    "dtop_vit_base": dict(backbone="vit_base_patch16_384", img_size=512, out_indices=(5, 7, 11), threshold=0.9,
                          head_dim=384, head_heads=6, drop_path_rate=0.1),
    "dtop_vit_large": dict(backbone="vit_large_patch16_384", img_size=640, out_indices=(7, 15, 23),
                           threshold=0.95, head_dim=512, head_heads=8, drop_path_rate=0.3),
    # Tests: a 4-block, 64-wide ViT with 8 px patches and heads after blocks 1 and 3.
    "dtop_tiny": dict(backbone="vit_tiny_patch16_224", img_size=32, out_indices=(1, 3), threshold=0.9,
                      head_dim=32, head_heads=2, head_layers=2,
                      backbone_kwargs=dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)),
}


def create_dtop(name: str, backbone: BackboneSpec | str | None = None, **overrides) -> DToP:
    """A DToP variant from :data:`VARIANTS` by name; keyword arguments override its configuration.

    ``backbone``: a ViT name, or a :class:`~vision.backbone.BackboneSpec` whose name, drop path, pretrained
    file and kwargs (added to the variant's ``backbone_kwargs``) replace the variant's."""
    if name not in VARIANTS:
        raise ValueError(f"unknown DToP variant {name!r}; expected one of {sorted(VARIANTS)}")
    kwargs = dict(VARIANTS[name])
    if isinstance(backbone, BackboneSpec):
        overrides = dict(backbone=backbone.name, drop_path_rate=backbone.drop_path_rate,
                         pretrained_file=backbone.pretrained_file,
                         backbone_kwargs={**backbone.kwargs, **overrides.pop("backbone_kwargs", {})}, **overrides)
    elif backbone is not None:
        overrides["backbone"] = backbone
    kwargs["backbone_kwargs"] = {**kwargs.get("backbone_kwargs", {}), **overrides.pop("backbone_kwargs", {})}
    return DToP(**{**kwargs, **overrides})


class QuerySelfAttention(nn.Module):
    """Multi-head self-attention among the class queries (explicit matmuls, so FLOP counters see them)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.1):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class MaskCrossAttention(nn.Module):
    """Queries attend the tokens; also returns the head-averaged pre-softmax scores: the mask logits."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.1):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, K, C = queries.shape
        heads = lambda t: t.reshape(B, t.shape[1], self.num_heads, C // self.num_heads).transpose(1, 2)
        q, k, v = heads(self.q(queries)), heads(self.k(tokens)), heads(self.v(tokens))
        scores = q @ k.transpose(-2, -1) * (C // self.num_heads) ** -0.5  # [B, heads, K, N]
        out = (self.attn_drop(scores.softmax(-1)) @ v).transpose(1, 2).reshape(B, K, C)
        return self.proj(out), scores.mean(1)


class ATMDecoderLayer(nn.Module):
    """Post-norm transformer decoder layer (torch's ``TransformerDecoderLayer`` layout, ReLU, dropout 0.1)
    whose cross-attention also yields the mask logits."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        self.self_attn = QuerySelfAttention(dim, num_heads, dropout)
        self.cross_attn = MaskCrossAttention(dim, num_heads, dropout)
        self.linear1, self.linear2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        queries = self.norm1(queries + self.dropout(self.self_attn(queries)))
        out, masks = self.cross_attn(queries, tokens)
        queries = self.norm2(queries + self.dropout(out))
        queries = self.norm3(queries + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(queries))))))
        return queries, masks


class ATMHead(nn.Module):
    """Attention-to-mask head with one query per class (``PruneHead``): tokens ``[B, N, C]`` ->
    class logits ``[B, K, 2]`` (present, absent) and mask logits ``[B, K, N]`` (the last layer's)."""

    def __init__(self, in_dim: int, num_classes: int, dim: int = 384, num_heads: int = 6, num_layers: int = 3):
        super().__init__()
        self.input_proj = nn.Linear(in_dim, dim)
        self.proj_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(ATMDecoderLayer(dim, num_heads) for _ in range(num_layers))
        self.queries = nn.Embedding(num_classes, dim)
        self.class_embed = nn.Linear(dim, 2)
        for m in self.modules():  # official init; the self-attention projection keeps torch MHA's xavier
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for layer in self.layers:
            nn.init.xavier_uniform_(layer.self_attn.qkv.weight)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.proj_norm(self.input_proj(tokens))
        queries = self.queries.weight.repeat(tokens.shape[0], 1, 1)  # a copy: FLOP counters hook inputs
        for layer in self.layers:
            queries, masks = layer(queries, tokens)
        return self.class_embed(queries), masks


def class_presence(cls_logits: torch.Tensor) -> torch.Tensor:
    """``[..., K, 2]`` class logits -> ``[..., K, 1]`` probability that the class is present."""
    return cls_logits.softmax(-1)[..., :1]


def easy_tokens(cls_logits: torch.Tensor, mask_logits: torch.Tensor, threshold: float, top_k: int) -> torch.Tensor:
    """One image: ``[K, 2]``, ``[K, n]`` -> bool ``[n]``, the tokens that exit here.

    Easy: the best class score ``P = presence * sigmoid(mask)`` exceeds ``threshold``; the ``top_k`` most
    confident easy tokens of each (argmax) class stay, so every class keeps being refined."""
    conf, label = (class_presence(cls_logits) * mask_logits.sigmoid()).max(0)
    easy = conf > threshold
    if not easy.any():
        return easy
    per_class = conf.new_full(mask_logits.shape, -math.inf)
    where = easy.nonzero().squeeze(1)
    per_class[label[where], where] = conf[where]
    best, idx = per_class.topk(min(top_k, per_class.shape[1]), dim=1)
    easy[idx[best.isfinite()]] = False
    return easy


class DToP(nn.Module):
    """A plain ViT with ATM heads after the blocks in ``out_indices`` and dynamic token exits.

    Args:
        backbone: name of a timm ViT (created with ``pretrained_file`` weights if given, else random).
        num_classes: segmentation classes (one query per class in every head).
        img_size: training crop size; sizes the position embedding (resized for other inputs).
        out_indices: blocks followed by a head; the last must be the last block.
        threshold: exit threshold on ``max_k P`` at every head but the last; above 1 nothing exits.
        top_k: easy tokens kept per class at each exit.
        head_dim, head_heads, head_layers: width, attention heads and decoder layers of each head.
        drop_path_rate: stochastic depth of the backbone.
        mask_weight, dice_weight, cls_weight, no_object_weight: ATM loss weights (official 20, 1, 1, 0.1).
        pretrained_file: local checkpoint of the backbone (timm's key names; timm resizes its pos-embed).
        backbone_kwargs: further ``timm.create_model`` arguments (e.g. width and depth of a small ViT).
    """

    def __init__(self, backbone: str = "vit_base_patch16_384", num_classes: int = 150, img_size: int = 512,
                 out_indices: tuple[int, ...] = (5, 7, 11), threshold: float = 0.9, top_k: int = 5,
                 head_dim: int = 384, head_heads: int = 6, head_layers: int = 3, drop_path_rate: float = 0.0,
                 mask_weight: float = 20.0, dice_weight: float = 1.0, cls_weight: float = 1.0,
                 no_object_weight: float = 0.1, pretrained_file: str | None = None,
                 backbone_kwargs: dict | None = None):
        super().__init__()
        spec = BackboneSpec(backbone, drop_path_rate, pretrained_file and str(pretrained_file), backbone_kwargs or {})
        self.backbone = spec.create(num_classes=0, img_size=img_size, dynamic_img_size=True)
        vit = self.backbone
        if getattr(vit, "pos_embed", None) is None or not hasattr(vit, "blocks"):
            raise ValueError(f"backbone {backbone!r}: DToP needs a plain ViT with an absolute position embedding")
        vit.norm = nn.Identity()  # the official ViT has no final norm (final_norm=False); heads norm their input
        if getattr(vit, "cls_token", None) is not None:
            vit.cls_token.requires_grad_(False)  # never used (with_cls_token=False): DDP needs no unused parameters
        depth = len(vit.blocks)
        out_indices = tuple(int(i) for i in out_indices)
        if list(out_indices) != sorted(set(out_indices)) or out_indices[-1] != depth - 1 or out_indices[0] < 0:
            raise ValueError(f"out_indices={out_indices}: expected increasing block indices ending with the "
                             f"last block ({depth - 1}) of {backbone!r}")
        self.num_classes, self.out_indices, self.threshold, self.top_k = num_classes, out_indices, threshold, top_k
        self.patch_size = vit.patch_embed.patch_size
        self.heads = nn.ModuleList(ATMHead(vit.embed_dim, num_classes, head_dim, head_heads, head_layers)
                                   for _ in out_indices)
        self.loss_weights = dict(ce=cls_weight, mask=mask_weight, dice=dice_weight)
        self.register_buffer("class_weight", torch.tensor([1.0, no_object_weight]), persistent=False)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images -> patch tokens ``[B, h*w, C]`` with position embedding, and the grid ``(h, w)``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DToP expects images [B, 3, H, W], got {tuple(images.shape)}")
        ph, pw = self.patch_size
        H, W = images.shape[-2:]
        images = F.pad(images, (0, -W % pw, 0, -H % ph))  # bottom/right zeros to whole patches
        vit = self.backbone
        x = vit.patch_embed(images)  # [B, h, w, C]
        grid = x.shape[1:3]
        pos = vit.pos_embed[:, 0 if vit.no_embed_class else vit.num_prefix_tokens:]
        old = vit.patch_embed.grid_size
        if tuple(grid) != tuple(old):
            pos = pos.reshape(1, *old, -1).permute(0, 3, 1, 2)
            pos = F.interpolate(pos, size=grid, mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        x = vit.norm_pre(vit.pos_drop(x.flatten(1, 2) + pos))
        return x, tuple(grid)

    def forward(self, images: torch.Tensor) -> dict:
        """``images [B, 3, H, W]`` -> dict:

        - ``logits [B, K, H, W]``: final per-class scores in [0, 1] (``presence * sigmoid(mask)``, argmax =
          the prediction) at the input resolution;
        - ``heads``: per head ``dict(cls=[B, K, 2], masks=[B, K, h, w])``: class logits and the mask-logit
          canvas at that head (tokens exited earlier keep their exit head's logits), for :meth:`loss`;
        - ``kept [B, depth]``: tokens each block ran on, per image;
        - ``exit_head [B, h, w]``: index of the head each token's prediction comes from.
        """
        H, W = images.shape[-2:]
        x, (h, w) = self.embed(images)
        B, N, _ = x.shape
        canvas = x.new_zeros(B, self.num_classes, N)
        exit_head = torch.full((B, N), -1, dtype=torch.long, device=x.device)
        active: list[torch.Tensor] | None = None  # per image, indices of the active tokens; None: all active
        kept, heads = [], []
        for i, block in enumerate(self.backbone.blocks):
            if active is None:
                x = block(x)
                kept.append(torch.full((B,), N, device=x.device))
            else:  # per image on its remaining tokens (their counts differ)
                x = [block(t[None])[0] for t in x]
                kept.append(torch.tensor([len(t) for t in x], device=canvas.device))
            if i not in self.out_indices:
                continue
            j = self.out_indices.index(i)
            if active is None:
                cls, canvas = self.heads[j](x)
            else:
                outs = [self.heads[j](t[None]) for t in x]
                cls = torch.cat([c for c, _ in outs])
                canvas = canvas.clone()
                for b, (_, m) in enumerate(outs):
                    canvas[b, :, active[b]] = m[0]
            heads.append(dict(cls=cls, masks=canvas.view(B, -1, h, w)))
            if j == len(self.heads) - 1:  # survivors take the last head's prediction
                exit_head[exit_head < 0] = j
                break
            if self.threshold > 1:
                continue
            with torch.no_grad():
                idx = active or [torch.arange(N, device=x[0].device)] * B
                easy = [easy_tokens(cls[b], canvas[b, :, idx[b]], self.threshold, self.top_k) for b in range(B)]
            if active is None and not any(e.any() for e in easy):
                continue
            x = list(x) if active is None else x
            for b, e in enumerate(easy):
                exit_head[b, idx[b][e]] = j
                x[b] = x[b][~e]
            active = [ix[~e] for ix, e in zip(idx, easy)]

        scores = class_presence(heads[-1]["cls"]) * canvas.sigmoid()
        logits = self._upsample(scores.view(B, -1, h, w), (H, W))
        return dict(logits=logits, heads=heads, kept=torch.stack(kept, 1), exit_head=exit_head.view(B, h, w))

    def _upsample(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Token-grid maps -> the padded input size (bilinear), cropped to ``size``."""
        padded = (maps.shape[-2] * self.patch_size[0], maps.shape[-1] * self.patch_size[1])
        return F.interpolate(maps, size=padded, mode="bilinear", align_corners=False)[..., :size[0], :size[1]]

    def loss(self, outputs: dict, target: torch.Tensor, ignore_index: int = 255) -> dict[str, torch.Tensor]:
        """ATM loss of every head: ``loss_{ce,mask,dice}_{j}`` (weighted) and their sum ``loss``.

        ``target [B, H, W]`` int64 class indices at the input resolution. As in the official criterion the
        queries are the classes (no matching): the CE asks each query whether its class is in the image; the
        focal and dice losses compare the mask of each present class with ``target == class`` over the whole
        image (ignored pixels count as background for every class, as the official code does), normalised
        by the number of present masks in the batch.
        """
        logits = outputs["logits"]
        if target.ndim != 3 or target.shape[0] != logits.shape[0] or target.shape[-2:] != logits.shape[-2:]:
            raise ValueError(f"target must be [B, H, W] = {(logits.shape[0], *logits.shape[-2:])}, "
                             f"got {tuple(target.shape)}")
        valid = target[target != ignore_index]
        if valid.numel() and (valid.min() < 0 or valid.max() >= self.num_classes):
            raise ValueError(f"target classes must lie in [0, {self.num_classes}) or equal ignore_index="
                             f"{ignore_index}; got values {valid.min().item()}..{valid.max().item()}")
        B = target.shape[0]
        present = torch.zeros(B, self.num_classes, dtype=torch.bool, device=target.device)
        for b in range(B):
            labels = target[b].unique()
            present[b, labels[labels != ignore_index]] = True
        bi, ci = present.nonzero(as_tuple=True)
        truth = (target[bi] == ci[:, None, None]).flatten(1).float()  # [M, H*W]
        num_masks = max(len(bi), 1)
        cls_target = (~present).long()  # 0: present, 1: no object

        losses = {}
        for j, head in enumerate(outputs["heads"]):
            ce = F.cross_entropy(head["cls"].flatten(0, 1), cls_target.flatten(), weight=self.class_weight)
            masks = self._upsample(head["masks"][bi, ci][:, None], target.shape[-2:]).flatten(1)
            losses[f"loss_ce_{j}"] = self.loss_weights["ce"] * ce
            losses[f"loss_mask_{j}"] = self.loss_weights["mask"] * sigmoid_focal_loss(masks, truth) / num_masks
            losses[f"loss_dice_{j}"] = self.loss_weights["dice"] * dice_loss(masks, truth) / num_masks
        losses["loss"] = sum(losses.values())
        return losses


def sigmoid_focal_loss(logits: torch.Tensor, truth: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """Focal loss of ``[M, P]`` mask logits, mean over pixels, summed over masks."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
    p_t = p * truth + (1 - p) * (1 - truth)
    alpha_t = alpha * truth + (1 - alpha) * (1 - truth)
    return (alpha_t * ce * (1 - p_t) ** gamma).mean(1).sum()


def dice_loss(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``1 - (2|X∩Y| + 1) / (|X| + |Y| + 1)`` per mask (soft, sigmoid), summed over masks."""
    p = logits.sigmoid()
    return (1 - (2 * (p * truth).sum(1) + 1) / (p.sum(1) + truth.sum(1) + 1)).sum()
