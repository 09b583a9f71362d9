"""The ways a stage can turn image bytes into uint8 tensors (``train.decode``, ``embed.decode``):

- ``pil``: PIL decodes and resamples in the loader's workers. The default, and the path every
  pinned result was computed with.
- ``torchvision``: JPEGs are decoded by ``torchvision.io.decode_jpeg`` (libjpeg-turbo) and
  resampled as uint8 tensors in the workers: the same crops and flips, but torch's antialiased
  bicubic, which is close to PIL's and not equal to it pixel for pixel.
- ``cuda``: the workers read only each JPEG's header (its size decides the crop) and pass the
  bytes on; the main process decodes the whole batch on the GPU (nvJPEG, through
  ``decode_jpeg(device=...)``) and resamples it there, so the CPU cores do almost nothing.

Whatever the path, an image that is not a plain RGB or greyscale JPEG (PNG, WebP, CMYK JPEG...)
is decoded by PIL in the worker, with ``to_rgb``'s transparency on white.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from unicom.images import to_rgb

DECODE_PATHS = ("pil", "torchvision", "cuda")
JPEG_MAGIC = b"\xff\xd8\xff"
# Start-of-frame markers (SOF0-SOF15 but DHT, JPG and DAC): they hold the image's size.
FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class DecodeError(Exception):
    """Row ``row`` of a batch could not be decoded."""

    def __init__(self, row: int, reason: str):
        super().__init__(reason)
        self.row = row


def jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a baseline or progressive JPEG of 1 or 3 components (greyscale,
    YCbCr), read from its frame header; None for anything else (PNG, CMYK, a damaged header).
    A few microseconds: the markers are walked, nothing is decoded."""
    if not data.startswith(JPEG_MAGIC):
        return None
    position = 2
    while position + 9 < len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker in FRAME_MARKERS:
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            components = data[position + 9]
            return (width, height) if components in (1, 3) and width and height else None
        if marker == 0xDA or length < 2:  # scan data before any frame header: not a JPEG
            return None
        position += 2 + length
    return None


def decode_rgb(data: bytes) -> torch.Tensor:
    """Encoded image -> uint8 (3, H, W) on the CPU: libjpeg-turbo through torchvision for a
    plain JPEG, PIL (transparency on white) for anything else."""
    if jpeg_header(data) is not None:
        try:
            return decode_jpeg(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB
            )
        except RuntimeError:
            pass  # PIL reads some damaged files libjpeg-turbo refuses
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return TF.pil_to_tensor(to_rgb(image))


def resized_crop(
    image: torch.Tensor, box: Sequence[int], size: int, flip: bool = False
) -> torch.Tensor:
    """uint8 (3, H, W) -> the crop ``box`` (top, left, height, width) resized to ``size`` x
    ``size`` (antialiased bicubic), mirrored when ``flip``; on the image's device."""
    top, left, height, width = (int(v) for v in box)
    out = TF.resized_crop(
        image,
        top,
        left,
        height,
        width,
        [size, size],
        interpolation=InterpolationMode.BICUBIC,
        antialias=True,
    )
    return out.flip(-1) if flip else out


def square(image: torch.Tensor, size: int) -> torch.Tensor:
    """``unicom.images.SquareTransform`` on a uint8 tensor: the shorter side resized to
    ``size`` (antialiased bicubic), then the centred square."""
    if min(image.shape[-2:]) != size:
        image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(image, [size, size])


# A crop row of PendingImages whose image gets ``square`` instead of a random crop.
SQUARE = (-1, -1, -1, -1, 0)


@dataclass
class PendingImages:
    """A batch of ``rows`` images the main process finishes (the ``cuda`` path): the JPEGs of
    some rows back to back, each with its crop (top, left, height, width, flip; ``SQUARE``
    for the centred square), and the other rows already finished by the worker."""

    rows: int
    size: int
    names: list[str]  # per row, what an error message calls its image
    data: torch.Tensor  # uint8 (total bytes,)
    offsets: torch.Tensor  # int64 (pending + 1,)
    pending: torch.Tensor  # int64 (pending,): the batch row of each JPEG
    crops: torch.Tensor  # int64 (pending, 5)
    done: torch.Tensor  # uint8 (finished, 3, size, size)
    done_rows: torch.Tensor  # int64 (finished,)

    @classmethod
    def pack(
        cls,
        size: int,
        items: Sequence[tuple[bytes, Sequence[int]] | torch.Tensor],
        names: Sequence[str],
    ) -> PendingImages:
        """``items``: per row, a finished (3, size, size) tensor or (JPEG bytes, crop)."""
        jpegs = [(row, item) for row, item in enumerate(items) if not torch.is_tensor(item)]
        done = [(row, item) for row, item in enumerate(items) if torch.is_tensor(item)]
        blob = bytearray(b"".join(data for _, (data, _) in jpegs))
        lengths = [len(data) for _, (data, _) in jpegs]
        finished = [image for _, image in done]
        return cls(
            rows=len(items),
            size=size,
            names=list(names),
            data=torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.zeros(0).byte(),
            offsets=torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0),
            pending=torch.tensor([row for row, _ in jpegs], dtype=torch.int64),
            crops=torch.tensor([list(c) for _, (_, c) in jpegs], dtype=torch.int64).view(-1, 5),
            done=torch.stack(finished) if finished else torch.zeros(0, 3, size, size).byte(),
            done_rows=torch.tensor([row for row, _ in done], dtype=torch.int64),
        )

    def pin_memory(self) -> PendingImages:
        # The DataLoader calls it (pin_memory=True): the copies to the GPU become asynchronous.
        self.data, self.done = self.data.pin_memory(), self.done.pin_memory()
        return self

    def jpegs(self) -> list[torch.Tensor]:
        bounds = self.offsets.tolist()
        return [self.data[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def finish(
        self, device: torch.device, failed: list[tuple[int, str]] | None = None
    ) -> torch.Tensor:
        """uint8 (rows, 3, size, size) on ``device``. A JPEG that neither ``device`` nor the
        CPU can decode raises DecodeError naming its row or, given ``failed``, is appended
        there as (row, reason) and left black."""
        images = torch.zeros(self.rows, 3, self.size, self.size, dtype=torch.uint8, device=device)
        if len(self.done_rows):
            rows = self.done_rows.to(device, non_blocking=True)
            images[rows] = self.done.to(device, non_blocking=True)
        rows = self.pending.tolist()
        decoded = decode_jpegs(self.jpegs(), device, rows, failed) if rows else []
        for row, image, crop in zip(rows, decoded, self.crops.tolist(), strict=True):
            *box, flip = crop
            if image is None:
                continue
            if box[0] < 0:
                images[row] = square(image, self.size)
            else:
                images[row] = resized_crop(image, box, self.size, bool(flip))
        return images


def decode_jpegs(
    jpegs: list[torch.Tensor],
    device: torch.device,
    rows: Sequence[int],
    failed: list[tuple[int, str]] | None = None,
) -> list[torch.Tensor | None]:
    """A batch of JPEGs decoded on ``device`` in one call. When the batch fails, one by one:
    a JPEG the device refuses is decoded on the CPU (then moved), and one that no decoder
    reads raises DecodeError naming ``rows[i]`` or, given ``failed``, is recorded there and
    comes back as None."""
    try:
        return list(decode_jpeg(jpegs, ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    images: list[torch.Tensor | None] = []
    for row, data in zip(rows, jpegs, strict=True):
        try:
            images.append(decode_jpeg(data, ImageReadMode.RGB, device=device))
            continue
        except RuntimeError:
            pass
        try:
            images.append(decode_jpeg(data, ImageReadMode.RGB).to(device))
        except RuntimeError as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            if failed is None:
                raise DecodeError(row, reason) from None
            failed.append((row, reason))
            images.append(None)
    return images
