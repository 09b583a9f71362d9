# Retrieval benchmarks: every model x every available dataset (EVALUATION_DATASETS,
# rules/common.smk), linear probes, then one summary table of every protocol.

import re

EVALUATE = config["evaluate"]
# Model name -> what `unicom.evaluate --model` takes.
EVALUATION_MODELS = planning.evaluation_models(EVALUATE, out("train"))
# What an evaluate job waits for besides its dataset: the model export (for base, the
# encoder's weights, fetched on the login node).
MODEL_INPUTS = wiring.model_inputs(
    EVALUATION_MODELS,
    out("train/model.safetensors"),
    {"encoder": out("embed/encoder.json")},
)
# The ablation grid: training id -> its export folder.
GRID_MODELS = {key: out(grid.train_dir(key)) for key in GRID.trainings}


# On the login node (it may need apt-get's network): Debian's dataset-fashion-mnist, unpacked
# under demo.resources_dir, when it is not installed (planning prefers an installed package).
localrules:
    fetch_fashion_mnist,
    evaluate_summary,


rule fetch_fashion_mnist:
    output:
        FASHION_MNIST_MARKER,
    log:
        out("logs/fetch_fashion_mnist.log"),
    conda:
        "../envs/data.yaml"
    params:
        resources_dir=output_folder(0),
    shell:
        "python -m unicom.demo.build fetch-fashion-mnist --resources-dir {params.resources_dir:q}"
        " --out {output:q} 2> {log:q}"


rule evaluate:
    input:
        unpack(by_wildcard(MODEL_INPUTS, "model")),
        unpack(by_wildcard(DATASET_INPUTS, "dataset")),
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
        stage_env("evaluate")
    threads: EVALUATE["threads"]
    resources:
        **job_resources("evaluate"),
    params:
        model=by_wildcard(EVALUATION_MODELS, "model"),
        dataset_path=by_wildcard(EVALUATION_DATASETS, "dataset"),
        options=stage_options("evaluate"),
        embed=stage_options("embed"),
    shell:
        "python -m unicom.evaluate.evaluate --model {params.model:q} --dataset {wildcards.dataset:q}"
        " --dataset-path {params.dataset_path:q} --out {output:q} --threads {threads}"
        " --options-json {params.options:q} --embed-options-json {params.embed:q} 2> {log:q}"


# The ablation grid's evaluations (rules/ablations.smk): each training's model on every
# benchmark.
use rule evaluate as ablation_evaluate with:
    input:
        unpack(by_wildcard(DATASET_INPUTS, "dataset")),
        model=out("ablations/train/{training}/model.safetensors"),
    output:
        out("ablations/evaluate/{training}/{dataset}.json"),
    log:
        out("logs/ablations/evaluate/{training}/{dataset}.log"),
    benchmark:
        out("benchmarks/ablations/evaluate/{training}/{dataset}.tsv")
    params:
        model=by_wildcard(GRID_MODELS, "training"),


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
PROBE_INPUTS = wiring.probe_inputs(
    PROBE_TRAIN_SPLITS, PROBE_FOLDERS, DATASET_INPUTS, out("demo/urls.parquet")
)
# a fixed flag, not a config value
PROBE_FLAGS = {
    name: "--image-folder" if name in PROBE_FOLDERS else "" for name in PROBE_TEST_PATHS
}
PROBE_RESULTS = expand(
    out("probe/{model}/{dataset}.json"),
    model=list(EVALUATION_MODELS),
    dataset=list(PROBE_TEST_PATHS),
)


rule linear_probe:
    input:
        unpack(by_wildcard(MODEL_INPUTS, "model")),
        unpack(by_wildcard(PROBE_INPUTS, "dataset")),
    output:
        out("probe/{model}/{dataset}.json"),
    log:
        out("logs/probe/{model}/{dataset}.log"),
    benchmark:
        out("benchmarks/probe/{model}/{dataset}.tsv")
    conda:
        stage_env("linear_probe")
    threads: PROBE["threads"]
    resources:
        **job_resources("linear_probe"),
    params:
        model=by_wildcard(EVALUATION_MODELS, "model"),
        train_path=by_wildcard(PROBE_TRAIN_PATHS, "dataset"),
        test_path=by_wildcard(PROBE_TEST_PATHS, "dataset"),
        folder=by_wildcard(PROBE_FLAGS, "dataset"),
        options=stage_options("linear_probe"),
        embed=stage_options("embed"),
    shell:
        "python -m unicom.supervised.linear_probe --model {params.model:q} --dataset {wildcards.dataset:q}"
        " --train-path {params.train_path:q} --test-path {params.test_path:q} --out {output:q}"
        " {params.folder}"
        " --threads {threads} --options-json {params.options:q}"
        " --embed-options-json {params.embed:q} 2> {log:q}"


# The results table: every model's evaluation, probe and fine-tuned model (rules/finetune.smk).
FINETUNE_RESULTS = expand(
    out("evaluate/finetuned-{model}/{dataset}.json"),
    model=FINETUNE_MODELS,
    dataset=list(FINETUNE_TRAIN_SPLITS),
)


rule evaluate_summary:
    input:
        expand(
            out("evaluate/{model}/{dataset}.json"),
            model=list(EVALUATION_MODELS),
            dataset=list(EVALUATION_DATASETS),
        ),
        PROBE_RESULTS,
        FINETUNE_RESULTS,
    output:
        csv=report(
            out("evaluate/summary.csv"),
            caption="../report/metrics.rst",
            category="4. Retrieval",
        ),
        markdown=out("evaluate/summary.md"),
    log:
        out("logs/evaluate_summary.log"),
    conda:
        "../envs/data.yaml"
    shell:
        "python -m unicom.evaluate.summary {input:q} --out-csv {output.csv:q}"
        " --out-md {output.markdown:q} 2> {log:q}"
