"""Stage: retrieval benchmarks (R@K, MAP@R) of the base encoder and the trained model, their
summary table, and a search tool over a folder of images."""
