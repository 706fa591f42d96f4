# The standalone audit as a rule: any configured (model, sampler) against the subset it was trained
# on, in pixel or SSCD space, e.g. `snakemake results/audit/pixels/cd-48/1-step.json`.


rule audit:
    input:
        subset=lambda wc: subset_file(pconfig.subset_of(CFG, wc.model)),
        manifest="results/samples/{model}/{sampler}/manifest.json",
        weights=lambda wc: [sscd_weights_file()] if wc.aspace == "sscd" else [],
    output:
        json="results/audit/{aspace}/{model}/{sampler}.json",
        figure="results/audit/{aspace}/{model}/{sampler}.png",
    wildcard_constraints:
        aspace="pixels|sscd",
    params:
        weights=lambda wc, input: (f"--sscd-weights {input.weights} --preprocessing {sscd_preprocessing()}"
                                   if input.weights else ""),
        ratio=CFG["memorization"].get("ratio", DEFAULT_RATIO),
    threads: SAMPLING_CPUS
    resources:
        gpu=gpu_resources(SAMPLING)["gpu"],
        slurm_partition=partition_for(gpu_resources(SAMPLING)["gpu"]),
        runtime=60,
    log:
        "logs/audit/{aspace}/{model}/{sampler}.log",
    benchmark:
        "results/benchmarks/audit/{aspace}/{model}/{sampler}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        on_sampling_gpus(
            "OMP_NUM_THREADS={threads} python -m pipeline audit --train {input.subset} --samples {input.manifest} "
            "--space {wildcards.aspace} {params.weights} --ratio {params.ratio} --out {output.json} "
            "--figure {output.figure} > {log} 2>&1"
        )
