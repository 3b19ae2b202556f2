# fusedqk: is the fused QKV + Q/K RMSNorm + RoPE decode path worth turning on, per backend?
# `snakemake --cores all` runs what this machine has (config/config.yaml, docs/configuration.md);
# each rule calls the `fusedqk` command line, in a container where the configuration says so.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/containers.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        [f"{run_dir(b)}/MANIFEST.sha256" for b in BACKENDS],
    default_target: True
