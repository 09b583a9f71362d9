# Data hygiene (config sections dedup and filters), all off by default. URL repeats are marked
# by split_urls (dedup.urls) and never downloaded. The screen (dedup.content or any filter) runs
# once over the shard tables beside the embed jobs; k-means sampling and training skip its
# drops. Near-duplicates (dedup.near) are searched within the k-means clusters: one scatter
# job per batch of shards, one near_dedup job per group of clusters; they leave training only.

DEDUP = config["dedup"]
SCREEN = planning.uses_screen(config)
# SCREENED and NEAR_DROPS, the drops files these rules write: rules/common.smk.
# The image-caption cosine filter reads embed's clip_score: then the screen waits for embed.
CLIP_FILTER = config["filters"]["clip_score_min"] is not None
NEAR_SPACE = {"image": "embed/{part}.parquet", "fused": "fused/{part}.parquet"}[
    DEDUP["space"]
]


rule screen:
    input:
        parts=out("parts"),
        tables=all_parts("shards/{part}.parquet"),
        embeddings=all_parts("embed/{part}.parquet") if CLIP_FILTER else [],
        # the download success rate checked (download_summary) before anything is screened
        downloaded=out("download/summary.json"),
    output:
        drops=out("hygiene/screened.parquet"),
        summary=out("hygiene/screen.json"),
    log:
        out("logs/screen.log"),
    benchmark:
        out("benchmarks/screen.tsv")
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        **job_resources("dedup"),
    params:
        tables=each_part("shards/{part}.parquet"),
        embeddings=(
            each_part("embed/{part}.parquet", "--embeddings") if CLIP_FILTER else []
        ),
        work_dir=out("hygiene/.screen-work"),
        # only what the screen uses, so a new near-duplicate threshold does not rerun it
        options=as_json(
            {"content": DEDUP["content"], "filters": section(config, "filters")}
        ),
    shell:
        "python -m unicom.hygiene.screen --each-part {input.parts:q} {params.tables:q}"
        " --out {output.drops:q} --out-summary {output.summary:q} {params.embeddings:q}"
        " --work-dir {params.work_dir:q} --options-json {params.options:q} 2> {log:q}"


rule near_scatter:
    input:
        assignments=batch_files("assign/{part}.parquet"),
        spaces=batch_files(NEAR_SPACE),
        screened=SCREENED,
    output:
        out("hygiene/scatter/{batch}.parquet"),
    log:
        out("logs/near_scatter/{batch}.log"),
    benchmark:
        out("benchmarks/near_scatter/{batch}.tsv")
    conda:
        "../envs/data.yaml"
    resources:
        **job_resources("dedup"),
    params:
        screened=["--screened", *SCREENED] if SCREENED else [],
        groups=DEDUP["groups"],
        options=as_json({"space": DEDUP["space"]}),
    shell:
        "python -m unicom.hygiene.near scatter --assignments {input.assignments:q}"
        " --spaces {input.spaces:q} {params.screened:q} --groups {params.groups:q}"
        " --out {output:q} --options-json {params.options:q} 2> {log:q}"


rule near_dedup:
    input:
        all_batches("hygiene/scatter/{batch}.parquet"),
    output:
        drops=out("hygiene/near/{group}.parquet"),
        stats=out("hygiene/near/{group}.json"),
    log:
        out("logs/near_dedup/{group}.log"),
    benchmark:
        out("benchmarks/near_dedup/{group}.tsv")
    wildcard_constraints:
        group=r"\d+",
    conda:
        "../envs/data.yaml"
    threads: DEDUP["threads"]
    resources:
        **job_resources("dedup"),
    params:
        options=stage_options("dedup"),
    shell:
        "OMP_NUM_THREADS={threads} python -m unicom.hygiene.near dedup {input:q}"
        " --group {wildcards.group:q} --out {output.drops:q} --out-stats {output.stats:q}"
        " --options-json {params.options:q} 2> {log:q}"


rule hygiene_report:
    input:
        download=out("download/summary.json"),
        screen=out("hygiene/screen.json") if SCREEN else [],
        drops=SCREENED + NEAR_DROPS,
        near_stats=(
            expand(out("hygiene/near/{group}.json"), group=range(DEDUP["groups"]))
            if DEDUP["near"]
            else []
        ),
    output:
        summary=out("hygiene/summary.json"),
        png=report(
            out("hygiene/accounting.png"),
            caption="../report/hygiene.rst",
            category="1. Data",
        ),
        grid=(
            report(
                out("hygiene/near_duplicates.png"),
                caption="../report/near_duplicates.rst",
                category="1. Data",
            )
            if DEDUP["near"]
            else []
        ),
    log:
        out("logs/hygiene_report.log"),
    benchmark:
        out("benchmarks/hygiene_report.tsv")
    conda:
        "../envs/torch-cpu.yaml"
    params:
        screen=screen_summary,
        grid=near_duplicate_grid,
        checked=planning.checked_reasons(config),
        grid_groups=DEDUP["grid_groups"],
        threshold=DEDUP["threshold"],
    shell:
        "python -m unicom.hygiene.report --download {input.download:q} {params.screen:q}"
        " --drops {input.drops:q} --near-stats {input.near_stats:q} --checked {params.checked:q}"
        " --grid-groups {params.grid_groups:q} --threshold {params.threshold:q}"
        " --out {output.summary:q} --out-png {output.png:q} {params.grid:q} 2> {log:q}"
