# Retrieval benchmarks: every model x every available dataset, then one summary table.

EVALUATE = config["evaluate"]
# Model name -> what `unicom.evaluate --model` takes.
EVALUATION_MODELS = planning.evaluation_models(EVALUATE, out("train"))
# Dataset name -> path, for the benchmarks that are configured (auto: the demo's held-out split,
# Debian's Fashion-MNIST). Those with no path (null, or the openclipart "auto" of a real run)
# are left out silently: nothing prints at parse time but errors, and dry runs and every
# cluster job parse this too. A run that evaluates nothing stops here, before any job.
EVALUATION_DATASETS, _ = planned(
    planning.evaluation_datasets, config, out("demo/heldout.parquet")
)
planned(planning.check_evaluation, config, EVALUATION_DATASETS)
FASHION_MNIST_MARKER = planning.fashion_mnist_marker(config["demo"]["resources_dir"])

# What an evaluate job waits for: the model export (for base, the encoder's weights, fetched
# on the login node) and, for a demo set, what its producer writes.
MODEL_INPUTS = {
    "trained": {"model": out("train/model.safetensors")},
    "base": {"encoder": out("embed/encoder.json")},
}
DATASET_INPUTS = planning.evaluation_dataset_inputs(
    EVALUATION_DATASETS, out("demo/heldout.parquet"), FASHION_MNIST_MARKER
)


# On the login node (it may need apt-get's network): Debian's dataset-fashion-mnist, unpacked
# under demo.resources_dir, when it is not installed (planning prefers an installed package).
localrules:
    fetch_fashion_mnist,


rule fetch_fashion_mnist:
    output:
        FASHION_MNIST_MARKER,
    log:
        out("logs/fetch_fashion_mnist.log"),
    conda:
        "../envs/data.yaml"
    params:
        resources_dir=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "python -m unicom.demo.build fetch-fashion-mnist --resources-dir {params.resources_dir:q}"
        " --out {output:q} 2> {log:q}"


# The command of an evaluate job; rules/ablations.smk runs it for the grid's models.
EVALUATE_COMMAND = (
    "python -m unicom.evaluate.evaluate --model {params.model:q} --dataset {wildcards.dataset:q}"
    " --dataset-path {params.dataset_path:q} --out {output:q} --threads {threads}"
    " --options-json {params.options:q} --embed-options-json {params.embed:q} 2> {log:q}"
)


rule evaluate:
    input:
        unpack(
            lambda wildcards: MODEL_INPUTS.get(wildcards.model, {})
            | DATASET_INPUTS[wildcards.dataset]
        ),
    output:
        out("evaluate/{model}/{dataset}.json"),
    log:
        out("logs/evaluate/{model}/{dataset}.log"),
    benchmark:
        out("benchmarks/evaluate/{model}/{dataset}.tsv")
    wildcard_constraints:
        # the models above; finetuned-* results come from rules/finetune.smk
        model="|".join(re.escape(name) for name in EVALUATION_MODELS),
    conda:
        "../envs/torch-gpu.yaml" if EVALUATE["gpus"] else "../envs/torch-cpu.yaml"
    threads: EVALUATE["threads"]
    resources:
        mem_mb=EVALUATE["mem_mb"],
        runtime=EVALUATE["runtime"],
        gpu=EVALUATE["gpus"],
    params:
        model=lambda wildcards: EVALUATION_MODELS[wildcards.model],
        dataset_path=lambda wildcards: EVALUATION_DATASETS[wildcards.dataset],
        options=stage_options("evaluate"),
        embed=stage_options("embed"),
    shell:
        EVALUATE_COMMAND


# Linear probes (linear_probe.datasets; none in the demo): frozen embeddings of each model,
# a logistic regression on the train split, top-1 on the test split.
PROBE = config["linear_probe"]
PROBE_TRAIN_SPLITS = planned(
    planning.train_split_paths,
    config,
    "linear_probe",
    EVALUATION_DATASETS,
    out("demo/urls.parquet"),
)
# ... and any folder in ImageFolder layout (linear_probe.image_folders): both splits inside.
PROBE_FOLDERS = planned(planning.image_folders, config, list(EVALUATE["datasets"]))
PROBE_TEST_PATHS = {
    **{name: EVALUATION_DATASETS[name] for name in PROBE_TRAIN_SPLITS},
    **PROBE_FOLDERS,
}
PROBE_TRAIN_PATHS = {**PROBE_TRAIN_SPLITS, **PROBE_FOLDERS}
PROBE_RESULTS = expand(
    out("probe/{model}/{dataset}.json"),
    model=list(EVALUATION_MODELS),
    dataset=list(PROBE_TEST_PATHS),
)


rule linear_probe:
    input:
        unpack(
            lambda wildcards: MODEL_INPUTS.get(wildcards.model, {})
            | (
                {}
                if wildcards.dataset in PROBE_FOLDERS
                else DATASET_INPUTS[wildcards.dataset]
                | train_split_inputs(wildcards.dataset, PROBE_TRAIN_SPLITS)
            )
        ),
    output:
        out("probe/{model}/{dataset}.json"),
    log:
        out("logs/probe/{model}/{dataset}.log"),
    benchmark:
        out("benchmarks/probe/{model}/{dataset}.tsv")
    conda:
        "../envs/torch-gpu.yaml" if PROBE["gpus"] else "../envs/torch-cpu.yaml"
    threads: PROBE["threads"]
    resources:
        mem_mb=PROBE["mem_mb"],
        runtime=PROBE["runtime"],
        gpu=PROBE["gpus"],
    params:
        model=lambda wildcards: EVALUATION_MODELS[wildcards.model],
        train_path=lambda wildcards: PROBE_TRAIN_PATHS[wildcards.dataset],
        test_path=lambda wildcards: PROBE_TEST_PATHS[wildcards.dataset],
        # a fixed flag, not a config value
        folder=lambda wildcards: (
            "--image-folder" if wildcards.dataset in PROBE_FOLDERS else ""
        ),
        options=stage_options("linear_probe"),
        embed=stage_options("embed"),
    shell:
        "python -m unicom.supervised.linear_probe --model {params.model:q} --dataset {wildcards.dataset:q}"
        " --train-path {params.train_path:q} --test-path {params.test_path:q} --out {output:q}"
        " {params.folder}"
        " --threads {threads} --options-json {params.options:q}"
        " --embed-options-json {params.embed:q} 2> {log:q}"
