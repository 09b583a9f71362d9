# Pseudo-classes: k-means over all shards' fused embeddings, then assign jobs (one per batch
# of shards), then cluster sizes and diagnostics. Params carry only the kmeans/assign options,
# so a change of kmeans.k (or of fuse.*, through the fused files) reruns this stage and nothing
# upstream.

import functools

KMEANS = config["kmeans"]
ASSIGN = config["assign"]
# A backend asked for what it cannot do, or ranks on several nodes without srun, stop here,
# before any job.
planned(planning.check_kmeans_backend, KMEANS)
planned(planning.check_multi_node, "kmeans", KMEANS, profile_resource("kmeans", "mpi"))
# The shards the diagnostics read: all, or a seeded sample of assign.diagnostics.max_shards.
DIAGNOSTIC_SAMPLE = functools.partial(
    planning.diagnostic_parts, diagnostics=ASSIGN["diagnostics"]
)
# data.shards / data.embeddings: the checks of rules/sources.smk (that the shards' keys do not
# interleave, the embeddings' accounting, whose threshold stops the run) come before k-means.
SOURCE_CHECKS = [out("shards/keys.json")] if SHARD_FILES else []
if config["data"]["embeddings"] is not None:
    SOURCE_CHECKS.append(out("embed/precomputed/summary.json"))
# The ablation grid: clustering id -> the fused files it reads (the run's or a variant's).
GRID_FUSED = {
    key: grid.fused_pattern(fusion) for key, fusion in GRID.clustering_fusion.items()
}


rule kmeans:
    input:
        parts=out("parts"),
        fused=all_parts("fused/{part}.parquet"),
        # the screen's drops (content duplicates, filtered rows): left out of the sample
        skip=SCREENED,
        # the whole list's download success rate, checked against download.min_success_rate
        downloaded=out("download/summary.json"),
        sources=SOURCE_CHECKS,
    output:
        centroids=out("kmeans/centroids.npy"),
        stats=out("kmeans/kmeans.json"),
    log:
        out("logs/kmeans.log"),
    benchmark:
        out("benchmarks/kmeans.tsv")
    conda:
        stage_env("kmeans")
    threads: KMEANS["threads"]
    # torch backend: kmeans.nodes x kmeans.nproc_per_node ranks, launched like training
    resources:
        **job_resources("kmeans"),
    params:
        launcher=kmeans_launcher,
        options=stage_options("kmeans"),
        fused=each_part("fused/{part}.parquet"),
    shell:
        "{params.launcher:q} --out-centroids {output.centroids:q} --out-stats {output.stats:q}"
        " --threads {threads} --options-json {params.options:q} --skip {input.skip:q}"
        " --each-part {input.parts:q} {params.fused:q} 2> {log:q}"


rule assign:
    input:
        fused=batch_files("fused/{part}.parquet"),
        centroids=rules.kmeans.output.centroids,
    output:
        batch_files("assign/{part}.parquet"),
    log:
        out("logs/assign/{batch}.log"),
    benchmark:
        out("benchmarks/assign/{batch}.tsv")
    conda:
        stage_env("assign")
    threads: ASSIGN["threads"]
    resources:
        **job_resources("assign"),
    params:
        options=stage_options("assign"),
        kmeans=stage_options("kmeans"),
    shell:
        "python -m unicom.cluster.assign --fused {input.fused:q} --centroids {input.centroids:q}"
        " --out {output:q} --threads {threads} --options-json {params.options:q}"
        " --kmeans-options-json {params.kmeans:q} 2> {log:q}"


rule cluster_report:
    input:
        parts=out("parts"),
        assignments=all_parts("assign/{part}.parquet"),
    output:
        json=out("clusters/sizes.json"),
        png=report(
            out("clusters/sizes.png"),
            caption="../report/sizes.rst",
            category="2. Clustering",
        ),
    log:
        out("logs/cluster_report.log"),
    benchmark:
        out("benchmarks/cluster_report.tsv")
    conda:
        "../envs/torch-cpu.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        min_cluster_size=ASSIGN["min_cluster_size"],
        assignments=each_part("assign/{part}.parquet"),
    shell:
        "python -m unicom.cluster.report --min-cluster-size {params.min_cluster_size:q}"
        " --out-json {output.json:q} --out-png {output.png:q}"
        " --each-part {input.parts:q} {params.assignments:q} 2> {log:q}"


rule cluster_diagnostics:
    input:
        assignments=all_parts("assign/{part}.parquet", DIAGNOSTIC_SAMPLE),
        shards=all_parts("shards/{part}.tar", DIAGNOSTIC_SAMPLE),
        tables=all_parts("shards/{part}.parquet", DIAGNOSTIC_SAMPLE),
        embeddings=all_parts("embed/{part}.parquet", DIAGNOSTIC_SAMPLE),
    output:
        grid=report(
            out("clusters/grid.png"),
            caption="../report/grid.rst",
            category="2. Clustering",
        ),
        agreement=out("clusters/agreement.json"),
        agreement_png=report(
            out("clusters/agreement.png"),
            caption="../report/agreement.rst",
            category="2. Clustering",
        ),
    log:
        out("logs/cluster_diagnostics.log"),
    benchmark:
        out("benchmarks/cluster_diagnostics.tsv")
    conda:
        "../envs/torch-cpu.yaml"
    threads: KMEANS["threads"]
    resources:
        **job_resources("assign.diagnostics"),
    params:
        kmeans=stage_options("kmeans"),
        options=stage_options("assign.diagnostics"),
    shell:
        "python -m unicom.cluster.diagnostics --assignments {input.assignments:q}"
        " --shards {input.shards:q} --shard-tables {input.tables:q}"
        " --embeddings {input.embeddings:q} --kmeans-options-json {params.kmeans:q}"
        " --options-json {params.options:q} --out-grid {output.grid:q}"
        " --out-agreement {output.agreement:q} --out-agreement-png {output.agreement_png:q}"
        " --threads {threads} 2> {log:q}"


# The ablation grid's clusterings (rules/ablations.smk): k-means and assign on a variant's
# fused files with its kmeans.* and assign.*. Every variant samples the run's screened rows.
use rule kmeans as ablation_kmeans with:
    input:
        parts=out("parts"),
        fused=all_parts(by_wildcard(GRID_FUSED, "clustering")),
        skip=SCREENED,
        downloaded=out("download/summary.json"),
    output:
        centroids=out("ablations/clusters/{clustering}/centroids.npy"),
        stats=out("ablations/clusters/{clustering}/kmeans.json"),
    log:
        out("logs/ablations/kmeans/{clustering}.log"),
    benchmark:
        out("benchmarks/ablations/kmeans/{clustering}.tsv")
    params:
        launcher=grid_kmeans_launcher,
        options=by_wildcard(grid_options(GRID.clusterings, "kmeans"), "clustering"),
        fused=each_part(by_wildcard(GRID_FUSED, "clustering")),


use rule assign as ablation_assign with:
    input:
        fused=batch_of(by_wildcard(GRID_FUSED, "clustering")),
        centroids=rules.ablation_kmeans.output.centroids,
    output:
        batch_files("ablations/clusters/{{clustering}}/assign/{part}.parquet"),
    log:
        out("logs/ablations/assign/{clustering}/{batch}.log"),
    benchmark:
        out("benchmarks/ablations/assign/{clustering}/{batch}.tsv")
    params:
        options=by_wildcard(grid_options(GRID.clusterings, "assign"), "clustering"),
        kmeans=by_wildcard(grid_options(GRID.clusterings, "kmeans"), "clustering"),
