"""The claims_plan rule: the replication report's plan (made from the config when the DAG was built, in the
rule's params) written to its output. A script, not a shell command: the plan of the paper grid is too long
for one command-line argument."""
from pipeline.claims import write_plan

write_plan(snakemake.params.plan, snakemake.output[0], snakemake.log[0])  # noqa: F821 (set by Snakemake)
