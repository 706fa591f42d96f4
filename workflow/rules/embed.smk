# Stage 5a: descriptor embeddings, cached once per sample set (and per training subset) with a
# manifest: SSCD copy-detection descriptors (when `memorization.sscd` is configured; weights from
# fetch_sscd), which the search rule searches for each sample's most similar training image; CLIP image and prompt
# embeddings (when `quality.clip` is configured; model from fetch_clip) for the CLIP score.


wildcard_constraints:
    espace=_names(EMBED_SPACES),


rule embed_samples:
    input:
        manifest="results/samples/{model}/{sampler}/manifest.json",
        weights=lambda wc: embedding_weights(wc.espace),
    output:
        vectors="results/embeddings/{espace}/{model}/{sampler}.npy",
        manifest="results/embeddings/{espace}/{model}/{sampler}.json",
    params:
        options=lambda wc: embedding_options(wc.espace),
    threads: SAMPLING_CPUS
    resources:
        gpu=gpu_resources(SAMPLING)["gpu"],
        slurm_partition=partition_for(gpu_resources(SAMPLING)["gpu"]),
        runtime=120,
        mem_mb=lambda wc: pconfig.stage_mem_mb(CFG, wc.model, "embed", SAMPLING["num_samples"]),
    log:
        "logs/embed_samples/{espace}/{model}/{sampler}.log",
    benchmark:
        "results/benchmarks/embed_samples/{espace}/{model}/{sampler}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        on_sampling_gpus(
            "OMP_NUM_THREADS={threads} python -m pipeline embed --space {wildcards.espace} --images {input.manifest} "
            "{params.options} --out {output.vectors} > {log} 2>&1"
        )


rule embed_subset:
    input:
        subset=lambda wc: subset_file(wc.subset),
        weights=lambda wc: embedding_weights(SIM),
    output:
        vectors=f"results/embeddings/{SIM}/subsets/{{subset}}.npy",
        manifest=f"results/embeddings/{SIM}/subsets/{{subset}}.json",
    params:
        options=embedding_options(SIM),
    threads: SAMPLING_CPUS
    resources:
        gpu=gpu_resources(SAMPLING)["gpu"],
        slurm_partition=partition_for(gpu_resources(SAMPLING)["gpu"]),
        runtime=120,
        mem_mb=lambda wc: pconfig.stage_mem_mb(CFG, f"subset:{wc.subset}", "embed", 0),
    log:
        f"logs/embed_subset/{SIM}/{{subset}}.log",
    benchmark:
        f"results/benchmarks/embed_subset/{SIM}/{{subset}}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        on_sampling_gpus(
            f"OMP_NUM_THREADS={{threads}} python -m pipeline embed --space {SIM} --images {{input.subset}} "
            "{params.options} --out {output.vectors} > {log} 2>&1"
        )

