# URL list -> parts -> webdataset shards (img2dataset), one job per batch of
# download.shards_per_job parts (each part its own shard); every input row is counted in
# its part's summary.

DOWNLOAD = config["download"]
DATA = config["data"]
# The URL-list Parquet files: the expanded data.url_list patterns, or the demo's.
URL_LIST_FILES = (
    planned(planning.url_list_files, DATA["url_list"])
    if DATA["url_list"]
    else [out("demo/urls.parquet")]
)
# Before any job, from the Parquet footers alone: format, columns, rows, and kmeans.k against
# the rows. In the main process only: every SLURM or group job parses this file again, and
# must not read 40,000 footers each time.
if DATA["url_list"] and workflow.is_main_process:
    planned(planning.check_url_list_plan, config, URL_LIST_FILES)
# The download success-rate floor is a gate on the result, not a part of it: it reaches the
# commands as a job resource (text), which no rerun trigger looks at, so changing it reruns no
# finished download (a param would; so would the command's text under the "code" trigger).
MIN_SUCCESS_RATE = str(float(DOWNLOAD["min_success_rate"]))


# On the login node: one pass over the URL list, and Snakemake needs its result to plan.
localrules:
    split_urls,
    download_summary,


checkpoint split_urls:
    input:
        URL_LIST_FILES,
    output:
        directory(out("parts")),
    log:
        out("logs/split_urls.log"),
    benchmark:
        out("benchmarks/split_urls.tsv")
    conda:
        "../envs/data.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        shard_size=DOWNLOAD["shard_size"],
        shards_per_job=SHARDS_PER_JOB,
        url_col=DATA["url_col"],
        caption_col=DATA["caption_col"],
        extra_cols=["--extra-cols", *DATA["extra_cols"]] if DATA["extra_cols"] else [],
        max_rows=["--max-rows", DATA["max_rows"]] if DATA["max_rows"] else [],
        dedup_urls=["--dedup-urls"] if config["dedup"]["urls"] else [],
    shell:
        "python -m unicom.data.split_urls --out-dir {output:q} --shard-size {params.shard_size:q}"
        " --shards-per-job {params.shards_per_job:q} {params.max_rows:q} {params.dedup_urls:q}"
        " --url-col {params.url_col:q} --caption-col {params.caption_col:q}"
        " {input:q} {params.extra_cols:q} 2> {log:q}"


rule download:
    input:
        # The folder, not its 10,000s of part files: Snakemake tracks every declared file.
        out("parts"),
    output:
        tars=batch_files("shards/{part}.tar"),
        tables=batch_files("shards/{part}.parquet"),
        summary=out("shards/{batch}.summary.json"),
    log:
        out("logs/download/{batch}.log"),
    benchmark:
        out("benchmarks/download/{batch}.tsv")
    conda:
        "../envs/data.yaml"
    threads: DOWNLOAD["processes"]
    resources:
        **job_resources("download"),
        min_success_rate=MIN_SUCCESS_RATE,
    params:
        parts=download_parts,
        out_dir=output_folder("summary"),
        options=stage_options("download"),
    shell:
        "python -m unicom.data.download --part {params.parts:q} --out-dir {params.out_dir:q}"
        " --summary {output.summary:q} --options-json {params.options:q}"
        " --min-success-rate {resources.min_success_rate:q} 2> {log:q}"


rule download_summary:
    input:
        manifest=out("parts"),
        summaries=all_batches("shards/{batch}.summary.json"),
    output:
        summary=out("download/summary.json"),
        table=out("download/summary.csv"),
    log:
        out("logs/download_summary.log"),
    conda:
        "../envs/data.yaml"
    resources:
        min_success_rate=MIN_SUCCESS_RATE,
    params:
        summaries=each_part("shards/{batch}.summary.json"),
    shell:
        "python -m unicom.data.summary --parts-dir {input.manifest:q}"
        " --out {output.summary:q} --out-table {output.table:q}"
        " --min-success-rate {resources.min_success_rate:q} {params.summaries:q} 2> {log:q}"
