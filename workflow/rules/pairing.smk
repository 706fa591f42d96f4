# The neighbouring study of copying in distilled students (../shared/reference/004_...) as a branch of the
# DAG (src/pipeline/pairing.py): each configured student's sample set against its teacher's, drawn from
# the same noise, then one table and figure of every row beside the students' and teachers' memorization.

PAIRING = CFG.get("pairing") or {}
# every replicate of each row; the reference is the student's own teacher (that replicate) unless named
PAIRING_ROWS = [
    {"label": row["label"], "series": row.get("series", row["label"]), "model": model, "sampler": row["sampler"],
     "reference": (replicates.replicate_id(row["reference"], replicates.split(model)[1]) if "reference" in row
                   else pconfig.teacher_of(CFG, model))}
    for row in PAIRING.get("rows", []) for model in replicates.of(row["model"], CFG["replicates"])
]
for _row in PAIRING_ROWS:
    _row["pairing"] = f"results/pairing/{_row['reference']}/{_row['model']}/{_row['sampler']}.json"
    _row["metrics"] = f"results/metrics/{_row['model']}/{_row['sampler']}.json"
    _row["reference_metrics"] = f"results/metrics/{_row['reference']}/{PAIRING.get('teacher_sampler')}.json"
PAIRING_FILES = ["results/pairing/pairing.md", "results/pairing/pairing.png"] if PAIRING else []


rule pairing:
    wildcard_constraints:
        reference=_names(MODELS),
        model=_names(MODELS),
        sampler=_names(CFG["samplers"]),
    input:
        student="results/samples/{model}/{sampler}/manifest.json",
        teacher=f"results/samples/{{reference}}/{PAIRING.get('teacher_sampler')}/manifest.json",
    output:
        "results/pairing/{reference}/{model}/{sampler}.json",
    params:
        max_matching=PAIRING.get("max_matching", 512),
    log:
        "logs/pairing/{reference}/{model}/{sampler}.log",
    benchmark:
        "results/benchmarks/pairing/{reference}/{model}/{sampler}.tsv"
    conda:
        "../envs/report.yaml"
    shell:
        "python -m pipeline pairing --student {input.student} --teacher {input.teacher} "
        "--max-matching {params.max_matching} --out {output} > {log} 2>&1"


rule pairing_report:
    input:
        [row[key] for row in PAIRING_ROWS for key in ("pairing", "metrics", "reference_metrics")],
    output:
        md="results/pairing/pairing.md",
        png="results/pairing/pairing.png",
    params:
        rows=as_json(PAIRING_ROWS),
        teacher_sampler=PAIRING.get("teacher_sampler"),
    log:
        "logs/pairing_report/report.log",
    benchmark:
        "results/benchmarks/pairing_report/report.tsv"
    conda:
        "../envs/report.yaml"
    shell:
        "python -m pipeline pairing-report --rows {params.rows:q} --teacher-sampler {params.teacher_sampler} "
        "--out-md {output.md} --out-png {output.png} > {log} 2>&1"
