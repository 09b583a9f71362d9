# Fused embedding per shard (one job per batch of shards); changing fuse.* reruns only this
# and what follows.


# The command of a fuse job; rules/ablations.smk runs it for the grid's fusions.
FUSE_COMMAND = (
    "python -m unicom.embed.fuse --embeddings {input:q} --out {output:q}"
    " --options-json {params.options:q} 2> {log:q}"
)


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
        FUSE_COMMAND
