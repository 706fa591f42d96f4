# Stage 6a: quality (Frechet distance to a reference set) and memorization per (model, sampler).

QUALITY = CFG["quality"]
REFERENCE = CFG["datasets"][QUALITY["reference"]]
REFERENCE_STATS = f"results/quality/reference/{QUALITY['kind']}-{QUALITY['reference']}.npz"
DIGITS_CLASSIFIER = "results/quality/digits-classifier"


def feature_net_path():
    """What the quality metric embeds with: our digits classifier, or clean-fid's Inception weights."""
    if QUALITY["kind"] == "digits_fd":
        return DIGITS_CLASSIFIER
    return INCEPTION_WEIGHTS


def feature_net_input():
    if QUALITY["kind"] == "digits_fd":
        return f"{DIGITS_CLASSIFIER}/model.safetensors"
    return INCEPTION_WEIGHTS


rule train_feature_net:
    output:
        weights=f"{DIGITS_CLASSIFIER}/model.safetensors",
        config=f"{DIGITS_CLASSIFIER}/config.json",
    params:
        dataset=as_json(dataset_spec(REFERENCE)),
        epochs=QUALITY.get("classifier_epochs", 30),
        out=DIGITS_CLASSIFIER,
    threads: 1
    log:
        "logs/train_feature_net/digits-classifier.log",
    benchmark:
        "results/benchmarks/train_feature_net/digits-classifier.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} {PIPELINE} feature-net --dataset {params.dataset:q} --epochs {params.epochs} "
        "--out {params.out} > {log} 2>&1"


rule reference_stats:
    input:
        feature_net=feature_net_input(),
        raw=dataset_inputs(REFERENCE),
    output:
        REFERENCE_STATS,
    params:
        kind=QUALITY["kind"],
        feature_net=feature_net_path(),
        dataset=as_json(dataset_spec(REFERENCE)),
    threads: compute(SAMPLING).get("cpus_per_task", 1)
    resources:
        gpu=gpu_resources(SAMPLING)["gpu"],
        runtime=120,
    log:
        f"logs/reference_stats/{QUALITY['kind']}-{QUALITY['reference']}.log",
    benchmark:
        f"results/benchmarks/reference_stats/{QUALITY['kind']}-{QUALITY['reference']}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} {PIPELINE} reference-stats --kind {params.kind} --feature-net {params.feature_net} "
        "--dataset {params.dataset:q} --out {output} > {log} 2>&1"


rule metrics:
    input:
        neighbours=f"results/neighbours/{SPACE}/{{model}}/{{sampler}}.parquet",
        manifest="results/samples/{model}/{sampler}/manifest.json",
        feature_net=feature_net_input(),
        reference=REFERENCE_STATS,
        model_stats=lambda wc: model_files(wc.model)["stats"],
    output:
        "results/metrics/{model}/{sampler}.json",
    params:
        kind=QUALITY["kind"],
        feature_net=feature_net_path(),
    threads: compute(SAMPLING).get("cpus_per_task", 1)
    resources:
        gpu=gpu_resources(SAMPLING)["gpu"],
        runtime=60,
    log:
        "logs/metrics/{model}/{sampler}.log",
    benchmark:
        "results/benchmarks/metrics/{model}/{sampler}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} {PIPELINE} metrics --model-id {wildcards.model} --sampler-name {wildcards.sampler} "
        "--neighbours {input.neighbours} --manifest {input.manifest} --quality-kind {params.kind} "
        "--feature-net {params.feature_net} --reference-stats {input.reference} --model-stats {input.model_stats} "
        "--out {output} > {log} 2>&1"
