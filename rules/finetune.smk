# Supervised retrieval fine-tuning (finetune.datasets; none in the demo): each model of
# finetune.models trained on a benchmark's train split with its labels, by the pretraining's
# trainer and head, then evaluated on the test split like any model. The splits and models:
# FINETUNE_TRAIN_SPLITS and FINETUNE_MODELS (rules/common.smk; evaluate_summary gathers the
# results).

from unicom import formats

# Model -> the trainer's options (its starting weights, the finetune section's settings).
FINETUNE_OPTIONS = {
    model: as_json(
        planned(
            planning.finetune_options,
            config,
            model,
            out("train"),
            section(config, "train"),
        )
    )
    for model in FINETUNE_MODELS
}
# What a job reading a train split waits for, and what fine-tuning a model waits for besides
# its data.
FINETUNE_DATA_INPUTS = wiring.train_split_inputs(
    FINETUNE_TRAIN_SPLITS, DATASET_INPUTS, out("demo/urls.parquet")
)
FINETUNE_MODEL_INPUTS = wiring.model_inputs(
    FINETUNE_MODELS, out("train/model.safetensors"), {}
)


rule finetune_data:
    input:
        unpack(by_wildcard(FINETUNE_DATA_INPUTS, "dataset")),
    output:
        directory(out("finetune/data/{dataset}")),
    log:
        out("logs/finetune_data/{dataset}.log"),
    benchmark:
        out("benchmarks/finetune_data/{dataset}.tsv")
    conda:
        "../envs/torch-cpu.yaml"
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        path=by_wildcard(FINETUNE_TRAIN_SPLITS, "dataset"),
        options=stage_options("finetune"),
    shell:
        "python -m unicom.supervised.finetune_data --dataset {wildcards.dataset:q}"
        " --path {params.path:q} --out-dir {output:q} --options-json {params.options:q}"
        " 2> {log:q}"


rule finetune:
    input:
        unpack(by_wildcard(FINETUNE_MODEL_INPUTS, "model")),
        data=out("finetune/data/{dataset}"),
    output:
        model=out("finetune/{model}/{dataset}/model.safetensors"),
        info=out("finetune/{model}/{dataset}/model.json"),
        metrics=out("finetune/{model}/{dataset}/metrics.jsonl"),
        data=out("finetune/{model}/{dataset}/data.json"),
    log:
        out("logs/finetune/{model}/{dataset}.log"),
    benchmark:
        out("benchmarks/finetune/{model}/{dataset}.tsv")
    conda:
        stage_env("train")
    threads: config["train"]["threads"]
    resources:
        **job_resources("train"),
    params:
        parts=inside_input("data", "parts"),
        shards=inside_input("data", "shards/{part}.tar"),
        labels=inside_input("data", "labels/{part}.parquet"),
        classes=inside_input("data", "classes.json"),
        launcher=train_launcher,
        out_dir=output_folder("model"),
        options=by_wildcard(FINETUNE_OPTIONS, "model"),
    shell:
        "{params.launcher:q} --each-part {params.parts:q} --shards {params.shards:q}"
        " --assignments {params.labels:q} --num-classes-file {params.classes:q}"
        " --out-dir {params.out_dir:q} --threads {threads} --restart-on-mismatch"
        " --options-json {params.options:q} 2> {log:q}"


rule finetune_evaluate:
    input:
        unpack(by_wildcard(DATASET_INPUTS, "dataset")),
        model=out("finetune/{model}/{dataset}/model.safetensors"),
    output:
        out("evaluate/finetuned-{model}/{dataset}.json"),
    log:
        out("logs/evaluate/finetuned-{model}/{dataset}.log"),
    benchmark:
        out("benchmarks/evaluate/finetuned-{model}/{dataset}.tsv")
    conda:
        stage_env("evaluate")
    threads: config["evaluate"]["threads"]
    resources:
        **job_resources("evaluate"),
    params:
        model=input_folder("model"),
        dataset_path=by_wildcard(EVALUATION_DATASETS, "dataset"),
        options=stage_options("evaluate"),
        embed=stage_options("embed"),
        protocol=formats.FINE_TUNED,
    shell:
        "python -m unicom.evaluate.evaluate --model {params.model:q} --dataset {wildcards.dataset:q}"
        " --dataset-path {params.dataset_path:q} --out {output:q} --threads {threads}"
        " --options-json {params.options:q} --embed-options-json {params.embed:q}"
        " --protocol {params.protocol:q} --name {wildcards.model:q} 2> {log:q}"
