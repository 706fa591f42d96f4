# Stage 4: samples into fixed-size Parquet shards, one job per shard (seeds depend only on
# (seed, sample index), so the shards are the same however many jobs write them). A set of one shard
# (a one-step sampler's 50,000 samples) is one job that also writes the manifest.


rule sample_shard:
    wildcard_constraints:
        model=_names(MODELS),
        sampler=_names(SHARDED_SAMPLERS),
    input:
        unpack(sample_inputs),
    output:
        shard="results/samples/{model}/{sampler}/shard-{shard}.parquet",
    params:
        arguments=sample_arguments,
    threads: SAMPLING_CPUS
    resources:
        gpu=gpu_resources(SAMPLING)["gpu"],
        slurm_partition=partition_for(gpu_resources(SAMPLING)["gpu"]),
        runtime=gpu_resources(SAMPLING, runtime=120)["runtime"],
        mem_mb=gpu_resources(SAMPLING)["mem_mb"],
        cpus_per_task=SAMPLING_CPUS,
    log:
        "logs/sample_shard/{model}/{sampler}/shard-{shard}.log",
    benchmark:
        "results/benchmarks/sample_shard/{model}/{sampler}/shard-{shard}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        on_sampling_gpus("OMP_NUM_THREADS={threads} python -m pipeline sample {params.arguments} --out {output.shard} > {log} 2>&1")


use rule sample_shard as sample_set with:
    wildcard_constraints:
        model=_names(MODELS),
        sampler=_names(ONE_SHARD_SAMPLERS),
    output:
        shard="results/samples/{model}/{sampler}/shard-00000.parquet",
        manifest="results/samples/{model}/{sampler}/manifest.json",
    log:
        "logs/sample_set/{model}/{sampler}.log",
    benchmark:
        "results/benchmarks/sample_set/{model}/{sampler}.tsv"


rule sample_manifest:
    wildcard_constraints:
        model=_names(MODELS),
        sampler=_names(SHARDED_SAMPLERS),
    input:
        lambda wc: shard_files(wc.model, wc.sampler),
    output:
        "results/samples/{model}/{sampler}/manifest.json",
    params:
        shard_size=lambda wc: pconfig.shard_size(CFG, wc.sampler),
        num_samples=SAMPLING["num_samples"],
    log:
        "logs/sample_manifest/{model}/{sampler}.log",
    benchmark:
        "results/benchmarks/sample_manifest/{model}/{sampler}.tsv"
    conda:
        "../envs/report.yaml"
    shell:
        "python -m pipeline manifest --shards {input} --shard-size {params.shard_size} "
        "--num-samples {params.num_samples} --out {output} > {log} 2>&1"
