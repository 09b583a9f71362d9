# The ablation grid (`snakemake ablations`): config.ablations' variants x seeds, each stage
# keyed by the settings it depends on (unicom.ablations.grid; GRID in rules/common.smk). Its
# jobs are the main rules' own, under `use rule ... as ablation_*` beside each of them
# (fuse.smk, cluster.smk, train.smk, evaluate.smk). Jobs exist only for what a variant changes:
# an r2 variant trains and evaluates, a fuse.mode variant also fuses and clusters; nothing
# downloads or embeds again. This file gathers the grid's table and plots.

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
