# Stage 5: per sample set, one job: the exact FAISS nearest-neighbour search of every sample against the
# unique training images (L2 ratio criterion), the descriptor (SSCD) most-similar search when
# `memorization.sscd` is configured, and the set's gallery drawn from both. One job instead of three per
# set: the searches share the subset and the sample set, and the paper grid's DAG is 296 jobs smaller.


SEARCH_OUTPUTS = {"neighbours": f"results/neighbours/{SPACE}/{{model}}/{{sampler}}.parquet"}
SEARCH_DESCRIPTOR = ""
if SSCD is not None:
    SEARCH_OUTPUTS["sscd"] = f"results/neighbours/{SIM}/{{model}}/{{sampler}}.parquet"
    SEARCH_DESCRIPTOR = (f"--sscd-samples {{input.sscd_samples}} --sscd-train {{input.sscd_train}} --sscd-space {SIM} "
                         "--sscd-out {output.sscd} ")


rule search:
    input:
        unpack(search_inputs),
    output:
        **SEARCH_OUTPUTS,
        gallery=report("results/figures/{model}/{sampler}-neighbours.png", caption="../report/gallery.rst",
                       category="Galleries", subcategory=lambda wc: pconfig.subset_of(CFG, wc.model),
                       labels={"model": "{model}", "sampler": "{sampler}"}),
    params:
        ratio=CFG["memorization"].get("ratio", DEFAULT_RATIO),
        figure_samples=CFG["memorization"].get("figure_samples", 32),
    threads: SAMPLING_CPUS
    resources:
        gpu=gpu_resources(SAMPLING)["gpu"],
        slurm_partition=partition_for(gpu_resources(SAMPLING)["gpu"]),
        runtime=60,
        mem_mb=lambda wc: pconfig.stage_mem_mb(CFG, wc.model, "search", SAMPLING["num_samples"], SSCD is not None),
    log:
        "logs/search/{model}/{sampler}.log",
    benchmark:
        "results/benchmarks/search/{model}/{sampler}.tsv"
    conda:
        "../envs/search.yaml"
    shell:
        on_sampling_gpus(
            f"OMP_NUM_THREADS={{threads}} python -m pipeline search --subset {{input.subset}} --manifest {{input.manifest}} "
            f"--space {SPACE} --ratio {{params.ratio}} --out {{output.neighbours}} {SEARCH_DESCRIPTOR}"
            "--figure {output.gallery} --figure-count {params.figure_samples} > {log} 2>&1"
        )
