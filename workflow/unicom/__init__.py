"""Unicom pipeline: universal compact image embeddings from pseudo-labelled image+text data.

Each stage is a small module with a pure core and a thin ``python -m unicom.<stage>`` CLI.
"""

__version__ = "0.1.0"
