"""What several test files share, one module per kind (conftest.py holds only pytest's hooks
and fixtures; no test file imports another):

- ``helpers.images``: small real image folders and a small Fashion-MNIST in Debian's layout
- ``helpers.ranks``: torch.distributed ranks on loopback gloo, PartialFC steps
- ``helpers.processes``: loopback HTTP servers, processes a test watches
- ``helpers.vectors``: unit-vector blobs and fused Parquet files
- ``helpers.configs``: the schema's defaults and config layering, computed without unicom.config
- ``helpers.workflow``: the real Snakemake on the small test config (tests/configs/small.yaml)
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
