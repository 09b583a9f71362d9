"""Unicom pipeline: universal compact image embeddings from pseudo-labelled image+text data.

Stage packages named after the pipeline (``data``, ``embed``, ``cluster``, ``train``, ``evaluate``,
``report``, ``demo``), each stage a pure core with a thin ``python -m unicom.<package>.<stage>``
CLI, over a library layer (the other modules) that imports no stage (tests/test_layout.py).
"""

__version__ = "0.1.0"
