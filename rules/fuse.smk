# Fused embedding per shard (one job per batch of shards); changing fuse.* reruns only this
# and what follows.


rule fuse:
    input:
        batch_files("embed/{part}.parquet"),
    output:
        batch_files("fused/{part}.parquet"),
    log:
        out("logs/fuse/{batch}.log"),
    benchmark:
        out("benchmarks/fuse/{batch}.tsv")
    conda:
        "../envs/data.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        options=stage_options("fuse"),
    shell:
        "python -m unicom.embed.fuse --embeddings {input:q} --out {output:q}"
        " --options-json {params.options:q} 2> {log:q}"


# The ablation grid's fusions (rules/ablations.smk): the same embeddings, a variant's fuse.*.
use rule fuse as ablation_fuse with:
    output:
        batch_files("ablations/fused/{{fusion}}/{part}.parquet"),
    log:
        out("logs/ablations/fuse/{fusion}/{batch}.log"),
    benchmark:
        out("benchmarks/ablations/fuse/{fusion}/{batch}.tsv")
    params:
        options=by_wildcard(grid_options(GRID.fusions, "fuse"), "fusion"),
