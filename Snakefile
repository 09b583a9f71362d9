"""Unicom pipeline: download -> embed -> fuse -> k-means -> assign -> train -> evaluate -> report.

Run the offline demo with `snakemake --profile profiles/local`, a real run with
`--configfile config/laion400m.yaml`; every key is described in config/schema.yaml.
"""

import os
import sys
from pathlib import Path

from snakemake.shell import shell
from snakemake.utils import min_version

min_version("9.0")

# The stage code lives in workflow/unicom: importable here, and put on PYTHONPATH for the
# `python -m unicom.<stage>` jobs (local and cluster jobs alike run through this prefix).
PACKAGE_DIR = str(Path(workflow.basedir) / "workflow")
sys.path.insert(0, PACKAGE_DIR)

from unicom.config import check_output_dir, layered_config
from unicom.errors import UnicomError
from unicom.planning import job_shell_prefix
from unicom.watchdog import shell_export

# Every job also learns which process runs it (this one: local jobs are its children; a
# cluster job's own Snakemake parses this file again), so that a stage ends with it after a
# hard kill instead of running on orphaned (unicom.watchdog).
shell.prefix(job_shell_prefix(PACKAGE_DIR, shell_export()))

# Layers: the schema's defaults < the --configfile files (config/config.yaml, the demo, only
# when none is given) < --config. No `configfile:` directive: Snakemake would merge the demo
# under every user config. `python -m unicom.config show` prints the same result.
try:
    EFFECTIVE_CONFIG = layered_config(
        workflow.config_settings.configfiles,
        workflow.config_settings.config,
        default_configfile=os.path.join(workflow.basedir, "config/config.yaml"),
    )
    check_output_dir(EFFECTIVE_CONFIG["output_dir"])
except UnicomError as err:
    sys.exit(f"unicom: error: {err}")
config.clear()
config.update(EFFECTIVE_CONFIG)


# common.smk first: what the rule files share. Each rule file reads it and itself only
# (tests/test_rules.py), so the order of the others is free.
include: "rules/common.smk"
include: "rules/sources.smk"
include: "rules/demo.smk"
include: "rules/download.smk"
include: "rules/embed.smk"
include: "rules/fuse.smk"
include: "rules/hygiene.smk"
include: "rules/cluster.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/finetune.smk"
include: "rules/report.smk"
include: "rules/ablations.smk"


# Existing shards and embeddings (rules/sources.smk) write what the URL list's split and
# download, and the embed jobs, would: theirs win.
if SHARD_FILES:

    ruleorder: index_shards > split_urls
    ruleorder: link_shards > download


if config["data"]["embeddings"] is not None:

    ruleorder: import_embeddings > embed


report: "report/workflow.rst"


rule all:
    default_target: True
    input:
        demo_outputs(),
        out("download/summary.json"),
        all_parts("fused/{part}.parquet"),
        all_parts("assign/{part}.parquet"),
        out("clusters/sizes.json"),
        out("clusters/agreement.json"),
        out("hygiene/summary.json"),
        out("evaluate/summary.csv") if config["evaluate"]["enabled"] else [],
        rules.report_plots.output,
        out("config.yaml"),
