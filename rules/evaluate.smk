# Retrieval benchmarks: every model x every available dataset, then one summary table.

EVALUATE = config["evaluate"]
EVALUATION_DATASETS = evaluation_datasets()


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        out("evaluate/{model}/{dataset}.json"),
    log:
        out("logs/evaluate/{model}/{dataset}.log"),
    benchmark:
        out("benchmarks/evaluate/{model}/{dataset}.tsv")
    conda:
        "../envs/torch-gpu.yaml" if EVALUATE["gpus"] else "../envs/torch-cpu.yaml"
    threads: EVALUATE["threads"]
    resources:
        mem_mb=EVALUATE["mem_mb"],
        runtime=EVALUATE["runtime"],
        gpu=EVALUATE["gpus"],
    params:
        model=lambda wildcards: evaluation_models()[wildcards.model],
        dataset_path=lambda wildcards: EVALUATION_DATASETS[wildcards.dataset],
        options=stage_options("evaluate"),
        embed=stage_options("embed"),
    shell:
        "python -m unicom.evaluate.evaluate --model {params.model:q} --dataset {wildcards.dataset:q}"
        " --dataset-path {params.dataset_path:q} --out {output:q} --threads {threads}"
        " --options-json {params.options:q} --embed-options-json {params.embed:q} 2> {log:q}"


localrules:
    evaluate_summary,


rule evaluate_summary:
    input:
        evaluation_targets(),
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
