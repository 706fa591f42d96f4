# The neighbouring study "On the Edge of Memorization in Diffusion Models" as a CPU branch of the DAG
# (src/pipeline/theory/edge.py): for each configured case and seed a laboratory of mixture denoisers of
# every size (brute-force losses, crossover formulas, models trained by gradient descent and the share
# of their samples that copy), then one figure and table from all of them.

EDGE = CFG.get("edge") or {}
EDGE_FILES = ["results/edge/crossover.png", "results/edge/crossover.md"] if EDGE else []


rule edge_lab:
    wildcard_constraints:
        case=_names(EDGE.get("cases", {})),
        seed=r"\d+",
    output:
        "results/edge/lab/{case}/seed-{seed}.npz",
    params:
        case=lambda wc: as_json(EDGE["cases"][wc.case]),
        spec=as_json({k: v for k, v in EDGE.items() if k != "cases"}),
    threads: 1
    log:
        "logs/edge_lab/{case}/seed-{seed}.log",
    benchmark:
        "results/benchmarks/edge_lab/{case}/seed-{seed}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m pipeline edge-lab --case {params.case:q} --spec {params.spec:q} "
        "--seed {wildcards.seed} --out {output} > {log} 2>&1"


rule edge_report:
    input:
        [f"results/edge/lab/{case}/seed-{seed}.npz" for case in EDGE.get("cases", {}) for seed in EDGE["seeds"]],
    output:
        png="results/edge/crossover.png",
        md="results/edge/crossover.md",
    log:
        "logs/edge_report/report.log",
    benchmark:
        "results/benchmarks/edge_report/report.tsv"
    conda:
        "../envs/report.yaml"
    shell:
        "python -m pipeline edge-report --labs {input} --out-png {output.png} --out-md {output.md} > {log} 2>&1"
