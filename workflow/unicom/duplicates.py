"""Exact duplicates at any scale: the first occurrence of each value in a stream of rows.

Used for URLs (before download) and image bytes (sha256, after download). Memory never holds
the values of all rows: rows are reduced to 64-bit hashes, written to ``2^b`` bucket files on
disk by their top bits (pass 1); hashes seen twice in a bucket are the candidates; a second
pass writes (hash, row, value) of the candidate rows only, again bucketed; each bucket is then
grouped by hash and compared on the value itself, so a 64-bit collision never merges two
different values (it is counted). Peak memory: one bucket (``bucket_rows`` x 8 bytes in
pass 1, its candidate rows in pass 3), the sorted candidate hashes (8 bytes each), and the
result: 16 bytes per duplicate row.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# Rows per bucket file in pass 1 (16 MiB of hashes): 256 buckets at LAION-400M.
BUCKET_ROWS = 1 << 21
# scheme://[userinfo@]host, then the rest: only scheme and host are case-insensitive.
URL_PARTS = (
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#@]*@)?"
    r"(?P<host>[^/?#]*)(?P<rest>.*)$"
)


def normalize_urls(urls: pa.Array | pa.ChunkedArray) -> pa.Array:
    """URLs with surrounding blanks removed and scheme and host lower-cased (the rest, path
    and query, is case-sensitive); a URL without ``scheme://`` is only stripped."""
    stripped = pc.utf8_trim_whitespace(urls)
    parts = pc.extract_regex(stripped, URL_PARTS)
    field = {name: pc.struct_field(parts, name) for name in ("scheme", "userinfo", "host", "rest")}
    userinfo = pc.fill_null(field["userinfo"], "")
    joined = pc.binary_join_element_wise(
        pc.utf8_lower(field["scheme"]), userinfo, pc.utf8_lower(field["host"]), field["rest"], ""
    )
    result = pc.if_else(pc.is_valid(parts), joined, stripped)
    return result.combine_chunks() if isinstance(result, pa.ChunkedArray) else result


def hash64(values: pa.Array) -> np.ndarray:
    """Deterministic 64-bit hashes (pandas' SipHash with its fixed key); nulls hash alike."""
    return pd.util.hash_array(np.asarray(values.to_numpy(zero_copy_only=False), dtype=object))


def sha256_prefix(hex_digests: pa.Array) -> np.ndarray:
    """The first 64 bits of hex sha256 digests: already uniform, no need to hash again."""
    prefixes = pc.utf8_slice_codeunits(hex_digests, 0, 16).to_numpy(zero_copy_only=False)
    return np.array([int(h, 16) for h in prefixes], dtype=np.uint64)


def bucket_bits(rows: int, bucket_rows: int = BUCKET_ROWS) -> int:
    """log2 of the bucket count: enough buckets that each holds ~bucket_rows hashes."""
    return max(0, math.ceil(math.log2(max(rows, 1) / bucket_rows))) if rows > bucket_rows else 0


def first_occurrences(
    hashes: np.ndarray, rows: np.ndarray, values: list
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pure core: rows whose value equals an earlier row's value, and that earlier row.

    Returns (duplicate rows, their first rows, hash collisions), ordered by duplicate row.
    Equal hashes with different values are compared on the value: both stay distinct. Null or
    empty values are never duplicates (download rejects them on their own).
    """
    order = np.lexsort((rows, hashes))
    hashes, rows = hashes[order], rows[order]
    values = [values[i] for i in order]
    duplicates: list[int] = []
    firsts: list[int] = []
    collisions = 0
    start = 0
    while start < len(hashes):
        end = start
        while end < len(hashes) and hashes[end] == hashes[start]:
            end += 1
        seen: dict = {}
        for i in range(start, end):  # rows ascending within the hash
            if values[i] is None or values[i] == "":  # nothing to fetch: never a duplicate
                continue
            first = seen.setdefault(values[i], int(rows[i]))
            if first != rows[i]:
                duplicates.append(int(rows[i]))
                firsts.append(first)
        collisions += max(len(seen) - 1, 0)
        start = end
    dup = np.asarray(duplicates, dtype=np.int64)
    first = np.asarray(firsts, dtype=np.int64)
    by_row = np.argsort(dup, kind="stable")
    return dup[by_row], first[by_row], collisions


@dataclass
class Duplicates:
    rows: np.ndarray  # int64, ascending: rows that repeat an earlier row's value
    firsts: np.ndarray  # int64: the earlier (first) row of each
    collisions: int  # distinct values that shared a 64-bit hash
    candidates: int  # rows whose hash was seen more than once (compared on the value)

    def twin_of(self) -> dict[int, int]:
        return dict(zip(self.rows.tolist(), self.firsts.tolist(), strict=True))


class ExternalDedup:
    """Two passes over the same rows in the same order (``add_hashes`` for all, then
    ``add_values`` for all), then ``result()``. Rows are numbered 0.. in the order given."""

    def __init__(self, work_dir: str | Path, total_rows: int, bucket_rows: int = BUCKET_ROWS):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.bits = bucket_bits(total_rows, bucket_rows)
        self.buckets = 1 << self.bits
        self._files = [open(self._hash_file(b), "wb") for b in range(self.buckets)]  # noqa: SIM115
        self._next_row = 0
        self._candidates: np.ndarray | None = None
        self._writers: dict[int, pq.ParquetWriter] = {}
        self._value_row = 0
        self._candidate_rows = 0

    def _hash_file(self, bucket: int) -> Path:
        return self.work_dir / f"hashes-{bucket:05d}.u64"

    def _bucket(self, hashes: np.ndarray) -> np.ndarray:
        if self.bits == 0:
            return np.zeros(len(hashes), dtype=np.int64)
        return (hashes >> np.uint64(64 - self.bits)).astype(np.int64)

    def add_hashes(self, hashes: np.ndarray) -> None:
        """Pass 1: the next rows' hashes."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        bucket = self._bucket(hashes)
        for b in np.unique(bucket):
            hashes[bucket == b].tofile(self._files[b])
        self._next_row += len(hashes)

    def _find_candidates(self) -> np.ndarray:
        for file in self._files:
            file.close()
        repeated = []
        for b in range(self.buckets):
            hashes = np.fromfile(self._hash_file(b), dtype=np.uint64)
            unique, counts = np.unique(hashes, return_counts=True)
            repeated.append(unique[counts > 1])
            self._hash_file(b).unlink()
        return np.sort(np.concatenate(repeated)) if repeated else np.zeros(0, np.uint64)

    def add_values(self, hashes: np.ndarray, values: pa.Array) -> None:
        """Pass 2: the same rows again, with their values; only candidates are kept."""
        if self._candidates is None:
            self._candidates = self._find_candidates()
        hashes = np.asarray(hashes, dtype=np.uint64)
        rows = np.arange(self._value_row, self._value_row + len(hashes), dtype=np.int64)
        self._value_row += len(hashes)
        where = np.searchsorted(self._candidates, hashes)
        where = np.minimum(where, max(len(self._candidates) - 1, 0))
        hit = self._candidates[where] == hashes if len(self._candidates) else np.zeros(0, bool)
        if not hit.any():
            return
        hashes, rows = hashes[hit], rows[hit]
        values = values.filter(pa.array(hit))
        self._candidate_rows += len(rows)
        bucket = self._bucket(hashes)
        for b in np.unique(bucket):
            mask = bucket == b
            table = pa.table(
                {
                    "hash": pa.array(hashes[mask]),
                    "row": pa.array(rows[mask]),
                    "value": values.filter(pa.array(mask)),
                }
            )
            if b not in self._writers:
                path = self.work_dir / f"candidates-{b:05d}.parquet"
                self._writers[b] = pq.ParquetWriter(path, table.schema)
            self._writers[b].write_table(table)

    def result(self) -> Duplicates:
        if self._candidates is None:  # no rows at all, or add_values never called
            self._candidates = self._find_candidates()
        if self._value_row != self._next_row:
            raise RuntimeError(
                f"dedup: {self._next_row} rows hashed but {self._value_row} given values"
            )
        for writer in self._writers.values():
            writer.close()
        rows, firsts, collisions = [], [], 0
        for b in sorted(self._writers):
            table = pq.read_table(self.work_dir / f"candidates-{b:05d}.parquet")
            dup, first, clash = first_occurrences(
                table["hash"].to_numpy(), table["row"].to_numpy(), table["value"].to_pylist()
            )
            rows.append(dup)
            firsts.append(first)
            collisions += clash
        shutil.rmtree(self.work_dir, ignore_errors=True)
        if not rows:
            return Duplicates(np.zeros(0, np.int64), np.zeros(0, np.int64), 0, 0)
        dup, first = np.concatenate(rows), np.concatenate(firsts)
        order = np.argsort(dup, kind="stable")
        return Duplicates(dup[order], first[order], collisions, self._candidate_rows)


def dedup_stream(
    replay: Callable[[], Iterator[tuple[np.ndarray, pa.Array]]],
    work_dir: str | Path,
    total_rows: int,
    bucket_rows: int = BUCKET_ROWS,
) -> Duplicates:
    """Run both passes: ``replay()`` yields (hashes, values) batches in row order, twice."""
    dedup = ExternalDedup(work_dir, total_rows, bucket_rows)
    for hashes, _ in replay():
        dedup.add_hashes(hashes)
    for hashes, values in replay():
        dedup.add_values(hashes, values)
    return dedup.result()
