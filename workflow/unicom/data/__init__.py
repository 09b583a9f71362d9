"""Stage: get the data. URL lists split into parts, each part downloaded by img2dataset into a
webdataset shard, every input row accounted for in one summary."""
