# memdistill: does distilling a diffusion model change how much of its training data it memorizes?
#
# Stages (one rule file each, data flowing one way through files):
#   fetch -> subset -> train_teacher -> distill -> sample -> search -> metrics -> tables
#   theory_analysis -> theory_report (Section 5's random-feature model, CPU only, beside the rest);
#   train_teacher + search -> theory_bridge (the same analysis on a trained teacher's features)
#   edge_lab -> edge_report (the edge-of-memorization laboratory of mixture denoisers, CPU only)
#   sample -> pairing -> pairing_report (students against their teachers from the same noise)
#   metrics + theory + edge + pairing -> claims (every claim of the studies beside our measurement, a verdict)
# With no --configfile the embedded default (scikit-learn digits, CPU, minutes) runs;
# the paper grid is --configfile config/config.yaml (no profile sets it: profiles say where jobs run).
import gc
import os

from snakemake.utils import min_version

min_version("9.0")

# Snakemake holds every job of the DAG for the whole run, and CPython's cyclic collector, by default a young
# collection every 700 allocations and a full one over every live object after 100 of those (once enough
# objects have survived), re-walks them: 320 young and 3 full collections, 0.3-0.4 s of the paper grid's
# 3.5-4.5 s dry run on CPython 3.11 (timed with gc.callbacks; BENCHMARKS.md, "Dry run"). A young collection
# every 50,000 allocations leaves 3 and no full one. Cyclic garbage is still collected, later; the jobs
# themselves run in processes of their own.
gc.set_threshold(50_000, 10, 10)


if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config", "embedded.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/subset.smk"
include: "workflow/rules/backbone.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/snapshot.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/yardsticks.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/audit.smk"
include: "workflow/rules/cluster.smk"
include: "workflow/rules/theory.smk"
include: "workflow/rules/edge.smk"
include: "workflow/rules/pairing.smk"
include: "workflow/rules/claims.smk"


rule all:
    input:
        all_targets(),
        THEORY_FILES + BRIDGE_FILES if THEORY else [],
        EDGE_FILES,
        PAIRING_FILES,
        CLAIMS_FILES,
    default_target: True
