# URL list -> parts -> webdataset shards (img2dataset), one job per part so a failed part
# reruns alone; every input row is counted in the part's summary.

DOWNLOAD = config["download"]
DATA = config["data"]


checkpoint split_urls:
    input:
        url_list_files(),
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
        url_col=DATA["url_col"],
        caption_col=DATA["caption_col"],
        extra_cols=["--extra-cols", *DATA["extra_cols"]] if DATA["extra_cols"] else [],
    shell:
        "python -m unicom.split_urls --out-dir {output:q} --shard-size {params.shard_size:q}"
        " --url-col {params.url_col:q} --caption-col {params.caption_col:q}"
        " {input:q} {params.extra_cols:q} 2> {log:q}"


rule download:
    input:
        out("parts/{part}.parquet"),
    output:
        tar=out("shards/{part}.tar"),
        table=out("shards/{part}.parquet"),
        stats=out("shards/{part}_stats.json"),
        summary=out("shards/{part}.summary.json"),
    log:
        out("logs/download/{part}.log"),
    benchmark:
        out("benchmarks/download/{part}.tsv")
    conda:
        "../envs/data.yaml"
    threads: DOWNLOAD["processes"]
    resources:
        mem_mb=DOWNLOAD["mem_mb"],
        runtime=DOWNLOAD["runtime"],
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.tar),
        options=job_options(DOWNLOAD, ("mem_mb", "runtime")),
    shell:
        "python -m unicom.download --part {input:q} --out-dir {params.out_dir:q}"
        " --options-json {params.options:q} 2> {log:q}"


rule download_summary:
    input:
        manifest=out("parts"),
        summaries=lambda wildcards: expand(
            out("shards/{part}.summary.json"), part=part_names()
        ),
    output:
        summary=out("download/summary.json"),
        table=out("download/summary.csv"),
    log:
        out("logs/download_summary.log"),
    conda:
        "../envs/data.yaml"
    shell:
        "python -m unicom.download_summary --parts-dir {input.manifest:q}"
        " --out {output.summary:q} --out-table {output.table:q}"
        " {input.summaries:q} 2> {log:q}"
