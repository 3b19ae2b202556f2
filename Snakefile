# fusedqk: is the fused QKV + Q/K RMSNorm + RoPE decode path worth turning on, per backend?
# `snakemake --cores all` runs what this machine has (config/config.yaml, docs/configuration.md);
# each rule calls the `fusedqk` command line, in a container where the configuration says so.
from snakemake.utils import min_version

min_version("9.0")


# config/config.yaml is loaded at the top of common.smk (a malformed file is one line there);
# --configfile and --config override it as usual.
include: "workflow/rules/common.smk"
include: "workflow/rules/containers.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/report.smk"


# Every run is reported and sealed with what succeeded; then a model that failed fails the
# pipeline, named on the console (each failed job's status file says why).
rule all:
    input:
        [f"{run_dir(b)}/MANIFEST.sha256" for b in BACKENDS],
    default_target: True
    conda:
        "workflow/envs/fusedqk.yaml"
    params:
        fusedqk=FUSEDQK_NATIVE,
        runs=[run_dir(b) for b in BACKENDS],
    log:
        [f"{run_dir(b)}.failures.log" for b in BACKENDS],  # beside each run, like the manifest's
    shell:
        "{params.fusedqk} failures {params.runs:q} 2>&1 | tee {log:q}"
