# Supervised retrieval fine-tuning (finetune.datasets; none in the demo): each model of
# finetune.models trained on a benchmark's train split with its labels, by the pretraining's
# trainer and head, then evaluated on the test split like any model.

from unicom import formats

FINETUNE = config["finetune"]
FINETUNE_TRAIN_SPLITS = planned(
    planning.train_split_paths,
    config,
    "finetune",
    EVALUATION_DATASETS,
    out("demo/urls.parquet"),
)
# Model -> the trainer's options (its starting weights, the finetune section's settings).
FINETUNE_OPTIONS = {
    model: planned(
        planning.finetune_options, config, model, out("train"), section(config, "train")
    )
    for model in (FINETUNE["models"] if FINETUNE_TRAIN_SPLITS else [])
}
FINETUNE_RESULTS = expand(
    out("evaluate/finetuned-{model}/{dataset}.json"),
    model=list(FINETUNE_OPTIONS),
    dataset=list(FINETUNE_TRAIN_SPLITS),
)


rule finetune_data:
    input:
        unpack(
            lambda wildcards: train_split_inputs(
                wildcards.dataset, FINETUNE_TRAIN_SPLITS
            )
        ),
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
        path=lambda wildcards: FINETUNE_TRAIN_SPLITS[wildcards.dataset],
        options=stage_options("finetune"),
    shell:
        "python -m unicom.supervised.finetune_data --dataset {wildcards.dataset:q}"
        " --path {params.path:q} --out-dir {output:q} --options-json {params.options:q}"
        " 2> {log:q}"


rule finetune:
    input:
        unpack(
            lambda wildcards: {"data": out(f"finetune/data/{wildcards.dataset}")}
            | (
                {"model": out("train/model.safetensors")}
                if wildcards.model == "trained"
                else {}
            )
        ),
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
        "../envs/torch-gpu.yaml" if TRAIN["gpus"] else "../envs/torch-cpu.yaml"
    threads: TRAIN["threads"]
    resources:
        mem_mb=TRAIN["mem_mb"],
        runtime=TRAIN["runtime"],
        gpu=TRAIN["gpus"],
        nodes=TRAIN["nodes"],
        tasks=TRAIN["nodes"] * TRAIN["nproc_per_node"],
    params:
        parts=lambda wildcards, input: os.path.join(input.data, "parts"),
        shards=lambda wildcards, input: os.path.join(input.data, "shards/{part}.tar"),
        labels=lambda wildcards, input: os.path.join(
            input.data, "labels/{part}.parquet"
        ),
        classes=lambda wildcards, input: os.path.join(input.data, "classes.json"),
        launcher=lambda wildcards, resources: planned(
            planning.train_launcher, TRAIN, dict(resources.items())
        ),
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
        options=lambda wildcards: as_json(FINETUNE_OPTIONS[wildcards.model]),
    shell:
        "{params.launcher:q} --each-part {params.parts:q} --shards {params.shards:q}"
        " --assignments {params.labels:q} --num-classes-file {params.classes:q}"
        " --out-dir {params.out_dir:q} --threads {threads} --restart-on-mismatch"
        " --options-json {params.options:q} 2> {log:q}"


rule finetune_evaluate:
    input:
        unpack(
            lambda wildcards: {
                "model": out(
                    f"finetune/{wildcards.model}/{wildcards.dataset}/model.safetensors"
                )
            }
            | DATASET_INPUTS[wildcards.dataset]
        ),
    output:
        out("evaluate/finetuned-{model}/{dataset}.json"),
    log:
        out("logs/evaluate/finetuned-{model}/{dataset}.log"),
    benchmark:
        out("benchmarks/evaluate/finetuned-{model}/{dataset}.tsv")
    conda:
        "../envs/torch-gpu.yaml" if EVALUATE["gpus"] else "../envs/torch-cpu.yaml"
    threads: EVALUATE["threads"]
    resources:
        mem_mb=EVALUATE["mem_mb"],
        runtime=EVALUATE["runtime"],
        gpu=EVALUATE["gpus"],
    params:
        model=lambda wildcards, input: os.path.dirname(input.model),
        dataset_path=lambda wildcards: EVALUATION_DATASETS[wildcards.dataset],
        options=stage_options("evaluate"),
        embed=stage_options("embed"),
        protocol=formats.FINE_TUNED,
    shell:
        "python -m unicom.evaluate.evaluate --model {params.model:q} --dataset {wildcards.dataset:q}"
        " --dataset-path {params.dataset_path:q} --out {output:q} --threads {threads}"
        " --options-json {params.options:q} --embed-options-json {params.embed:q}"
        " --protocol {params.protocol:q} --name {wildcards.model:q} 2> {log:q}"
