# Per-backend images. The base image is a build argument, so a site without a public registry
# can name a local one; extra engine arguments come from the configuration, never from here.


rule image:
    conda:
        "../envs/fusedqk.yaml"
    input:
        dockerfile=lambda w: f"containers/{backend_of(w)}/Dockerfile",
    output:
        stamp="{run}/image.json",
    params:
        engine=shlex.quote(ENGINE),
        tag=lambda w: image_tag(backend_of(w)),
        base=lambda w: config["container"]["base_images"].get(backend_of(w), ""),
        extra=lambda w: shlex.join(config["container"]["build_args"]),
        commit=GIT_COMMIT,
        secret=lambda w: (shlex.join(["--secret", f"id=ca,src={config['container']['ca_bundle']}"])
                          if config["container"]["ca_bundle"] else ""),
    log:
        "{run}/logs/image.log",
    shell:
        "{params.engine} build {params.extra} {params.secret} --build-arg BASE={params.base:q}"
        " --build-arg FUSEDQK_GIT_COMMIT={params.commit:q} -t {params.tag:q} -f {input.dockerfile:q} ."
        " > {log:q} 2>&1"
        " && {params.engine} image inspect --format"
        " '{{{{json .}}}}' {params.tag:q} > {output.stamp:q}.tmp && mv {output.stamp:q}.tmp {output.stamp:q}"
