"""Stage: k-means over the fused vectors, pseudo-label assignment per shard, and the reports on
the clusters (sizes, margins, image grids, agreement with known labels)."""
