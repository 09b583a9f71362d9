"""Standalone tools no rule runs: image search with a trained model (``search``) and a
torchvision dataset exported as an ImageFolder for linear probes (``export_torchvision``)."""
