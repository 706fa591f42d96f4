# Stage 4: samples into fixed-size Parquet shards, one job per shard (seeds depend only on
# (seed, sample index), so the shards are the same however many jobs write them). A set of one shard
# (a one-step sampler's 50,000 samples) is one job that also writes the manifest.


rule sample_shard:
    wildcard_constraints:
        model=_names(MODELS),
        sampler=_names(SHARDED_SAMPLERS),
    input:
        weights=lambda wc: model_files(wc.model)["weights"],
        config=lambda wc: model_files(wc.model)["config"],
        backbone=model_backbone_files,
        teacher=refine_teacher_files,
    output:
        shard="results/samples/{model}/{sampler}/shard-{shard}.parquet",
    params:
        model_dir=lambda wc: pconfig.model_dir(CFG, wc.model, MODELS),
        sampler=lambda wc: as_json(pconfig.sampler_spec(CFG, wc.sampler)),
        teacher=lambda wc, input: f"--teacher {os.path.dirname(input.teacher[0])}" if input.teacher else "",
        shard=lambda wc: int(wc.shard),
        shard_size=lambda wc: pconfig.shard_size(CFG, wc.sampler),
        num_samples=SAMPLING["num_samples"],
        batch_size=SAMPLING.get("batch_size", 256),
        seed=lambda wc: pconfig.sampling_seed(CFG, wc.model),
        manifest="",
    threads: SAMPLING_CPUS
    resources:
        gpu=gpu_resources(SAMPLING)["gpu"],
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
        on_sampling_gpus(
            "OMP_NUM_THREADS={threads} python -m pipeline sample --model {params.model_dir} --model-id {wildcards.model} "
            "--sampler-name {wildcards.sampler} --sampler {params.sampler:q} --shard {params.shard} "
            "--shard-size {params.shard_size} --num-samples {params.num_samples} --seed {params.seed} "
            "--batch-size {params.batch_size} {params.teacher} --out {output.shard} {params.manifest} > {log} 2>&1"
        )


use rule sample_shard as sample_set with:
    wildcard_constraints:
        model=_names(MODELS),
        sampler=_names(ONE_SHARD_SAMPLERS),
    output:
        shard="results/samples/{model}/{sampler}/shard-00000.parquet",
        manifest="results/samples/{model}/{sampler}/manifest.json",
    params:
        shard=0,
        manifest=lambda wc, output: f"--manifest {output.manifest}",
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
