# Image and text embeddings per shard (GPU when the job gets one); one job per batch of
# download.shards_per_job shards, so the encoders load once for all of them.

EMBED = config["embed"]
# The keys that say which encoder (and weights) to build.
ENCODER_KEYS = ("encoder", "open_clip", "demo")


# On the login node: compute nodes often have no internet, so the weights are fetched (into
# embed.open_clip.cache_dir, which must be shared) before any embed job starts.
localrules:
    prefetch_weights,


rule prefetch_weights:
    output:
        out("embed/encoder.json"),
    log:
        out("logs/prefetch_weights.log"),
    conda:
        "../envs/torch-cpu.yaml"
    params:
        options=as_json({k: v for k, v in EMBED.items() if k in ENCODER_KEYS}),
    shell:
        "python -m unicom.encoders prefetch --options-json {params.options:q}"
        " --identity-out {output:q} 2> {log:q}"


rule embed:
    input:
        shards=batch_files("shards/{part}.tar"),
        encoder=rules.prefetch_weights.output[0],
    output:
        embeddings=batch_files("embed/{part}.parquet"),
        skipped=out("embed/{batch}.skipped.csv"),
    log:
        out("logs/embed/{batch}.log"),
    benchmark:
        out("benchmarks/embed/{batch}.tsv")
    conda:
        stage_env("embed")
    threads: EMBED["threads"]
    resources:
        **job_resources("embed"),
    params:
        options=stage_options("embed"),
    shell:
        "python -m unicom.embed.embed --shard {input.shards:q} --out {output.embeddings:q}"
        " --skipped {output.skipped:q} --threads {threads} --options-json {params.options:q}"
        " 2> {log:q}"
