"""Stage: the ablation grid (``snakemake ablations``, rules/ablations.smk): ``grid`` plans the
variants x seeds and which stage outputs each one shares with the run; ``table`` writes the
table and plots of what each variant changed."""
