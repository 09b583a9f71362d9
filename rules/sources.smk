# Starting from what a user already has: webdataset shards (data.shards) instead of the URL
# list's split and download, and precomputed embeddings in clip-retrieval's layout
# (data.embeddings) instead of the embed jobs. The rules below exist only when the config names
# these sources; they write the same files (parts/, shards/{part}.*, embed/{part}.parquet) at
# the same job granularity (download.shards_per_job), so every later stage runs unchanged.

from unicom import sources
from unicom.data.existing import NO_SOURCE, files_digest

SOURCES = config["data"]
# The tars, the first ones the run takes (data.max_rows: whole shards) and their part names,
# in every Snakemake process (part_names() needs them to plan); the file checks once, here.
SHARD_FILES = (
    planned(sources.shard_files, SOURCES["shards"]) if SOURCES["shards"] else []
)
TRAIN_RANKS = config["train"]["nodes"] * config["train"]["nproc_per_node"]
SHARDS_TAKEN, SAMPLES_TAKEN = (
    planned(sources.shards_taken, SHARD_FILES, SOURCES["max_rows"], TRAIN_RANKS)
    if SHARD_FILES
    else (0, None)
)
SOURCE_PARTS = (
    planned(sources.padded_parts, SHARDS_TAKEN, SHARDS_PER_JOB) if SHARD_FILES else []
)
SHARD_OF = dict(zip(SOURCE_PARTS, SHARD_FILES[:SHARDS_TAKEN]))
EMBEDDINGS = SOURCES["embeddings"]
if SHARD_FILES and workflow.is_main_process:
    planned(sources.check_outside_run, SHARD_FILES, out("shards"))
    planned(sources.check_shard_tables, SHARD_FILES, config)
    planned(sources.rehearsal_samples, SAMPLES_TAKEN, config)
if EMBEDDINGS is not None and workflow.is_main_process:
    planned(
        sources.check_dims,
        planned(sources.embedding_files, EMBEDDINGS),
        sources.expected_dims(config["embed"]),
        f"embed.open_clip.model {config['embed']['open_clip']['model']}",
    )
# What k-means waits for: the check that the shards' keys do not interleave, and the
# embeddings' accounting (its threshold stops the run before k-means).
SOURCE_CHECKS = [out("shards/keys.json")] if SHARD_FILES else []
if EMBEDDINGS is not None:
    SOURCE_CHECKS.append(out("embed/precomputed/summary.json"))


if SHARD_FILES:

    localrules:
        index_shards,
        shard_keys,
        shard_keys,

    # Instead of split_urls and download (rules/download.smk), which stay defined.
    ruleorder: index_shards > split_urls
    ruleorder: link_shards > download

    rule index_shards:
        output:
            directory(out("parts")),
        log:
            out("logs/index_shards.log"),
        conda:
            "../envs/data.yaml"
        params:
            patterns=SOURCES["shards"],
            take=SHARDS_TAKEN,
            shards_per_job=SHARDS_PER_JOB,
            # a new or renamed tar changes the parts: the run plans again from here
            digest=files_digest(SHARD_FILES),
        shell:
            "python -m unicom.data.existing index {params.patterns:q} --out-dir {output:q}"
            " --take {params.take:q} --shards-per-job {params.shards_per_job:q}"
            " --digest {params.digest:q} 2> {log:q}"

    rule link_shards:
        input:
            # the user's tars and tables: a newer one relinks its part (and reruns what follows)
            lambda wildcards: [
                path
                for part in batch_parts(wildcards)
                if part in SHARD_OF
                for path in (SHARD_OF[part], sources.status_table(SHARD_OF[part]))
                if path
            ],
        output:
            tars=batch_files("shards/{part}.tar"),
            tables=batch_files("shards/{part}.parquet"),
            summary=out("shards/{batch}.summary.json"),
        log:
            out("logs/link_shards/{batch}.log"),
        benchmark:
            out("benchmarks/link_shards/{batch}.tsv")
        conda:
            "../envs/data.yaml"
        resources:
            mem_mb=2000,
            runtime=30,
        params:
            parts=batch_parts,
            sources=lambda wildcards: [
                SHARD_OF.get(part, NO_SOURCE) for part in batch_parts(wildcards)
            ],
            out_dir=lambda wildcards, output: os.path.dirname(output.summary),
        shell:
            "python -m unicom.data.existing link --part {params.parts:q}"
            " --source {params.sources:q} --out-dir {params.out_dir:q}"
            " --summary {output.summary:q} 2> {log:q}"

    rule shard_keys:
        input:
            parts=out("parts"),
            summaries=lambda wildcards: expand(
                out("shards/{batch}.summary.json"),
                batch=planning.batch_names(part_names(), SHARDS_PER_JOB),
            ),
        output:
            out("shards/keys.json"),
        log:
            out("logs/shard_keys.log"),
        conda:
            "../envs/data.yaml"
        params:
            summaries=each_part("shards/{batch}.summary.json"),
        shell:
            "python -m unicom.data.existing keys --each-part {input.parts:q}"
            " {params.summaries:q} --out {output:q} 2> {log:q}"


if EMBEDDINGS is not None:

    localrules:
        embeddings_summary,

    # Instead of the embed jobs (rules/embed.smk); prefetch_weights still writes the identity.
    ruleorder: import_embeddings > embed

    rule locate_embeddings:
        input:
            parts=out("parts"),
            key_ranges=out("shards/keys.json"),
            embeddings=lambda wildcards: sources.embedding_paths(EMBEDDINGS),
        output:
            scatter=directory(out("embed/precomputed/scatter")),
            index=out("embed/precomputed/index.json"),
        log:
            out("logs/locate_embeddings.log"),
        benchmark:
            out("benchmarks/locate_embeddings.tsv")
        conda:
            "../envs/data.yaml"
        # a cluster job: it reads every metadata file's keys (400M for LAION-400M), one file
        # at a time
        resources:
            mem_mb=8000,
            runtime=120,
        params:
            folder=EMBEDDINGS,
        shell:
            "python -m unicom.embed.precomputed locate --parts-dir {input.parts:q}"
            " --key-ranges {input.key_ranges:q} --embeddings {params.folder:q}"
            " --scatter-dir {output.scatter:q} --out-index {output.index:q} 2> {log:q}"

    rule import_embeddings:
        input:
            tables=batch_files("shards/{part}.parquet"),
            index=out("embed/precomputed/index.json"),
            encoder=out("embed/encoder.json"),
        output:
            embeddings=batch_files("embed/{part}.parquet"),
            skipped=out("embed/{batch}.skipped.csv"),
            stats=out("embed/precomputed/{batch}.json"),
        log:
            out("logs/import_embeddings/{batch}.log"),
        benchmark:
            out("benchmarks/import_embeddings/{batch}.tsv")
        conda:
            "../envs/data.yaml"
        resources:
            mem_mb=4000,
            runtime=30,
        params:
            scatter=out("embed/precomputed/scatter"),
        shell:
            "python -m unicom.embed.precomputed import --batch {wildcards.batch:q}"
            " --tables {input.tables:q} --out {output.embeddings:q}"
            " --index {input.index:q} --scatter-dir {params.scatter:q}"
            " --encoder {input.encoder:q} --skipped {output.skipped:q}"
            " --stats {output.stats:q} 2> {log:q}"

    rule embeddings_summary:
        input:
            parts=out("parts"),
            index=out("embed/precomputed/index.json"),
            stats=lambda wildcards: expand(
                out("embed/precomputed/{batch}.json"),
                batch=planning.batch_names(part_names(), SHARDS_PER_JOB),
            ),
        output:
            out("embed/precomputed/summary.json"),
        log:
            out("logs/embeddings_summary.log"),
        conda:
            "../envs/data.yaml"
        params:
            stats=each_part("embed/precomputed/{batch}.json"),
            max_unmatched=SOURCES["embeddings_max_unmatched"],
        shell:
            "python -m unicom.embed.precomputed summary --each-part {input.parts:q}"
            " {params.stats:q} --index {input.index:q}"
            " --max-unmatched {params.max_unmatched:q} --out {output:q} 2> {log:q}"
