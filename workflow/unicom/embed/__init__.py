"""Stage: embed each shard (image and caption encoders -> Parquet) and fuse the two sides
into the vectors that are clustered."""
