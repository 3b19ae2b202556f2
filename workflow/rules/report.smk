# Per run: tidy tables, the decision, the report, and the manifest that seals the archive.
# These read only the run's raw files, so `fusedqk report --from RUN` re-renders them anywhere.
# Seconds of bookkeeping each: on a cluster they run on the submitting host, not as jobs.
localrules:
    all,
    aggregate,
    decide,
    report,
    manifest,



rule aggregate:
    conda:
        "../envs/fusedqk.yaml"
    input:
        lambda w: measurements(w.run),
    output:
        trials="{run}/trials.csv",
        summaries="{run}/summaries.csv",
    params:
        fusedqk=FUSEDQK_NATIVE,
    log:
        "{run}/logs/aggregate.log",
    shell:
        # --rewrite: a resumed run redoes its tables after its measurements changed, so the old
        # seal no longer holds; the manifest rule seals it again.
        "{params.fusedqk} aggregate {wildcards.run:q} --rewrite > {log:q} 2>&1"


rule decide:
    conda:
        "../envs/fusedqk.yaml"
    input:
        "{run}/summaries.csv",
    output:
        "{run}/decisions.json",
    params:
        fusedqk=FUSEDQK_NATIVE,
        d=config["decision"],
    log:
        "{run}/logs/decide.log",
    shell:
        "{params.fusedqk} decide {wildcards.run:q} --min-gain {params.d[min_gain]:q}"
        " --identity-policy {params.d[identity_policy]:q} --min-distinct {params.d[min_distinct]:q}"
        " --rewrite > {log:q} 2>&1"


rule report:
    conda:
        "../envs/fusedqk.yaml"
    input:
        "{run}/decisions.json",
        "{run}/environment.json",
        "{run}/config.yaml",
    output:
        md=report("{run}/report.md", category="Decision", caption="../report/caption.rst"),
        html=report("{run}/report.html", category="Decision", caption="../report/caption.rst"),
    params:
        fusedqk=FUSEDQK_NATIVE,
    log:
        "{run}/logs/report.log",
    shell:
        "{params.fusedqk} report --from {wildcards.run:q} --rewrite > {log:q} 2>&1"


rule manifest:
    conda:
        "../envs/fusedqk.yaml"
    input:
        "{run}/report.md",
        "{run}/report.html",
    output:
        "{run}/MANIFEST.sha256",
    params:
        fusedqk=FUSEDQK_NATIVE,
    log:
        "{run}.manifest.log",  # beside the run: a log inside would change after it is sealed
    shell:
        "{params.fusedqk} verify --write {wildcards.run:q} > {log:q} 2>&1"
