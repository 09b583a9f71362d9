"""Existing data as the run's input: webdataset shards (data.shards) and precomputed embeddings
in clip-retrieval's layout (data.embeddings), checked at parse time.

What the Snakefile decides before any job, from the config, file names, npy headers and
Parquet footers: which tars the run takes and the parts they become, and whether the embedding
files agree with each other and with the named encoder. Every problem is a
:class:`~unicom.errors.UnicomError` naming the config key; nothing here prints or exits.
Library layer: no stage package is imported.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unicom.errors import UnicomError
from unicom.formats import part_name
from unicom.shards import scan_tar_samples

SHARDS_KEY = "config key data.shards"
EMBEDDINGS_KEY = "config key data.embeddings"
# clip-retrieval's layout: folder -> file pattern (N numbers the files; zero-padded or not).
EMBEDDING_LAYOUT = {
    "image": ("img_emb", re.compile(r"^img_emb_(\d+)\.npy$")),
    "text": ("text_emb", re.compile(r"^text_emb_(\d+)\.npy$")),
    "metadata": ("metadata", re.compile(r"^metadata_(\d+)\.parquet$")),
}
# The metadata column that holds the webdataset key of each row.
KEY_COLUMN = "image_path"


# --------------------------------------------------------------------------- the config


def uses_shards(config: Mapping[str, Any]) -> bool:
    """Whether the run starts from existing shards (no URL list, no download)."""
    return bool(config["data"]["shards"])


def uses_embeddings(config: Mapping[str, Any]) -> bool:
    """Whether precomputed embeddings replace the embed stage."""
    return config["data"]["embeddings"] is not None


# --------------------------------------------------------------------------- shards


def shard_files(patterns: Sequence[str]) -> list[str]:
    """The tars data.shards names, as absolute paths: each pattern's matches sorted, in the
    patterns' order. A pattern that matches nothing, a match that is no .tar file, or a file
    matched twice is an error."""
    files: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise UnicomError(f"{SHARDS_KEY}: no file matches {pattern!r}")
        for match in matches:
            path = os.path.realpath(match)
            if not match.endswith(".tar") or not os.path.isfile(path):
                raise UnicomError(
                    f"{SHARDS_KEY}: {pattern!r} matches {match}, which is not a .tar file "
                    "(name the tars, e.g. 'folder/*.tar')"
                )
            if path in seen:
                raise UnicomError(f"{SHARDS_KEY}: {match} is matched twice")
            seen.add(path)
            files.append(path)
    return files


def status_table(tar: str) -> str | None:
    """img2dataset's Parquet table of a tar (same name, .parquet), when there is one."""
    table = tar.removesuffix(".tar") + ".parquet"
    return table if os.path.isfile(table) else None


def shards_taken(
    files: Sequence[str], max_rows: int | None, ranks: int = 1
) -> tuple[int, int | None]:
    """How many of ``files`` the run takes, and the samples they hold: all of them (samples
    not counted) without data.max_rows, else whole shards from the first until they hold
    max_rows samples (tar headers only), and at least one per training rank (a rank with no
    shard would have no sample)."""
    if max_rows is None:
        return len(files), None
    samples = 0
    for count, path in enumerate(files, start=1):
        found = scan_tar_samples(path)
        if found is None:
            raise UnicomError(f"{SHARDS_KEY}: {path} is not an uncompressed tar")
        samples += found
        if samples >= max_rows and count >= ranks:
            return count, samples
    return len(files), samples


def padded_parts(shards: int, shards_per_job: int) -> list[str]:
    """Part names for ``shards`` tars, plus empty parts up to a multiple of shards_per_job
    (every per-shard job takes a full batch of names)."""
    if shards < 1:
        raise UnicomError(f"{SHARDS_KEY}: no shard to take")
    parts = -(-shards // shards_per_job) * shards_per_job
    return [part_name(i) for i in range(parts)]


def check_shard_tables(files: Sequence[str], config: Mapping[str, Any]) -> None:
    """From the first tar's status table footer: the columns the config reads from the shard
    tables (data.extra_cols for the filters, sha256 for dedup.content)."""
    table = status_table(files[0])
    wanted = list(config["data"]["extra_cols"])
    if config["dedup"]["content"]:
        wanted.append("sha256")
    if not wanted:
        return
    if table is None:
        raise UnicomError(
            f"{SHARDS_KEY}: {files[0]} has no status table beside it ({Path(files[0]).stem}"
            f".parquet), where {wanted[0]} would be (dedup.content needs sha256, the filters "
            "data.extra_cols)"
        )
    names = read_schema(table, SHARDS_KEY).names
    for column in wanted:
        if column not in names:
            key = "dedup.content" if column == "sha256" else "data.extra_cols"
            raise UnicomError(
                f"config key {key}: column {column!r} is not in {table} (its columns: "
                f"{', '.join(names)})"
            )


def read_schema(path: str, key: str) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise UnicomError(f"{key}: {path} is not a Parquet file ({err})") from None


def rehearsal_samples(samples: int | None, config: Mapping[str, Any]) -> None:
    """A rehearsal must take at least k samples (k-means needs k vectors)."""
    k = config["kmeans"]["k"]
    if config["rehearsal"]["enabled"] and samples is not None and samples < k:
        raise UnicomError(
            f"config key rehearsal.k: {k} exceeds the {samples} samples of data.shards: "
            "k-means needs at least k images"
        )


# --------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class EmbeddingFile:
    """One numbered file of each kind in clip-retrieval's layout, checked to agree."""

    number: int
    image: str
    text: str
    metadata: str
    rows: int
    image_dim: int
    text_dim: int

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def numbered_files(folder: Path, kind: str) -> dict[int, str]:
    subfolder, pattern = EMBEDDING_LAYOUT[kind]
    directory = folder / subfolder
    if not directory.is_dir():
        raise UnicomError(
            f"{EMBEDDINGS_KEY}: {folder} has no {subfolder}/ folder (clip-retrieval's layout: "
            "img_emb/, text_emb/, metadata/)"
        )
    found: dict[int, str] = {}
    for name in sorted(os.listdir(directory)):
        match = pattern.match(name)
        if match:
            number = int(match.group(1))
            if number in found:
                raise UnicomError(
                    f"{EMBEDDINGS_KEY}: {found[number]} and {name} share number {number}"
                )
            found[number] = str(directory / name)
    return found


def npy_shape(path: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an .npy header (nothing else is read)."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as stream:
            # 2.0 and 3.0 headers differ only in their text encoding (ASCII here either way)
            if fmt.read_magic(stream) == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(stream)
            else:
                shape, _, dtype = fmt.read_array_header_2_0(stream)
    except (OSError, ValueError) as err:
        raise UnicomError(f"{EMBEDDINGS_KEY}: {path} is not an .npy file ({err})") from None
    return shape, dtype


def matrix_columns(path: str) -> tuple[int, int]:
    """(rows, dimension) of an embedding matrix file, which must hold floats."""
    shape, dtype = npy_shape(path)
    if len(shape) != 2 or dtype.kind != "f":
        raise UnicomError(
            f"{EMBEDDINGS_KEY}: {path} holds {dtype} of shape {shape}, not a 2-D float matrix "
            "(one embedding per row)"
        )
    return shape[0], shape[1]


def embedding_files(folder: str) -> list[EmbeddingFile]:
    """The numbered files of a clip-retrieval output folder, in number order, checked from
    headers and footers: every number has its three files, their rows agree, the metadata
    has the key column."""
    root = Path(folder)
    if not root.is_dir():
        raise UnicomError(f"{EMBEDDINGS_KEY}: {folder} is not a folder")
    files = {kind: numbered_files(root, kind) for kind in EMBEDDING_LAYOUT}
    numbers = sorted(set().union(*files.values()))
    if not numbers:
        raise UnicomError(f"{EMBEDDINGS_KEY}: no img_emb_N.npy / metadata_N.parquet in {folder}")
    result = []
    for number in numbers:
        for kind, (subfolder, _) in EMBEDDING_LAYOUT.items():
            if number not in files[kind]:
                present = next(files[k][number] for k in files if number in files[k])
                raise UnicomError(
                    f"{EMBEDDINGS_KEY}: {present} has no {kind} file of number {number} in "
                    f"{subfolder}/ (clip-retrieval writes all three)"
                )
        result.append(checked_file(number, *(files[kind][number] for kind in EMBEDDING_LAYOUT)))
    return result


def checked_file(number: int, image: str, text: str, metadata: str) -> EmbeddingFile:
    image_rows, image_dim = matrix_columns(image)
    text_rows, text_dim = matrix_columns(text)
    schema = read_schema(metadata, EMBEDDINGS_KEY)
    if KEY_COLUMN not in schema.names:
        raise UnicomError(
            f"{EMBEDDINGS_KEY}: {metadata} has no {KEY_COLUMN!r} column (the webdataset key "
            "clip-retrieval writes)"
        )
    rows = pq.read_metadata(metadata).num_rows
    for path, count in ((image, image_rows), (text, text_rows)):
        if count != rows:
            raise UnicomError(
                f"{EMBEDDINGS_KEY}: {path} holds {count} rows but {metadata} {rows}; the rows "
                "must be aligned"
            )
    return EmbeddingFile(number, image, text, metadata, rows, image_dim, text_dim)


def open_clip_dim(model: str) -> int | None:
    """The embedding dimension of an open_clip architecture, from its config file in the
    installed package (no import of open_clip, hence of torch); None when not known there
    (hf-hub:, local-dir:, an unknown name: the embed job reports those)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "model_configs" / f"{model}.json"
    try:
        return int(json.loads(path.read_text())["embed_dim"])
    except (OSError, ValueError, KeyError):
        return None


def expected_dims(embed: Mapping[str, Any]) -> dict[str, int] | None:
    """Tower -> dimension the named encoder gives, where the config alone tells (open_clip)."""
    if embed["encoder"] != "open_clip":
        return None
    dim = open_clip_dim(str(embed["open_clip"]["model"]))
    return None if dim is None else {"image": dim, "text": dim}


def check_dims(files: Sequence[EmbeddingFile], dims: Mapping[str, int] | None, who: str) -> None:
    """Every file's dimensions are those of the encoder ``who`` names."""
    if dims is None:
        return
    for item in files:
        for tower, path, dim in (
            ("image", item.image, item.image_dim),
            ("text", item.text, item.text_dim),
        ):
            if dim != dims[tower]:
                raise UnicomError(
                    f"{EMBEDDINGS_KEY}: {path} holds {dim}-dimensional vectors, but {who} "
                    f"gives {dims[tower]}; name the encoder that made them"
                )


def embedding_paths(folder: str) -> list[str]:
    """Every file of clip-retrieval's layout in ``folder`` (names only: nothing is opened)."""
    return sorted(
        path for kind in EMBEDDING_LAYOUT for path in numbered_files(Path(folder), kind).values()
    )


def check_outside_run(files: Sequence[str], shards_dir: str) -> None:
    """data.shards may not name the run's own shards folder (linking them would replace them)."""
    own = os.path.realpath(shards_dir)
    for path in files:
        if os.path.dirname(path) == own:
            raise UnicomError(
                f"{SHARDS_KEY}: {path} is in this run's own shards folder; give the run "
                "another output_dir"
            )


# --------------------------------------------------------------------------- keys


def key_ranges(summaries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The first and last key of every shard with samples (the link jobs' summaries), sorted.
    Ranges that interleave are an error: keys must be unique across the shards (the drops and
    the training's skip lists name samples by key) and a precomputed embedding's key must name
    one shard; img2dataset's keys of one output folder never interleave."""
    ranges = sorted(
        ({"first": s["keys"][0], "last": s["keys"][1], "part": s["part"], "source": s.get("source")}
         for s in summaries if s.get("keys")),
        key=lambda r: (r["first"], r["last"]),
    )  # fmt: skip
    for before, after in zip(ranges, ranges[1:], strict=False):
        if after["first"] <= before["last"]:
            raise UnicomError(
                f"{SHARDS_KEY}: the keys of {before['source']} ({before['first']}.."
                f"{before['last']}) and {after['source']} ({after['first']}..{after['last']}) "
                "interleave; give shards whose keys are apart (one img2dataset output folder)"
            )
    return ranges


def range_arrays(ranges: Sequence[Mapping[str, Any]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(parts, first keys, last keys) as UTF-8 bytes arrays: numpy compares them in str order."""
    parts = [r["part"] for r in ranges]
    firsts = np.array([r["first"].encode() for r in ranges], dtype=bytes)
    lasts = np.array([r["last"].encode() for r in ranges], dtype=bytes)
    return parts, firsts, lasts
