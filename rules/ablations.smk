# The ablation grid (`snakemake ablations`): config.ablations' variants x seeds, each stage
# keyed by the settings it depends on (unicom.ablations.grid), run with the same commands as the main
# rules. Jobs exist only for what a variant changes: an r2 variant trains and evaluates, a
# fuse.mode variant also fuses and clusters; nothing downloads or embeds again.

from unicom.ablations import grid

GRID = planned(grid.plan, config)


wildcard_constraints:
    fusion=r"[A-Za-z0-9][A-Za-z0-9._=+-]*",
    clustering=r"[A-Za-z0-9][A-Za-z0-9._=+-]*",
    training=r"[A-Za-z0-9][A-Za-z0-9._=+-]*",


rule ablation_fuse:
    input:
        batch_files("embed/{part}.parquet"),
    output:
        batch_files("ablations/fused/{{fusion}}/{part}.parquet"),
    log:
        out("logs/ablations/fuse/{fusion}/{batch}.log"),
    benchmark:
        out("benchmarks/ablations/fuse/{fusion}/{batch}.tsv")
    conda:
        "../envs/data.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        options=lambda wildcards: grid_section(GRID.fusions, wildcards.fusion, "fuse"),
    shell:
        FUSE_COMMAND


rule ablation_kmeans:
    input:
        parts=out("parts"),
        fused=lambda wildcards: expand(
            out(grid.fused_pattern(GRID.clustering_fusion[wildcards.clustering])),
            part=part_names(),
        ),
        # the run's screen drops: every variant samples the same screened rows
        skip=SCREENED,
        downloaded=rules.download_summary.output.summary,
    output:
        centroids=out("ablations/clusters/{clustering}/centroids.npy"),
        stats=out("ablations/clusters/{clustering}/kmeans.json"),
    log:
        out("logs/ablations/kmeans/{clustering}.log"),
    benchmark:
        out("benchmarks/ablations/kmeans/{clustering}.tsv")
    conda:
        "../envs/torch-gpu.yaml" if KMEANS["gpus"] else "../envs/torch-cpu.yaml"
    threads: KMEANS["threads"]
    resources:
        mem_mb=KMEANS["mem_mb"],
        runtime=KMEANS["runtime"],
        gpu=KMEANS["gpus"],
        nodes=KMEANS["nodes"],
        tasks=KMEANS["nodes"] * KMEANS["nproc_per_node"],
    params:
        launcher=lambda wildcards, resources: planned(
            planning.kmeans_launcher,
            GRID.clusterings[wildcards.clustering]["kmeans"],
            dict(resources.items()),
        ),
        options=lambda wildcards: grid_section(
            GRID.clusterings, wildcards.clustering, "kmeans"
        ),
        fused=lambda wildcards: out(
            grid.fused_pattern(GRID.clustering_fusion[wildcards.clustering])
        ),
    shell:
        KMEANS_COMMAND


rule ablation_assign:
    input:
        fused=lambda wildcards: files_of_batch(
            grid.fused_pattern(GRID.clustering_fusion[wildcards.clustering]),
            wildcards.batch,
        ),
        centroids=rules.ablation_kmeans.output.centroids,
    output:
        batch_files("ablations/clusters/{{clustering}}/assign/{part}.parquet"),
    log:
        out("logs/ablations/assign/{clustering}/{batch}.log"),
    benchmark:
        out("benchmarks/ablations/assign/{clustering}/{batch}.tsv")
    conda:
        "../envs/torch-gpu.yaml" if ASSIGN["gpus"] else "../envs/torch-cpu.yaml"
    threads: ASSIGN["threads"]
    resources:
        mem_mb=ASSIGN["mem_mb"],
        runtime=ASSIGN["runtime"],
        gpu=ASSIGN["gpus"],
    params:
        options=lambda wildcards: grid_section(
            GRID.clusterings, wildcards.clustering, "assign"
        ),
        kmeans=lambda wildcards: grid_section(
            GRID.clusterings, wildcards.clustering, "kmeans"
        ),
    shell:
        ASSIGN_COMMAND


rule ablation_train:
    input:
        parts=out("parts"),
        shards=all_parts("shards/{part}.tar"),
        assignments=lambda wildcards: expand(
            out(grid.assign_pattern(GRID.training_clustering[wildcards.training])),
            part=part_names(),
        ),
        centroids=lambda wildcards: out(
            grid.centroids_path(GRID.training_clustering[wildcards.training])
        ),
        # the run's hygiene drops: every variant trains on the same rows (near-duplicates
        # found in the run's clusters are near-duplicates whatever a variant clusters)
        skip=SCREENED + NEAR_DROPS,
    output:
        model=out("ablations/train/{training}/model.safetensors"),
        info=out("ablations/train/{training}/model.json"),
        metrics=out("ablations/train/{training}/metrics.jsonl"),
        data=out("ablations/train/{training}/data.json"),
    log:
        out("logs/ablations/train/{training}.log"),
    benchmark:
        out("benchmarks/ablations/train/{training}.tsv")
    conda:
        "../envs/torch-gpu.yaml" if TRAIN["gpus"] else "../envs/torch-cpu.yaml"
    threads: TRAIN["threads"]
    resources:
        mem_mb=TRAIN["mem_mb"],
        runtime=TRAIN["runtime"],
        gpu=TRAIN["gpus"],
        nodes=TRAIN["nodes"],
        tasks=TRAIN["nodes"] * TRAIN["nproc_per_node"],
    params:
        shards=each_part("shards/{part}.tar"),
        assignments=lambda wildcards: out(
            grid.assign_pattern(GRID.training_clustering[wildcards.training])
        ),
        launcher=lambda wildcards, resources: planned(
            planning.train_launcher, TRAIN, dict(resources.items())
        ),
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
        k=lambda wildcards: GRID.trainings[wildcards.training]["kmeans"]["k"],
        options=lambda wildcards: grid_section(
            GRID.trainings, wildcards.training, "train"
        ),
    shell:
        TRAIN_COMMAND


rule ablation_evaluate:
    input:
        unpack(
            lambda wildcards: {
                "model": out(f"ablations/train/{wildcards.training}/model.safetensors")
            }
            | DATASET_INPUTS[wildcards.dataset]
        ),
    output:
        out("ablations/evaluate/{training}/{dataset}.json"),
    log:
        out("logs/ablations/evaluate/{training}/{dataset}.log"),
    benchmark:
        out("benchmarks/ablations/evaluate/{training}/{dataset}.tsv")
    conda:
        "../envs/torch-gpu.yaml" if EVALUATE["gpus"] else "../envs/torch-cpu.yaml"
    threads: EVALUATE["threads"]
    resources:
        mem_mb=EVALUATE["mem_mb"],
        runtime=EVALUATE["runtime"],
        gpu=EVALUATE["gpus"],
    params:
        model=lambda wildcards: out(grid.train_dir(wildcards.training)),
        dataset_path=lambda wildcards: EVALUATION_DATASETS[wildcards.dataset],
        options=stage_options("evaluate"),
        embed=stage_options("embed"),
    shell:
        EVALUATE_COMMAND


ABLATION_RUNS = grid.table_runs(GRID, list(EVALUATION_DATASETS), out)
# The baseline's value of each axis key, for the plots.
ABLATION_AXES = {axis: grid.value_at(config, axis) for axis in GRID.axes}


localrules:
    ablations,
    ablation_table,


rule ablation_table:
    input:
        evaluations=[p for run in ABLATION_RUNS for p in run["evaluations"].values()],
        metrics=[
            os.path.join(run["train_dir"], "metrics.jsonl") for run in ABLATION_RUNS
        ],
        base=expand(
            out("evaluate/base/{dataset}.json"), dataset=list(EVALUATION_DATASETS)
        ),
    output:
        csv=report(
            out("ablations/table.csv"),
            caption="../report/ablations.rst",
            category="5. Ablations",
        ),
        markdown=out("ablations/table.md"),
        png=report(
            out("ablations/plots.png"),
            caption="../report/ablations.rst",
            category="5. Ablations",
        ),
    log:
        out("logs/ablation_table.log"),
    conda:
        "../envs/torch-cpu.yaml"
    params:
        runs=as_json(ABLATION_RUNS),
        axes=as_json(ABLATION_AXES),
        compact_dim=GRID.compact_dim,
    shell:
        "python -m unicom.ablations.table --runs-json {params.runs:q}"
        " --axes-json {params.axes:q} --base {input.base:q}"
        " --compact-dim {params.compact_dim:q} --out-csv {output.csv:q}"
        " --out-md {output.markdown:q} --out-png {output.png:q} 2> {log:q}"


rule ablations:
    input:
        rules.ablation_table.output,
