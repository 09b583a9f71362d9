# Training on the pseudo-labels: one job over all shards, train.nodes x train.nproc_per_node ranks.
# Launch (unicom.planning.train_launcher): srun under a SLURM profile (`mpi: srun`), else
# torchrun --standalone when train.nproc_per_node > 1 (one node only), else a single process.
# A failed or timed-out job resumes from out("train/checkpoints") when rerun; the checkpoints are
# not declared outputs, so Snakemake leaves them in place.

TRAIN = config["train"]
# Ranks on several nodes need the profile's srun: stop before any job otherwise.
planned(planning.check_multi_node, "train", TRAIN, profile_resource("train", "mpi"))


# The command of the training job; rules/ablations.smk runs it for the grid.
TRAIN_COMMAND = (
    "{params.launcher:q} --each-part {input.parts:q} --shards {params.shards:q}"
    " --assignments {params.assignments:q}"
    " --centroids {input.centroids:q} --num-classes {params.k:q}"
    " --out-dir {params.out_dir:q} --threads {threads} --restart-on-mismatch"
    " --options-json {params.options:q} --skip {input.skip:q} 2> {log:q}"
)


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
        "../envs/torch-gpu.yaml" if TRAIN["gpus"] else "../envs/torch-cpu.yaml"
    threads: TRAIN["threads"]
    resources:
        mem_mb=TRAIN["mem_mb"],
        runtime=TRAIN["runtime"],
        gpu=TRAIN["gpus"],
        # SLURM: sbatch --nodes; with `mpi` set, --ntasks and `srun -n` get tasks (one rank each).
        nodes=TRAIN["nodes"],
        tasks=TRAIN["nodes"] * TRAIN["nproc_per_node"],
    params:
        shards=each_part("shards/{part}.tar"),
        assignments=each_part("assign/{part}.parquet"),
        launcher=lambda wildcards, resources: planned(
            planning.train_launcher, TRAIN, dict(resources.items())
        ),
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
        k=config["kmeans"]["k"],
        options=stage_options("train"),
    shell:
        TRAIN_COMMAND
