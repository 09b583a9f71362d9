# Image and text embeddings per shard (GPU when the job gets one).

EMBED = config["embed"]


rule embed:
    input:
        out("shards/{part}.tar"),
    output:
        embeddings=out("embed/{part}.parquet"),
        skipped=out("embed/{part}.skipped.csv"),
    log:
        out("logs/embed/{part}.log"),
    benchmark:
        out("benchmarks/embed/{part}.tsv")
    conda:
        "../envs/torch-gpu.yaml" if EMBED["gpus"] else "../envs/torch-cpu.yaml"
    threads: EMBED["threads"]
    resources:
        mem_mb=EMBED["mem_mb"],
        runtime=EMBED["runtime"],
        gpu=EMBED["gpus"],
    params:
        options=job_options(EMBED, ("mem_mb", "runtime", "gpus")),
    shell:
        "python -m unicom.embed --shard {input:q} --out {output.embeddings:q}"
        " --skipped {output.skipped:q} --options-json {params.options:q} 2> {log:q}"
