"""Stage: the plots of the Snakemake report."""
