# Per backend: the environment; per model: decode benchmark, identity per fused implementation,
# block benchmark. Timing measurements take the one `measure` slot (default profile), so they
# never share a device; identity checks take a `checks` slot and go first, together, sharing the
# device with each other only; a model that fails is recorded in its status file and the others
# go on.


rule environment:
    conda:
        "../envs/fusedqk.yaml"
    input:
        image_stamp=lambda w: image_stamp(backend_of(w)),
    output:
        env="{run}/environment.json",
        config="{run}/config.yaml",
    params:
        cmd=lambda w: fusedqk(backend_of(w)),
        backend=backend_of,
        engine=lambda w: plan.env_flags(settings(backend_of(w))),
        config_json=lambda w: json.dumps(config),
    log:
        "{run}/logs/environment.log",
    shell:
        "{params.cmd} record-config --config {params.config_json:q} --out {output.config:q}"
        " && {params.cmd} env --backend {params.backend:q} {params.engine} --json > {output.env:q} 2> {log:q}"
        " || (cat {log:q} >&2; exit 1)"


rule bench:
    conda:
        "../envs/fusedqk.yaml"
    input:
        env="{run}/environment.json",
    output:
        status="{run}/{model}/status-bench.json",
    params:
        cmd=job_fusedqk,
        flags=job_flags("bench"),
    resources:
        **measuring_resources("bench", runtime=60),
    log:
        "{run}/logs/{model}-bench.log",
    shell:
        "{params.cmd} bench -m {wildcards.model:q} {params.flags}"
        " --out-dir {wildcards.run:q}/{wildcards.model:q}/bench"
        " --status {output.status:q} > {log:q} 2>&1"


rule identity:
    conda:
        "../envs/fusedqk.yaml"
    input:
        env="{run}/environment.json",
    output:
        status="{run}/{model}/status-identity.json",
    params:
        cmd=job_fusedqk,
        flags=job_flags("identity"),
    # First: each model's first job builds its checkpoint and compiles its kernels, and the
    # checks do that for all models at once.
    priority: 1
    resources:
        **measuring_resources("identity", runtime=60, slot="checks"),
    log:
        "{run}/logs/{model}-identity.log",
    shell:
        "{params.cmd} identity -m {wildcards.model:q} {params.flags}"
        " --out-dir {wildcards.run:q}/{wildcards.model:q} --status {output.status:q} > {log:q} 2>&1"


rule blockbench:
    conda:
        "../envs/fusedqk.yaml"
    input:
        env="{run}/environment.json",
    output:
        status="{run}/{model}/status-blockbench.json",
    params:
        cmd=job_fusedqk,
        flags=job_flags("blockbench"),
    resources:
        **measuring_resources("blockbench", runtime=30),
    log:
        "{run}/logs/{model}-blockbench.log",
    shell:
        "{params.cmd} blockbench -m {wildcards.model:q} {params.flags}"
        " --out-dir {wildcards.run:q}/{wildcards.model:q}/blockbench"
        " --status {output.status:q} > {log:q} 2>&1"
