# The results table (every protocol) and the plots for `snakemake --report`: the demo's story
# from download to retrieval.


localrules:
    report_plots,
    effective_config,
    evaluate_summary,


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


# The config this run used (schema defaults + the user's files + --config, after the
# rehearsal), written by a job rather than at parse time: dry runs and every cluster job parse
# the Snakefile too. A change of any value rewrites it.
rule effective_config:
    output:
        report(
            out("config.yaml"),
            caption="../report/config.rst",
            category="0. Configuration",
        ),
    log:
        out("logs/effective_config.log"),
    conda:
        "../envs/data.yaml"
    params:
        config=as_json(EFFECTIVE_CONFIG),
    shell:
        "python -m unicom.config write --config-json {params.config:q} --out {output:q}"
        " 2> {log:q}"


rule report_plots:
    input:
        download=out("download/summary.json"),
        kmeans=out("kmeans/kmeans.json"),
        train=out("train/metrics.jsonl"),
        evaluate=out("evaluate/summary.csv"),
    output:
        download=report(
            out("report/download.png"),
            caption="../report/download.rst",
            category="1. Data",
        ),
        kmeans=report(
            out("report/kmeans.png"),
            caption="../report/kmeans.rst",
            category="2. Clustering",
        ),
        training=report(
            out("report/training.png"),
            caption="../report/training.rst",
            category="3. Training",
        ),
        retrieval=report(
            out("report/retrieval.png"),
            caption="../report/retrieval.rst",
            category="4. Retrieval",
        ),
        protocols=report(
            out("report/protocols.png"),
            caption="../report/protocols.rst",
            category="4. Retrieval",
        ),
    log:
        out("logs/report_plots.log"),
    conda:
        "../envs/data.yaml"
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.download),
    shell:
        "python -m unicom.report.plots --download-summary {input.download:q}"
        " --kmeans-stats {input.kmeans:q} --train-metrics {input.train:q}"
        " --eval-summary {input.evaluate:q} --out-dir {params.out_dir:q} 2> {log:q}"
