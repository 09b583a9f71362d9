# Fused embedding per shard; changing fuse.* reruns only this and what follows.

FUSE = config["fuse"]


rule fuse:
    input:
        out("embed/{part}.parquet"),
    output:
        out("fused/{part}.parquet"),
    params:
        options=as_json(FUSE),
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/data.yaml"
    log:
        out("logs/fuse/{part}.log"),
    benchmark:
        out("benchmarks/fuse/{part}.tsv")
    shell:
        "python -m unicom.fuse --embeddings {input:q} --out {output:q}"
        " --options-json {params.options:q} 2> {log:q}"
