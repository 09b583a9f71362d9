# Starting from what a user already has: webdataset shards (data.shards) instead of the URL
# list's split and download, and precomputed embeddings in clip-retrieval's layout
# (data.embeddings) instead of the embed jobs. The rules below exist only when the config names
# these sources; they write the same files (parts/, shards/{part}.*, embed/{part}.parquet) at
# the same job granularity (download.shards_per_job), so every later stage runs unchanged (the
# Snakefile's ruleorder prefers them). The shards' part names: rules/common.smk.

from unicom.data.existing import files_digest

SOURCES = config["data"]
EMBEDDINGS = SOURCES["embeddings"]
# The file checks, once, in the main process.
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


if SHARD_FILES:

    localrules:
        index_shards,
        shard_keys,

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
            linked_shards,
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
            sources=shard_sources,
            out_dir=output_folder("summary"),
        shell:
            "python -m unicom.data.existing link --part {params.parts:q}"
            " --source {params.sources:q} --out-dir {params.out_dir:q}"
            " --summary {output.summary:q} 2> {log:q}"

    rule shard_keys:
        input:
            parts=out("parts"),
            summaries=all_batches("shards/{batch}.summary.json"),
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

    rule locate_embeddings:
        input:
            parts=out("parts"),
            key_ranges=out("shards/keys.json"),
            embeddings=precomputed_embeddings,
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
            stats=all_batches("embed/precomputed/{batch}.json"),
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
