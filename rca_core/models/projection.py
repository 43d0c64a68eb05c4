"""Projection head and region embeddings (docs/method.md: Memory bank, Semantic contrast).

`ProjectionHead`: conv3x3-BN-ReLU-conv3x3 on backbone features -> a per-pixel embedding map (B, D, h, w).
`region_masks(cam_logits, tags)`: for every (image, ground-truth class) pair the binary region
mask_c = P_c > mean(P_c), where P = softmax over the foreground class channels of the CAM logits
(detached). Softmax over *all* foreground channels, as the official code does: restricted to the
image's tags, a single-tag image would give P_c = 1 everywhere and an empty mask.
`region_embeddings(emb_map, masks, index)`: masked average of the embedding map per region.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ProjectionHead(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False), nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True), nn.Conv2d(in_channels, dim, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The head up to its last conv: conv3x3-BN-ReLU (B, C, h, w)."""
        return self.net[2](self.net[1](self.net[0](x)))

    def region_embeddings(self, hidden: torch.Tensor, masks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """`region_embeddings(self(x), masks, index)` from `hidden = self.hidden(x)`, without running the last 3x3
        conv over every pixel. That conv is linear, so the masked average of its output is its taps applied to
        the averages of the hidden map under the mask shifted by each tap (zero padding: no tap reads outside the
        map). Costs R x 9 x C x h x w multiply-adds for R regions instead of D x C x 9 x h x w for the map
        (D = 512 embedding channels): the same values, up to float rounding."""
        conv = self.net[3]
        if index.numel() == 0:
            return hidden.new_zeros((0, conv.out_channels))
        kh, kw = conv.kernel_size
        ph, pw = conv.padding
        h, w = hidden.shape[2:]
        m = masks.to(hidden.dtype)                                          # (R, h, w)
        mp = F.pad(m, (pw, pw, ph, ph))
        # shifted[r, i, j, q] = m[r, q - (i - ph, j - pw)]: the pixels whose tap (i, j) reads the hidden pixel q
        shifted = torch.stack([torch.stack([mp[:, 2 * ph - i:2 * ph - i + h, 2 * pw - j:2 * pw - j + w]
                                            for j in range(kw)], 1) for i in range(kh)], 1)  # (R, kh, kw, h, w)
        g = torch.einsum("rijhw,rchw->rijc", shifted, hidden[index[:, 0]])  # (R, kh, kw, C)
        total = torch.einsum("dcij,rijc->rd", conv.weight.to(g.dtype), g)
        n = m.sum(dim=(1, 2))
        if conv.bias is not None:
            total = total + n.unsqueeze(1) * conv.bias.to(total.dtype)
        return total / n.clamp_min(1.0).unsqueeze(1)


def region_masks(cam_logits: torch.Tensor, tags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cam_logits (B, C, h, w), tags (B, C) multi-hot -> masks (R, h, w) float and index (R, 2) = (image, class).

    A mask that comes out empty (a flat map) falls back to the whole image.
    """
    index = torch.nonzero(tags > 0.5)                                   # (R, 2)
    if index.numel() == 0:
        return cam_logits.new_zeros((0,) + tuple(cam_logits.shape[2:])), index
    prob = F.softmax(cam_logits.detach().float(), dim=1)
    p = prob[index[:, 0], index[:, 1]]                                  # (R, h, w)
    masks = (p > p.mean(dim=(1, 2), keepdim=True)).float()
    empty = masks.sum(dim=(1, 2)) == 0
    if empty.any():
        masks[empty] = 1.0
    return masks, index


def region_embeddings(emb_map: torch.Tensor, masks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Masked average of emb_map (B, D, h, w) over masks (R, h, w) of images index[:, 0] -> (R, D)."""
    if index.numel() == 0:
        return emb_map.new_zeros((0, emb_map.shape[1]))
    m = masks.to(emb_map.dtype)
    feats = emb_map[index[:, 0]]                                        # (R, D, h, w)
    return torch.einsum("rhw,rdhw->rd", m, feats) / m.sum(dim=(1, 2)).clamp_min(1.0).unsqueeze(1)
