# Training on the pseudo-labels: one job over all shards, train.nodes x train.nproc_per_node ranks.
# Launch (unicom.planning.train_launcher): srun under a SLURM profile (`mpi: srun`), else
# torchrun --standalone when train.nproc_per_node > 1 (one node only), else a single process.
# A failed or timed-out job resumes from out("train/checkpoints") when rerun; the checkpoints are
# not declared outputs, so Snakemake leaves them in place.

TRAIN = config["train"]
# Ranks on several nodes need the profile's srun: stop before any job otherwise.
planned(planning.check_multi_node, "train", TRAIN, profile_resource("train", "mpi"))
# The ablation grid: training id -> its clustering's assignments and centroids (the run's or a
# variant's) and k.
GRID_ASSIGNED = {
    key: grid.assign_pattern(clustering)
    for key, clustering in GRID.training_clustering.items()
}
GRID_CENTROIDS = {
    key: out(grid.centroids_path(clustering))
    for key, clustering in GRID.training_clustering.items()
}
GRID_K = {key: variant["kmeans"]["k"] for key, variant in GRID.trainings.items()}


rule train:
    input:
        parts=out("parts"),
        shards=all_parts("shards/{part}.tar"),
        assignments=all_parts("assign/{part}.parquet"),
        centroids=out("kmeans/centroids.npy"),
        # hygiene drops (screen, near-duplicates): left out and counted in data.json
        skip=SCREENED + NEAR_DROPS,
    output:
        model=out("train/model.safetensors"),
        info=out("train/model.json"),
        metrics=out("train/metrics.jsonl"),
        data=out("train/data.json"),
    log:
        out("logs/train.log"),
    benchmark:
        out("benchmarks/train.tsv")
    conda:
        stage_env("train")
    threads: TRAIN["threads"]
    # SLURM: sbatch --nodes; with `mpi` set, --ntasks and `srun -n` get tasks (one rank each).
    resources:
        **job_resources("train"),
    params:
        shards=each_part("shards/{part}.tar"),
        assignments=each_part("assign/{part}.parquet"),
        launcher=train_launcher,
        out_dir=output_folder("model"),
        k=config["kmeans"]["k"],
        options=stage_options("train"),
    shell:
        "{params.launcher:q} --each-part {input.parts:q} --shards {params.shards:q}"
        " --assignments {params.assignments:q}"
        " --centroids {input.centroids:q} --num-classes {params.k:q}"
        " --out-dir {params.out_dir:q} --threads {threads} --restart-on-mismatch"
        " --options-json {params.options:q} --skip {input.skip:q} 2> {log:q}"


# The ablation grid's trainings (rules/ablations.smk): a variant's clustering (the run's own
# where it changes none) and train.* with one seed. Every variant trains on the same rows: the
# run's hygiene drops (near-duplicates found in the run's clusters are near-duplicates whatever
# a variant clusters).
use rule train as ablation_train with:
    input:
        parts=out("parts"),
        shards=all_parts("shards/{part}.tar"),
        assignments=all_parts(by_wildcard(GRID_ASSIGNED, "training")),
        centroids=by_wildcard(GRID_CENTROIDS, "training"),
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
    params:
        assignments=each_part(by_wildcard(GRID_ASSIGNED, "training")),
        k=by_wildcard(GRID_K, "training"),
        options=by_wildcard(grid_options(GRID.trainings, "train"), "training"),
