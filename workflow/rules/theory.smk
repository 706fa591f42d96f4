# Stage 7: the study's theory (Section 5, App. B.3), a CPU branch of the DAG: the random-feature model
# simulated once per seed, then its figures and table from those files.

THEORY = CFG.get("theory")
THEORY_FILES = [f"results/theory/{name}" for name in ("spectra.png", "modes.png", "ridge.png", "gen-share.md",
                                                       "psi-sweep-response.png", "psi-sweep-spectra.png", "psi-sweep.md")]


rule theory_analysis:
    wildcard_constraints:
        seed=r"\d+",
    output:
        "results/theory/analysis/seed-{seed}.npz",
    params:
        spec=lambda wc: as_json(THEORY),
    threads: 1
    log:
        "logs/theory_analysis/seed-{seed}.log",
    benchmark:
        "results/benchmarks/theory_analysis/seed-{seed}.tsv"
    conda:
        "../envs/report.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m pipeline theory-analysis --spec {params.spec:q} --seed {wildcards.seed} "
        "--out {output} > {log} 2>&1"


rule theory_report:
    input:
        lambda wc: [f"results/theory/analysis/seed-{s}.npz" for s in THEORY["seeds"]],
    output:
        THEORY_FILES,
    params:
        tolerance=lambda wc: THEORY["leakage_tolerance"],
    log:
        "logs/theory_report/report.log",
    benchmark:
        "results/benchmarks/theory_report/report.tsv"
    conda:
        "../envs/report.yaml"
    shell:
        "python -m pipeline theory-report --analyses {input} --out-dir results/theory "
        "--tolerance {params.tolerance} > {log} 2>&1"
