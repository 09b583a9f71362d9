"""The multi-label margin loss of MLCD, over cosines spread across ranks (``train.positives`` > 1).

Source: An et al., "Multi-label Cluster Discrimination for Visual Representation Learning",
ECCV 2024 (arXiv 2407.17331), Sec. 3: each image takes its ``l`` nearest centroids as positive
classes, and the loss separates the positive classes from the negative ones instead of a softmax
over one label. Its authors released no code for this loss, so this is our reading of the
paper's description: Su's multi-label "softmax + cross-entropy" (log-sum-exp over negatives plus
log-sum-exp over negated positives, each against a zero logit) on scaled cosines, with Unicom's
additive angular margin on the positives:

    L_i = log(1 + sum_{j in N_i} exp(s * cos theta_ij))
        + log(1 + sum_{p in P_i} exp(-s * cos(theta_ip + m)))

``P_i``: the row's ``l`` positive classes (always among the sampled prototypes), ``N_i``: the
other sampled classes of every rank, ``s`` the scale, ``m`` the margin; the loss is the mean over
the global batch. The zero logit ("1 +") is the threshold between the two groups: a positive
wants ``cos(theta + m) > 0``, a negative ``cos theta < 0``, each independently of the others, so
two positives never compete as a softmax over them would.

Distributed like the ArcFace head: each rank holds the cosines to its own prototypes; the two
per-row maxima (each at least 0, the zero logit's) and the two sums of exponentials are
all-reduced, so every rank computes the exact loss; the gradient is local. The margin's
gradient is exact or the authors' form (``unicom.train.losses``): the authors released no code
for this loss, so ``authors`` treats its positives' margin as their ArcFace code does (a
constant shift for the gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from unicom.train.losses import MarginLoss, margin_cosines, margin_slope


class _ShardedMultiLabel(torch.autograd.Function):
    """``cos (B, K)``: cosines to this rank's sampled prototypes; ``rows, cols (n,)``: the
    (batch row, column) of each positive this rank owns. Returns the mean of ``L_i``.

    With ``z_ij = s c_ij`` for negatives and ``u_ip = -s cos(theta_ip + m)`` for positives:
        d L_i / d c_ij = s * exp(z_ij) / (1 + sum_N exp(z))                        (negative)
        d L_i / d c_ip = -s * exp(u_ip) / (1 + sum_P exp(u)) * dcos(theta + m)/dc  (positive)
        dcos(theta + m) / dc = cos m + sin m * cos(theta) / sin(theta)   (1: the authors' form)
    """

    @staticmethod
    def forward(ctx, cos, rows, cols, margin: float, scale: float, exact: bool, distributed):
        batch = len(cos)
        positive_cos, theta, margin_cos = margin_cosines(cos[rows, cols], margin)  # (n,)
        positive_logit = -scale * margin_cos  # u, (n,)
        negative_logit = cos * scale  # z, (B, K); becomes the negatives' gradient in place
        negative_logit[rows, cols] = -math.inf  # positives are not negatives
        # Shifts for stable exps: at least 0, the zero logit's exponent.
        shifts = torch.zeros(2, batch, dtype=cos.dtype, device=cos.device)
        shifts[0] = negative_logit.max(dim=1).values.clamp_min(0.0)
        shifts[1].scatter_reduce_(0, rows, positive_logit, "amax", include_self=True)
        if distributed:
            dist.all_reduce(shifts, op=dist.ReduceOp.MAX)
        negative_shift, positive_shift = shifts
        negative_exp = negative_logit.sub_(negative_shift[:, None]).exp_()  # (B, K), 0 at P
        positive_exp = (positive_logit - positive_shift[rows]).exp()  # (n,)
        sums = torch.stack([negative_exp.sum(dim=1), torch.zeros_like(negative_shift)])
        sums[1].index_add_(0, rows, positive_exp)
        if distributed:
            dist.all_reduce(sums)
        negative_total = torch.exp(-negative_shift) + sums[0]  # 1 + sum, shifted
        positive_total = torch.exp(-positive_shift) + sums[1]
        loss = (
            negative_total.log() + negative_shift + positive_total.log() + positive_shift
        ).mean()
        slope = margin_slope(positive_cos, theta, margin, exact)
        grad = negative_exp.div_(negative_total[:, None]).mul_(scale / batch)
        grad[rows, cols] = -scale / batch * positive_exp / positive_total[rows] * slope
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None, None


@dataclass(frozen=True)
class MLCDLoss(MarginLoss):
    """MLCD's multi-label margin loss (the module's ``L_i``). Labels ``(B, l)``: each row's
    ``l`` positive classes, all kept among the sampled prototypes (``(B,)``: one each)."""

    multi_label: ClassVar[bool] = True
    function: ClassVar[type[torch.autograd.Function]] = _ShardedMultiLabel
