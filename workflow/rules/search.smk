# Stage 5: exact FAISS nearest-neighbour search of every sample against the unique training images.


rule search:
    input:
        subset=lambda wc: subset_file(pconfig.subset_of(CFG, wc.model)),
        manifest="results/samples/{model}/{sampler}/manifest.json",
    output:
        "results/neighbours/{space}/{model}/{sampler}.parquet",
    params:
        ratio=CFG["memorization"].get("ratio", DEFAULT_RATIO),
    threads: SAMPLING_CPUS
    resources:
        gpu=gpu_resources(SAMPLING)["gpu"],
        runtime=60,
    log:
        "logs/search/{space}/{model}/{sampler}.log",
    benchmark:
        "results/benchmarks/search/{space}/{model}/{sampler}.tsv"
    conda:
        "../envs/search.yaml"
    shell:
        on_sampling_gpus(
            "OMP_NUM_THREADS={threads} python -m pipeline search --subset {input.subset} --manifest {input.manifest} "
            "--space {wildcards.space} --ratio {params.ratio} --out {output} > {log} 2>&1"
        )
