# Stage 8: the replication report. Every claim of config/claims.yaml beside what this run measured and
# a computed verdict (src/pipeline/claims.py), under every config: a measure applies where the active
# config has its table or lab, and a claim no output measures is NOT MEASURED, naming what would.
# The plan (which files each measure reads) is made from the config when the DAG is built; the claims
# job reads the files and computes the verdicts.
from pipeline import claims as pclaims

CLAIMS_FILE = os.path.join(workflow.basedir, CFG.get("claims", os.path.join("config", "claims.yaml")))
CLAIMS_CONFIG = " + ".join(os.path.basename(str(f)) for f in workflow.configfiles) or "embedded.yaml"
CLAIMS_PLAN = pclaims.plan(pclaims.load(CLAIMS_FILE), CFG, CLAIMS_CONFIG)
CLAIMS_FILES = ["results/claims/claims.md", "results/claims/claims.csv", "results/claims/claims.html"]


localrules:
    claims_plan,


rule claims_plan:
    input:
        CLAIMS_FILE,
    output:
        "results/claims/plan.json",
    params:
        plan=json.dumps({"config": CLAIMS_CONFIG, "claims": CLAIMS_PLAN}, sort_keys=True),
    log:
        "logs/claims/plan.log",
    benchmark:
        "results/benchmarks/claims/plan.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/claims_plan.py"


rule claims:
    input:
        plan="results/claims/plan.json",
        measured=pclaims.planned_files(CLAIMS_PLAN),
    output:
        md="results/claims/claims.md",
        csv="results/claims/claims.csv",
        html=report("results/claims/claims.html", caption="../report/claims.rst", category="Replication report"),
    log:
        "logs/claims/claims.log",
    benchmark:
        "results/benchmarks/claims/claims.tsv"
    conda:
        "../envs/report.yaml"
    shell:
        "python -m pipeline claims --plan {input.plan} --out-dir results/claims > {log} 2>&1"
