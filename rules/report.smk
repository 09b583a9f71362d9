# The run's config and the plots for `snakemake --report`: the demo's story from download to
# retrieval (the results table: evaluate_summary, rules/evaluate.smk).


localrules:
    report_plots,
    effective_config,


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
        config=as_json(config),
    shell:
        "python -m unicom.config write --config-json {params.config:q} --out {output:q}"
        " 2> {log:q}"


# The report's figures: retrieval and protocol panels only when the run evaluates.
EVALUATES = config["evaluate"]["enabled"]
PLOTS = {  # name -> the report category it is filed under
    "download": "1. Data",
    "kmeans": "2. Clustering",
    "training": "3. Training",
    **({"retrieval": "4. Retrieval", "protocols": "4. Retrieval"} if EVALUATES else {}),
}


rule report_plots:
    input:
        **({"evaluate": out("evaluate/summary.csv")} if EVALUATES else {}),
        download=out("download/summary.json"),
        kmeans=out("kmeans/kmeans.json"),
        train=out("train/metrics.jsonl"),
    output:
        **{
            name: report(
                out(f"report/{name}.png"),
                caption=f"../report/{name}.rst",
                category=category,
            )
            for name, category in PLOTS.items()
        },
    log:
        out("logs/report_plots.log"),
    conda:
        "../envs/data.yaml"
    params:
        out_dir=output_folder("download"),
        evaluate=(["--eval-summary", out("evaluate/summary.csv")] if EVALUATES else []),
    shell:
        "python -m unicom.report.plots --download-summary {input.download:q}"
        " --kmeans-stats {input.kmeans:q} --train-metrics {input.train:q}"
        " {params.evaluate:q} --out-dir {params.out_dir:q} 2> {log:q}"
