# Stage 2 (text-to-image): the latent diffusion backbone and the latents its frozen parts give each
# training pair. A miniature backbone is built here from a captioned dataset (Stable Diffusion v1.5
# comes from fetch_sd15); posteriors and prompt embeddings are cached once per (subset, backbone).


rule build_backbone:
    wildcard_constraints:
        ldm=_names(MINIATURES),
    input:
        lambda wc: dataset_inputs(CFG["datasets"][BACKBONES[wc.ldm]["dataset"]]),
    output:
        "results/backbones/{ldm}/model_index.json",
    params:
        dataset=lambda wc: as_json(dataset_spec(CFG["datasets"][BACKBONES[wc.ldm]["dataset"]])),
        spec=lambda wc: as_json({k: v for k, v in BACKBONES[wc.ldm].items() if k not in ("kind", "dataset", "compute")}),
        out=lambda wc, output: os.path.dirname(output[0]),
        work=lambda wc: f"checkpoints/backbones/{wc.ldm}",
    threads: lambda wc: cpus_per_task(BACKBONES[wc.ldm])
    priority: TEACHER_PRIORITY
    resources:
        gpu=lambda wc: gpu_resources(BACKBONES[wc.ldm])["gpu"],
        slurm_partition=lambda wc: partition_for(gpu_resources(BACKBONES[wc.ldm])["gpu"]),
        runtime=lambda wc: gpu_resources(BACKBONES[wc.ldm])["runtime"],
        mem_mb=lambda wc: gpu_resources(BACKBONES[wc.ldm])["mem_mb"],
        cpus_per_task=lambda wc: gpu_resources(BACKBONES[wc.ldm])["cpus_per_task"],
    log:
        "logs/build_backbone/{ldm}.log",
    benchmark:
        "results/benchmarks/build_backbone/{ldm}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m pipeline build-backbone --dataset {params.dataset:q} --spec {params.spec:q} "
        "--out {params.out} --work-dir {params.work} > {log} 2>&1"


rule cache_latents:
    wildcard_constraints:
        ldm=_names(BACKBONES),
    input:
        subset=subset_file("{subset}"),
        backbone=lambda wc: backbone_file(wc.ldm),
    output:
        "results/latents/{subset}/{ldm}.safetensors",
    params:
        backbone_dir=lambda wc, input: os.path.dirname(input.backbone),
    threads: SAMPLING_CPUS
    resources:
        gpu=gpu_resources(SAMPLING)["gpu"],
        slurm_partition=partition_for(gpu_resources(SAMPLING)["gpu"]),
        runtime=gpu_resources(SAMPLING)["runtime"],
        mem_mb=gpu_resources(SAMPLING)["mem_mb"],
        cpus_per_task=SAMPLING_CPUS,
    log:
        "logs/cache_latents/{subset}/{ldm}.log",
    benchmark:
        "results/benchmarks/cache_latents/{subset}/{ldm}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        on_sampling_gpus(
            "OMP_NUM_THREADS={threads} python -m pipeline cache-latents --subset {input.subset} "
            "--backbone {params.backbone_dir} --out {output} > {log} 2>&1"
        )
