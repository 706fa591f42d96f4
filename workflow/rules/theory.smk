# Stage 7: the study's theory (Section 5, App. B.3), a CPU branch of the DAG: the random-feature model
# simulated once per seed, then its figures and table from those files; and the bridge to the trained
# teachers.

THEORY = CFG.get("theory")
BRIDGE = (THEORY or {}).get("bridge")
# every replicate of each configured teacher
BRIDGE_ROWS = {model: row["sampler"] for row in (BRIDGE or {}).get("rows", [])
               for model in replicates.of(row["model"], CFG["replicates"])}
THEORY_FILES = [f"results/theory/{name}" for name in ("spectra.png", "modes.png", "ridge.png", "gen-share.md",
                                                       "psi-sweep-response.png", "psi-sweep-spectra.png", "psi-sweep.md")]
BRIDGE_FILES = [f"results/theory/bridge/{model}.{ext}" for model in BRIDGE_ROWS for ext in ("md", "png")]


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


# The bridge to the experiments: the same per-mode analysis on a trained teacher's penultimate
# features, beside which of its training images its samples copy.
rule theory_bridge:
    wildcard_constraints:
        model=_names(BRIDGE_ROWS),
    input:
        weights=lambda wc: model_files(wc.model)["weights"],
        config=lambda wc: model_files(wc.model)["config"],
        subset=lambda wc: subset_file(pconfig.subset_of(CFG, wc.model)),
        neighbours=lambda wc: f"results/neighbours/{SPACE}/{wc.model}/{BRIDGE_ROWS[wc.model]}.parquet",
    output:
        md="results/theory/bridge/{model}.md",
        png="results/theory/bridge/{model}.png",
    params:
        model_dir=lambda wc, input: os.path.dirname(input.weights),
        spec=lambda wc: as_json({k: v for k, v in BRIDGE.items() if k != "rows"}),
    threads: 1
    log:
        "logs/theory_bridge/{model}.log",
    benchmark:
        "results/benchmarks/theory_bridge/{model}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m pipeline theory-bridge --model {params.model_dir} --model-id {wildcards.model} "
        "--subset {input.subset} --neighbours {input.neighbours} --spec {params.spec:q} --out-md {output.md} "
        "--out-png {output.png} > {log} 2>&1"
