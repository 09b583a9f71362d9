# Image and text embeddings per shard (GPU when the job gets one); one job per batch of
# download.shards_per_job shards, so the encoders load once for all of them.

EMBED = config["embed"]


rule embed:
    input:
        batch_files("shards/{part}.tar"),
    output:
        embeddings=batch_files("embed/{part}.parquet"),
        skipped=out("embed/{batch}.skipped.csv"),
    log:
        out("logs/embed/{batch}.log"),
    benchmark:
        out("benchmarks/embed/{batch}.tsv")
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
