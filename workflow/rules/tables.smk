# Stage 6b: the study's tables (one row per configured model and sampler) and figures (the neighbour
# galleries are drawn by the search rule).


rule table:
    input:
        metrics=lambda wc: [f"results/metrics/{m}/{s}.json" for m, s in pconfig.table_metrics(TABLE_ROWS[wc.table])],
        published=lambda wc: [PUBLISHED_FILE] if "paper" in CFG["tables"][wc.table] else [],
    output:
        csv="results/tables/{table}.csv",
        md="results/tables/{table}.md",
        html=report("results/tables/{table}.html", caption="../report/table.rst", category="Tables",
                    labels={"table": "{table}"}),
    params:
        title=lambda wc: CFG["tables"][wc.table].get("title", wc.table),
        rows=lambda wc: as_json(TABLE_ROWS[wc.table]),
        paper=lambda wc, input: (f"--published {input.published[0]} --paper {CFG['tables'][wc.table]['paper']}"
                                 if input.published else ""),
    log:
        "logs/table/{table}.log",
    benchmark:
        "results/benchmarks/table/{table}.tsv"
    conda:
        "../envs/report.yaml"
    shell:
        "python -m pipeline table --title {params.title:q} --rows {params.rows:q} --metrics {input.metrics} {params.paper} "
        "--csv {output.csv} --md {output.md} --html {output.html} > {log} 2>&1"


rule curve_figure:
    input:
        "results/tables/{curve}.csv",
    output:
        report("results/figures/{curve}.png", caption="../report/curve.rst", category="Figures",
               labels={"figure": "{curve}"}),
    params:
        kind=lambda wc: CFG["tables"][wc.curve]["figure"],
    log:
        "logs/curve_figure/{curve}.log",
    benchmark:
        "results/benchmarks/curve_figure/{curve}.tsv"
    conda:
        "../envs/report.yaml"
    shell:
        "python -m pipeline curve --kind {params.kind} --table {input} --out {output} > {log} 2>&1"


# Sample grids side by side (the study's Figs. 4 and 5): the first samples of each configured panel.
rule sample_figure:
    wildcard_constraints:
        figure=_names(SAMPLE_FIGURES),
    input:
        lambda wc: [f"results/samples/{p['model']}/{p['sampler']}/manifest.json" for p in SAMPLE_FIGURES[wc.figure]["panels"]],
    output:
        report("results/figures/{figure}.png", caption="../report/curve.rst", category="Figures",
               labels={"figure": "{figure}"}),
    params:
        labels=lambda wc: " ".join(shlex.quote(p.get("label", f"{p['model']} {p['sampler']}"))
                                   for p in SAMPLE_FIGURES[wc.figure]["panels"]),
        per_panel=lambda wc: SAMPLE_FIGURES[wc.figure].get("count", 16),
    log:
        "logs/sample_figure/{figure}.log",
    benchmark:
        "results/benchmarks/sample_figure/{figure}.tsv"
    conda:
        "../envs/report.yaml"
    shell:
        "python -m pipeline sample-figure --manifests {input} --labels {params.labels} --count {params.per_panel} "
        "--out {output} > {log} 2>&1"
