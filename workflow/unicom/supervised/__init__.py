"""Stage: the supervised protocols on a benchmark's train split (the paper's second half):
linear probes on frozen embeddings (``linear_probe``) and the labelled shards that fine-tuning
trains on (``finetune_data``; the finetune rules then run ``unicom.train.train`` and
``unicom.evaluate.evaluate`` unchanged)."""
