# A stand-in `train` rule for tests/test_slurm.py until rules/train.smk starts its ranks with
# srun under the SLURM profiles. The profile's `train` entry (mpi: srun, tasks per GPU, the signal
# option) applies to it by name; its shell command starts the ranks the way the real rule must:
# `{resources.mpi} -n {resources.tasks}`.
# The -n is needed: the plugin runs the command with the allocation's SLURM_NTASKS removed from
# the environment, so a bare `srun` would start a single rank.


rule train:
    output:
        directory("ddp"),
    threads: 1
    resources:
        tasks=2,
        mem_mb=1000,
        runtime=5,
    params:
        wait_for_signal=config.get("wait_for_signal", 0),
    shell:
        "mkdir -p {output} && {resources.mpi} -n {resources.tasks}"
        " python {workflow.basedir}/ddp_probe.py --out-dir {output} --steps 3"
        " --wait-for-signal {params.wait_for_signal}"
