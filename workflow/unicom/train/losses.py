"""The losses of the partial head (``PartialFC``): what they share, and ArcFace.

A loss takes the cosines of the global batch to this rank's selected prototypes and returns
the global batch's mean loss, exact over all ranks (``MarginLoss.__call__``). Both losses put
Unicom's additive angular margin on the label's cosine, ``cos(theta + m)``; this module holds
that margin (``COS_LIMIT``, ``margin_cosines``, the two forms of its gradient), the base class
and ArcFace, Unicom's loss (one label per row). MLCD's multi-label loss, the variant, is
``unicom.train.mlcd.MLCDLoss``.

The margin's gradient (``margin_gradient``, ``train.margin_gradient``):

- ``exact`` (the default): the derivative of the loss as written, so the label's cosine ``c``
  gets ``d cos(theta + m) / dc = cos m + sin m * cos(theta) / sin(theta)`` times the logit's;
- ``authors``: what deepglint/unicom's and insightface's arcface_torch ``CombinedMarginLoss``
  compute. They add the margin in place under ``torch.no_grad``, so autograd sees the target
  logit as ``s * c``: its gradient is the logit's times 1, as if ``cos(theta + m) - c`` were a
  constant. The loss's value is the same; only the gradient of the labels' cosines differs
  (e.g. -64.0 instead of -67.8 at ``cos(theta) = 1/3``, ``m = 0.3``, ``s = 64``, a softmax
  far from the label). For reproducing their numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from unicom.errors import UnicomError

# acos' gradient is infinite at cos = +-1; clamp just inside.
COS_LIMIT = 1.0 - 1e-7
MARGIN_GRADIENTS = ("exact", "authors")


def margin_cosines(cos: torch.Tensor, margin: float) -> tuple[torch.Tensor, ...]:
    """Labels' cosines ``(n,)`` -> ``(c, theta, cos(theta + m))``, ``c`` clamped inside +-1."""
    clamped = cos.clamp(-COS_LIMIT, COS_LIMIT)
    theta = torch.acos(clamped)
    return clamped, theta, torch.cos(theta + margin)


def margin_slope(
    clamped: torch.Tensor, theta: torch.Tensor, margin: float, exact: bool
) -> torch.Tensor:
    """``d cos(theta + m) / dc`` of ``margin_cosines``' results when ``exact``; else 1 (the
    authors' form: the margin is a constant shift for the gradient)."""
    if not exact:
        return torch.ones_like(clamped)
    return math.cos(margin) + math.sin(margin) * clamped / torch.sin(theta)


@dataclass(frozen=True)
class MarginLoss:
    """A loss of ``PartialFC``: ``loss(cos, rows, cols, distributed)`` with ``cos (B, K)``
    this rank's cosines (global batch x selected prototypes) and ``rows, cols (n,)`` the
    (batch row, column) of each label this rank owns -> the global batch's mean loss, the same
    on every rank (``distributed``: all-reduce over the default process group)."""

    margin: float = 0.3
    scale: float = 64.0
    margin_gradient: str = "exact"
    multi_label: ClassVar[bool] = False  # labels (B, l) with several positives a row
    function: ClassVar[type[torch.autograd.Function]]

    def __post_init__(self) -> None:
        if self.margin_gradient not in MARGIN_GRADIENTS:
            raise UnicomError(
                f"{type(self).__name__} margin_gradient must be one of "
                f"{', '.join(MARGIN_GRADIENTS)}, got {self.margin_gradient!r}"
            )
        if not self.scale > 0 or not self.margin >= 0:
            raise UnicomError(
                f"{type(self).__name__} needs scale > 0 and margin >= 0, "
                f"got scale {self.scale} and margin {self.margin}"
            )

    def __call__(self, cos, rows, cols, distributed: bool) -> torch.Tensor:
        exact = self.margin_gradient == "exact"
        return self.function.apply(cos, rows, cols, self.margin, self.scale, exact, distributed)


class _ShardedArcFace(torch.autograd.Function):
    """ArcFace softmax cross-entropy, mean over the batch, of cosines spread over the ranks.

    With ``c = cos``, ``theta_y = acos(c_iy)``:
        z_ij = s * c_ij,   z_iy = s * cos(theta_y + m)                 (logits)
        loss = mean_i [ log sum_j exp(z_ij) - z_iy ]                   (j over every rank)
        d loss / d c_ij = s * (softmax_ij - [j == y]) / B * (j == y ? margin_slope : 1)
    The backward is local: the softmax already holds the all-reduced denominator.
    """

    @staticmethod
    def forward(ctx, cos, rows, cols, margin: float, scale: float, exact: bool, distributed):
        label_cos, theta, margin_cos = margin_cosines(cos[rows, cols], margin)  # (n,)
        label_logit = scale * margin_cos
        logits = cos * scale  # (B, K), becomes the softmax in place
        logits[rows, cols] = label_logit
        row_max = logits.max(dim=1).values  # (B,) shift for a stable exp
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        probs = logits.sub_(row_max[:, None]).exp_()
        stats = torch.stack([probs.sum(dim=1), torch.zeros_like(row_max)])  # (2, B)
        stats[1, rows] = label_logit
        if distributed:
            dist.all_reduce(stats)  # sum of exps; label logit from its owner (zeros elsewhere)
        sum_exp, label_logits = stats
        probs /= sum_exp[:, None]
        ctx.save_for_backward(probs, rows, cols, margin_slope(label_cos, theta, margin, exact))
        ctx.scale = scale
        return (sum_exp.log() + row_max - label_logits).mean()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        probs, rows, cols, slope = ctx.saved_tensors
        per_logit = grad_loss * ctx.scale / len(probs)
        grad = probs * per_logit  # (B, K)
        grad[rows, cols] = (probs[rows, cols] - 1) * per_logit * slope
        return grad, None, None, None, None, None, None


@dataclass(frozen=True)
class ArcFaceLoss(MarginLoss):
    """Unicom's loss: the softmax cross-entropy over every rank's columns, the label's logit
    ``s * cos(theta_y + m)``, the others ``s * cos(theta_j)``. Labels ``(B,)`` (or ``(B, 1)``)."""

    function: ClassVar[type[torch.autograd.Function]] = _ShardedArcFace
