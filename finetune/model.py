"""The network fine-tuned end to end: a backbone, then stage 2's very ``Head``.

``Net`` = ``Backbone`` (images (M, 3, S, S) -> features (M, D)) + ``Head``
(standardisation + MetaCleaner + linear classifier). Training calls
``net(images, labels, ...)`` so that DistributedDataParallel sees one forward:
with the cleaner, the M = K·N images of a batch are K class subsets of N
(consecutive rows) and the loss is ``Head.subset_loss``; without it (the
"unload" and clean phases) plain softmax cross-entropy per image. At test time
``net(images)`` returns logits with the cleaner removed.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mcpipe.cleaner.model import Head
from mcpipe.extract.backbones import Backbone


class Net(nn.Module):
    def __init__(self, backbone: Backbone, head: Head, *, freeze_bn: bool = True):
        super().__init__()
        self.freeze_bn = freeze_bn
        if backbone.feature_dim != head.feature_dim:
            raise ValueError(f"backbone features are {backbone.feature_dim}-d, the head takes {head.feature_dim}")
        self.backbone = backbone
        self.head = head

    def forward(self, images: Tensor, labels: Tensor | None = None, *, cleaner: bool = True) -> Tensor:
        """images (M, 3, S, S) -> logits (M, C) without labels; with labels the scalar training loss:
        cleaner: labels (K,) of the K = M / N subsets; plain: labels (M,)."""
        features = self.backbone(images)
        if labels is None:
            return self.head(features)
        if not cleaner:
            return F.cross_entropy(self.head(features), labels)
        n = self.head.cleaner.subset_size
        loss, _ = self.head.subset_loss(features.reshape(-1, n, features.shape[1]), labels)
        return loss

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze (no gradients, batch-norm statistics fixed) or release the backbone."""
        for p in self.backbone.parameters():
            p.requires_grad_(trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Net":
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()  # a frozen backbone keeps its batch-norm statistics
        elif mode and self.freeze_bn:  # running statistics stay those the head's features were extracted with
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self
