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
        engine=ENGINE,
        tag=lambda w: image_tag(backend_of(w)),
        base=lambda w: config["container"]["base_images"].get(backend_of(w), ""),
        extra=lambda w: shlex.join(config["container"]["build_args"]),
        commit=GIT_COMMIT,
        secret=lambda w: (f"--secret id=ca,src={config['container']['ca_bundle']}"
                          if config["container"]["ca_bundle"] else ""),
    log:
        "{run}/logs/image.log",
    shell:
        "{params.engine} build {params.extra} {params.secret} --build-arg BASE={params.base:q}"
        " --build-arg FUSEDQK_GIT_COMMIT={params.commit} -t {params.tag} -f {input.dockerfile} ."
        " > {log} 2>&1"
        " && {params.engine} image inspect --format"
        " '{{{{json .}}}}' {params.tag} > {output.stamp}.tmp && mv {output.stamp}.tmp {output.stamp}"
