"""Partial FC: a margin-softmax head over millions of classes, its prototypes split across ranks.

Rank ``r`` of ``W`` holds the prototypes of one contiguous class range (``class_range``).
Every step, on every rank:

1. gather the global batch: embeddings ``(B, dim)`` (gradients flow back to their owner) and
   labels ``(B,)``, ``B = sum_r B_r``;
2. choose ``K`` prototypes of the range: every class that occurs in the batch (positives) plus
   uniformly random others, ``K = max(round(sample_rate * num_local), #positives)``; only
   these rows enter the step, so the others get exactly zero gradient;
3. choose ``D' = round(feature_rate * dim)`` feature dimensions, the same on every rank (the
   generator is seeded identically everywhere), and take cosines on those dimensions only;
4. the head's loss over those cosines, exact over all ranks' columns: ``ArcFaceLoss``
   (``unicom.train.losses``; logits ``s * cos(theta_y + m)`` for the label, ``s * cos(theta_j)``
   otherwise, the row max and the sum of exponentials all-reduced) or, with ``l`` labels a row,
   MLCD's multi-label margin loss (``unicom.train.mlcd.MLCDLoss``, ``train.positives``).

With world size 1 (or no process group) nothing distributed is called.

Backbone under DDP: the loss is the same global mean on every rank and each rank's embeddings
get their exact gradient, so the backbone wants the SUM of the ranks' gradients; DDP averages,
so scale the backbone's gradients by the world size (or register a summing comm hook).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from unicom.errors import UnicomError
from unicom.train.losses import MarginLoss
from unicom.train.seeds import SeedStream, derived_seed

# Prototypes are initialised in blocks of classes, each block from its own seed, so the full
# matrix is the same whatever the world size.
INIT_BLOCK = 8192
INIT_STD = 0.01
# Above this share of the free classes a permutation is cheaper than repeated draws (measured
# at 1M classes on 2 cores, permutation vs draws: 41 vs 14 ms at 0.1, 42 vs 45 ms at 0.3).
DRAW_SHARE_LIMIT = 0.3


def class_range(num_classes: int, rank: int, world: int) -> tuple[int, int]:
    """Classes ``[start, end)`` of ``rank``; the first ``num_classes % world`` get one more."""
    if not 0 <= rank < world:
        raise UnicomError(f"rank {rank} is not in [0, {world})")
    if num_classes < world:
        raise UnicomError(f"num_classes {num_classes} is smaller than the world size {world}")
    base, extra = divmod(num_classes, world)
    start = rank * base + min(rank, extra)
    return start, start + base + int(rank < extra)


def init_prototypes(dim: int, start: int, end: int, seed: int) -> torch.Tensor:
    """Rows ``[start, end)`` of one N(0, INIT_STD^2) ``(num_classes, dim)`` matrix."""
    weight = torch.empty(end - start, dim)
    for block in range(start // INIT_BLOCK, (end - 1) // INIT_BLOCK + 1):
        first = block * INIT_BLOCK
        generator = torch.Generator().manual_seed(
            derived_seed(seed, SeedStream.PROTOTYPE_INIT, block)
        )
        rows = torch.empty(INIT_BLOCK, dim).normal_(0.0, INIT_STD, generator=generator)
        lo, hi = max(first, start), min(first + INIT_BLOCK, end)
        weight[lo - start : hi - start] = rows[lo - first : hi - first]
    return weight


def draw_distinct(
    num: int, excluded: torch.Tensor, count: int, generator: torch.Generator
) -> torch.Tensor:
    """``count`` distinct values of ``range(num)`` outside ``excluded`` (a CPU index tensor),
    uniformly at random, in no particular order.

    A permutation of all ``num`` costs 20-50 ms at 1M classes on one rank, as much as the rest
    of the head's step on a GPU. For a small share (r1 ~0.1), uniform draws instead, keeping each
    value's first appearance and skipping excluded ones: exactly sequential sampling without
    replacement, in O(count log count).
    """
    taken = torch.zeros(num, dtype=torch.bool)
    taken[excluded] = True
    free = num - int(taken.sum())
    count = min(count, free)
    if count > DRAW_SHARE_LIMIT * free:
        # A random order restricted to the free values is a uniformly random order of them.
        order = torch.randperm(num, generator=generator)
        return order[~taken[order]][:count]
    chosen = torch.empty(0, dtype=torch.long)
    while len(chosen) < count:
        short, free_now = count - len(chosen), free - len(chosen)
        # Expected draws for `short` new values while `free_now` of `num` are free, plus slack.
        size = int(1.1 * num * math.log(free_now / (free_now - short))) + 64
        draws = torch.randint(0, num, (size,), generator=generator)
        draws = draws[~taken[draws]]
        values, inverse = torch.unique(draws, return_inverse=True)
        first = torch.full((len(values),), len(draws), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(len(draws)), "amin")
        new = values[first.argsort()[:short]]
        taken[new] = True
        chosen = torch.cat([chosen, new])
    return chosen


def _all_gather(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``(sizes[r], ...)`` tensor, in rank order."""
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))  # all_gather wants equal shapes
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


class _GatherWithGrad(torch.autograd.Function):
    """``(B_r, D)`` on each rank -> ``(B, D)`` on every rank.

    Every rank's logits depend on every embedding, so the gradient of our rows is the sum of all
    ranks' gradients for them: all_reduce, then keep our slice.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        return _all_gather(local, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows], None, None


@dataclass
class HeadSelection:
    """What one step of the head uses (``PartialFC.select``): ``classes (K,)`` sorted local
    rows of the prototypes, ``rows, cols (n,)`` the batch row of each label this rank owns and
    its column among ``classes``, ``dims (D',)`` the feature dimensions, ``sizes`` every rank's
    batch rows."""

    classes: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    dims: torch.Tensor
    sizes: list[int]


class PartialFC(nn.Module):
    """The head: ``loss`` over sampled prototypes and features; ``weight (num_local, dim)``:
    this rank's rows. ``loss`` is ``ArcFaceLoss`` (labels ``(B,)``, Unicom) or ``MLCDLoss``
    (labels ``(B, l)``, l positives a row); each takes the margin, the scale and the form of
    the margin's gradient.

    Example (one process here; under torchrun every rank runs the same lines on its own batch,
    and the backbone's DDP sums the ranks' gradients, see the module's docstring):

    >>> from unicom.train.losses import ArcFaceLoss
    >>> backbone = torch.nn.Linear(32, 16)
    >>> head = PartialFC(ArcFaceLoss(margin=0.3, scale=64.0), num_classes=1000, dim=16)
    >>> optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.1)
    >>> images, labels = torch.randn(8, 32), torch.randint(0, 1000, (8,))
    >>> selection = head.select(labels, torch.device("cpu"))  # labels still on the host
    >>> loss = head(backbone(images), selection)  # or head(backbone(images), labels)
    >>> loss.backward()
    >>> optimizer.step()
    >>> len(head.last_selected_classes)  # sample_rate 0.1: the labels' classes + random others
    100

    MLCD, three positive classes a row, the authors' form of the margin's gradient:

    >>> from unicom.train.mlcd import MLCDLoss
    >>> mlcd = PartialFC(MLCDLoss(0.3, 64.0, margin_gradient="authors"), 1000, dim=16)
    >>> loss = mlcd(backbone(images), torch.randint(0, 1000, (8, 3)))

    ``sample_rate=1`` is the full softmax, ``feature_rate=1`` uses every dimension.
    ``sparse_grad=True`` (only matters when sample_rate < 1) makes ``weight.grad`` a sparse COO
    tensor of the K selected rows, so unselected rows cost no memory; optimizers must then
    support sparse gradients (torch SGD without weight decay does, SparseAdam does).
    Sampling is driven by generators whose state is in ``state_dict()`` (``_extra_state``), so a
    resumed run draws the same samples. Call it on every rank each step (it runs collectives).
    """

    def __init__(
        self,
        loss: MarginLoss,
        num_classes: int,
        dim: int,
        sample_rate: float = 0.1,
        feature_rate: float = 0.5,
        seed: int = 0,
        sparse_grad: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(loss, MarginLoss):
            raise UnicomError(f"PartialFC loss must be an ArcFaceLoss or MLCDLoss, got {loss!r}")
        for name, rate in (("sample_rate", sample_rate), ("feature_rate", feature_rate)):
            if not 0.0 < rate <= 1.0:
                raise UnicomError(f"PartialFC {name} must be in (0, 1], got {rate}")
        self.distributed = (
            dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        )
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.num_classes, self.dim = num_classes, dim
        self.loss = loss
        self.sample_rate, self.feature_rate = sample_rate, feature_rate
        self.sparse_grad = sparse_grad
        self.start, self.end = class_range(num_classes, self.rank, self.world)
        self.num_local = self.end - self.start
        self.num_sampled = max(1, round(sample_rate * self.num_local))
        self.num_dims = max(1, round(feature_rate * dim))
        self.weight = nn.Parameter(init_prototypes(dim, self.start, self.end, seed))
        self._class_rng = torch.Generator().manual_seed(
            derived_seed(seed, SeedStream.CLASS_DRAWS, self.rank)
        )
        self._dim_rng = torch.Generator().manual_seed(derived_seed(seed, SeedStream.DIM_DRAWS))
        self.last_selected_classes: torch.Tensor | None = None  # (K,) global class ids
        self.last_selected_dims: torch.Tensor | None = None  # (D',)
        self.last_num_positives = 0  # classes of the batch among last_selected_classes

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor | HeadSelection
    ) -> torch.Tensor:
        """``embeddings (B_r, dim)``, ``labels (B_r,)`` (ArcFace) or ``(B_r, l)`` (MLCD: each
        row's ``l`` positive classes, all kept among the sampled prototypes) -> scalar loss, mean
        over the global B. ``labels`` may also be ``select``'s result for them.
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise UnicomError(
                f"PartialFC expects embeddings (batch, {self.dim}), got {tuple(embeddings.shape)}"
            )
        if isinstance(labels, HeadSelection):
            selection = labels
            if selection.sizes[self.rank] != len(embeddings):
                raise UnicomError(
                    f"PartialFC labels of {selection.sizes[self.rank]} rows do not match "
                    f"{len(embeddings)} embeddings"
                )
        else:
            if labels.ndim not in (1, 2) or labels.shape[:1] != embeddings.shape[:1]:
                raise UnicomError(
                    f"PartialFC labels shape {tuple(labels.shape)} does not match "
                    f"{len(embeddings)} embeddings"
                )
            selection = self.select(labels.to(embeddings.device), embeddings.device)
        embeddings = embeddings.to(self.weight.dtype)
        if self.distributed:
            embeddings = _GatherWithGrad.apply(embeddings, selection.sizes, self.rank)  # (B, dim)

        classes, rows, cols = selection.classes, selection.rows, selection.cols
        dims = selection.dims
        if self.sample_rate < 1.0:
            # Only the K selected rows enter the graph, hence the only rows with a gradient.
            protos = F.embedding(classes, self.weight, sparse=self.sparse_grad)  # (K, dim)
        else:
            protos = self.weight
        if self.feature_rate < 1.0:
            embeddings, protos = embeddings[:, dims], protos[:, dims]  # (B, D'), (K, D')

        # (B, K) cosines on the selected dims. Scaling the product's columns by the prototypes'
        # inverse norms avoids a normalised copy of the prototypes, and a product's backward
        # holds one (B, K) temporary fewer than a division's.
        inv_norm = protos.norm(dim=1).clamp_min(1e-12).reciprocal()  # (K,)
        cos = F.normalize(embeddings, dim=1) @ protos.T * inv_norm
        if cos.dtype in (torch.float16, torch.bfloat16):  # (under autocast)
            cos = cos.float()  # a sum of up to K exps overflows half precision
        return self.loss(cos, rows, cols, self.distributed)

    def select(self, labels: torch.Tensor, device: torch.device | None = None) -> HeadSelection:
        """This step's prototypes and dimensions for ``labels`` (``(B_r,)``; MLCD: ``(B_r, l)``),
        computed where the labels are and moved to ``device`` (default: the labels').

        The trainer calls it with the loader's labels, still on the host, before the backbone
        runs: the bounds check, ``nonzero``, ``unique`` and the CPU draw of the negatives then
        never wait for the GPU (labels on a GPU make each of them a synchronisation), and the
        result is the same integers either way. Collective when distributed (the labels are
        gathered where they are: over gloo on the host, see ``unicom.distributed``).
        """
        labels = self._label_rows(labels)
        device = labels.device if device is None else device
        labels = labels.to(torch.long)
        sizes = [len(labels)]
        if self.distributed:
            count = torch.tensor([len(labels)], device=labels.device)
            sizes = _all_gather(count, [1] * self.world).tolist()
            labels = _all_gather(labels, sizes)  # (B,)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0].item()
            raise UnicomError(f"PartialFC label {bad} is outside [0, {self.num_classes})")
        classes, rows, cols = (
            t.to(device, non_blocking=True) for t in self._select_classes(labels)
        )
        dims = self._select_dims(device)
        self.last_selected_classes, self.last_selected_dims = classes + self.start, dims
        return HeadSelection(classes, rows, cols, dims, sizes)

    def _label_rows(self, labels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` for ArcFace, ``(B, l)`` for MLCD (a ``(B,)`` is one positive a row)."""
        if labels.ndim not in (1, 2):
            raise UnicomError(f"PartialFC labels shape {tuple(labels.shape)} is not (B,) or (B, l)")
        if self.loss.multi_label:
            return labels if labels.ndim == 2 else labels[:, None]
        if labels.ndim == 2 and labels.shape[1] != 1:
            raise UnicomError(
                f"PartialFC with {type(self.loss).__name__} takes one label a row, got labels "
                f"{tuple(labels.shape)} (several positives a row: MLCDLoss)"
            )
        return labels.reshape(-1)

    def _select_classes(self, labels: torch.Tensor):
        """``labels (B,)`` or ``(B, l)`` -> ``classes (K,)``: sorted local rows used this step,
        and ``rows, cols (n,)``: the batch row of each label this rank owns, and that label's
        position in ``classes``."""
        local = labels - self.start
        if labels.ndim == 2:  # one entry per (row, positive), rows repeated
            local = local.reshape(-1)
            row_of = torch.arange(len(labels), device=labels.device)
            row_of = row_of.repeat_interleave(labels.shape[1])
        owned = ((local >= 0) & (local < self.num_local)).nonzero().squeeze(1)
        local = local[owned]
        rows = row_of[owned] if labels.ndim == 2 else owned
        positives = local.unique()
        self.last_num_positives = len(positives)
        if self.sample_rate >= 1.0:
            return torch.arange(self.num_local, device=labels.device), rows, local
        wanted = max(0, self.num_sampled - len(positives))
        negatives = draw_distinct(self.num_local, positives.cpu(), wanted, self._class_rng)
        classes = torch.cat([positives, negatives.to(labels.device)]).sort().values
        return classes, rows, torch.searchsorted(classes, local)

    def _select_dims(self, device: torch.device) -> torch.Tensor:
        """``(D',)`` sorted feature dims; the generator is in the same state on every rank."""
        if self.feature_rate >= 1.0:
            return torch.arange(self.dim, device=device)
        order = torch.randperm(self.dim, generator=self._dim_rng)
        return order[: self.num_dims].sort().values.to(device, non_blocking=True)

    def get_extra_state(self) -> dict:
        return {
            "class_range": [self.start, self.end],
            "class_rng": self._class_rng.get_state(),
            "dim_rng": self._dim_rng.get_state(),
        }

    def set_extra_state(self, state: dict) -> None:
        if list(state["class_range"]) != [self.start, self.end]:
            raise UnicomError(
                f"PartialFC checkpoint holds classes {state['class_range']}, "
                f"but rank {self.rank} of {self.world} owns [{self.start}, {self.end})"
            )
        self._class_rng.set_state(state["class_rng"])
        self._dim_rng.set_state(state["dim_rng"])

    def extra_repr(self) -> str:
        return (
            f"classes [{self.start}, {self.end}) of {self.num_classes}, dim={self.dim}, "
            f"{self.loss}, sample_rate={self.sample_rate}, "
            f"feature_rate={self.feature_rate}, rank {self.rank} of {self.world}"
        )
