# Fused embedding per shard; changing fuse.* reruns only this and what follows.

FUSE = config["fuse"]


rule fuse:
    input:
        out("embed/{part}.parquet"),
    output:
        out("fused/{part}.parquet"),
    log:
        out("logs/fuse/{part}.log"),
    benchmark:
        out("benchmarks/fuse/{part}.tsv")
    conda:
        "../envs/data.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        options=as_json(FUSE),
    shell:
        "python -m unicom.fuse --embeddings {input:q} --out {output:q}"
        " --options-json {params.options:q} 2> {log:q}"
