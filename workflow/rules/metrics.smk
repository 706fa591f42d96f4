# Stage 6a: quality (Frechet distance to a reference set) and memorization per (model, sampler).

# what the quality metric embeds with: the digits classifier, or clean-fid's Inception weights (fetch.smk)
FEATURE_NET = f"{DIGITS_CLASSIFIER}/model.safetensors" if QUALITY["kind"] == "digits_fd" else INCEPTION_WEIGHTS


rule train_feature_net:
    input:
        subsets=dataset_subset_files(QUALITY["reference"]),
    output:
        weights=f"{DIGITS_CLASSIFIER}/model.safetensors",
        config=f"{DIGITS_CLASSIFIER}/config.json",
    params:
        dataset=as_json(dataset_spec(REFERENCE)),
        epochs=QUALITY.get("classifier_epochs", 30),
        out=lambda wc, output: os.path.dirname(output.weights),
        reserve=YARDSTICKS["reserve"],
        seed=CFG["seed"],
    threads: 1
    log:
        "logs/train_feature_net/digits-classifier.log",
    benchmark:
        "results/benchmarks/train_feature_net/digits-classifier.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m pipeline feature-net --dataset {params.dataset:q} --epochs {params.epochs} "
        "--exclude {input.subsets} --reserve {params.reserve} --seed {params.seed} --out {params.out} > {log} 2>&1"


rule reference_stats:
    input:
        feature_net=FEATURE_NET,
        raw=lambda wc: dataset_inputs(CFG["datasets"][wc.refdata]),
    output:
        reference_file("{refdata}"),
    params:
        kind=QUALITY["kind"],
        feature_net=feature_net_arg,
        dataset=lambda wc: as_json(dataset_spec(CFG["datasets"][wc.refdata])),
    threads: SAMPLING_CPUS
    resources:
        gpu=gpu_resources(SAMPLING)["gpu"],
        slurm_partition=partition_for(gpu_resources(SAMPLING)["gpu"]),
        runtime=120,
    log:
        f"logs/reference_stats/{QUALITY['kind']}-{{refdata}}.log",
    benchmark:
        f"results/benchmarks/reference_stats/{QUALITY['kind']}-{{refdata}}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        on_sampling_gpus(
            "OMP_NUM_THREADS={threads} python -m pipeline reference-stats --kind {params.kind} --feature-net {params.feature_net} "
            "--dataset {params.dataset:q} --out {output} > {log} 2>&1"
        )


rule subset_reference_stats:
    input:
        feature_net=FEATURE_NET,
        subset=lambda wc: subset_file(wc.subset),
    output:
        subset_reference_file("{subset}"),
    params:
        kind=QUALITY["kind"],
        feature_net=feature_net_arg,
    threads: SAMPLING_CPUS
    resources:
        gpu=gpu_resources(SAMPLING)["gpu"],
        slurm_partition=partition_for(gpu_resources(SAMPLING)["gpu"]),
        runtime=60,
    log:
        f"logs/subset_reference_stats/{QUALITY['kind']}-{{subset}}.log",
    benchmark:
        f"results/benchmarks/subset_reference_stats/{QUALITY['kind']}-{{subset}}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        on_sampling_gpus(
            "OMP_NUM_THREADS={threads} python -m pipeline reference-stats --kind {params.kind} --feature-net {params.feature_net} "
            "--subset {input.subset} --out {output} > {log} 2>&1"
        )


rule metrics:
    input:
        unpack(metrics_inputs),
    output:
        "results/metrics/{model}/{sampler}.json",
    params:
        kind=QUALITY["kind"],
        feature_net=feature_net_arg,
        options=metrics_options,
    threads: SAMPLING_CPUS
    resources:
        gpu=gpu_resources(SAMPLING)["gpu"],
        slurm_partition=partition_for(gpu_resources(SAMPLING)["gpu"]),
        runtime=60,
        mem_mb=lambda wc: pconfig.stage_mem_mb(CFG, wc.model, "metrics", SAMPLING["num_samples"]),
    log:
        "logs/metrics/{model}/{sampler}.log",
    benchmark:
        "results/benchmarks/metrics/{model}/{sampler}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        on_sampling_gpus(
            "OMP_NUM_THREADS={threads} python -m pipeline metrics --model-id {wildcards.model} --sampler-name {wildcards.sampler} "
            "--neighbours {input.neighbours} --manifest {input.manifest} --quality-kind {params.kind} "
            "--feature-net {params.feature_net} --reference-stats {input.reference} {params.options} --out {output} > {log} 2>&1"
        )
