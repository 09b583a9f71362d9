"""Stage: retrieval evaluation (R@K, MAP@R, R-Precision) of the base encoder and the trained
model on one benchmark (``evaluate``, scored by ``metrics``), and the summary table of every
protocol's results (``summary``)."""
