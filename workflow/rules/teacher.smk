# Stage 2: EDM teachers: one CPU process here, N GPUs through `accelerate launch` on a cluster.
# Resumable state goes to checkpoints/, deliberately not a declared output.


rule train_teacher:
    wildcard_constraints:
        teacher=_names(EDM_TEACHERS),
    input:
        lambda wc: subset_file(CFG["teachers"][wc.teacher]["subset"]),
    output:
        weights="results/teachers/{teacher}/model.safetensors",
        config="results/teachers/{teacher}/config.json",
        stats="results/teachers/{teacher}/stats.json",
        snapshots=directory("results/teachers/{teacher}/snapshots"),
    params:
        launch=lambda wc: accelerate_launch(CFG["teachers"][wc.teacher]),
        net=lambda wc: as_json(CFG["nets"][CFG["teachers"][wc.teacher]["net"]]),
        spec=lambda wc: as_json({k: v for k, v in CFG["teachers"][wc.teacher].items() if k in ("edm", "train", "snapshots")}),
        out=output_dir,
        gpus=lambda wc: gpus_required(CFG["teachers"][wc.teacher]),
        ckpt=lambda wc: f"checkpoints/teachers/{wc.teacher}",
    threads: lambda wc: cpus_per_task(CFG["teachers"][wc.teacher])
    priority: TEACHER_PRIORITY
    resources:
        gpu=lambda wc: gpu_resources(CFG["teachers"][wc.teacher])["gpu"],
        slurm_partition=lambda wc: partition_for(gpu_resources(CFG["teachers"][wc.teacher])["gpu"]),
        runtime=lambda wc, attempt: gpu_resources(CFG["teachers"][wc.teacher], attempt=attempt)["runtime"],
        mem_mb=lambda wc, attempt: gpu_resources(CFG["teachers"][wc.teacher], attempt=attempt)["mem_mb"],
        cpus_per_task=lambda wc: gpu_resources(CFG["teachers"][wc.teacher])["cpus_per_task"],
    log:
        main="logs/train_teacher/{teacher}.log",
        metrics="logs/train_teacher/{teacher}.jsonl",
    benchmark:
        "results/benchmarks/train_teacher/{teacher}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        preemptible_shell(
            "MEMDISTILL_GPUS={params.gpus} OMP_NUM_THREADS={threads} {params.launch} train-teacher --subset {input} "
            "--net {params.net:q} --spec {params.spec:q} --out {params.out} --checkpoint-dir {params.ckpt} --metrics-log {log.metrics}"
        )


# Text-to-image teachers: the backbone's UNet fine-tuned on a text_memorization subset's cached latents
# (VAE and text encoder frozen), through the same launcher, checkpoints and EMA.
rule finetune_teacher:
    wildcard_constraints:
        teacher=_names(TEXT_TEACHERS),
    input:
        subset=lambda wc: subset_file(CFG["teachers"][wc.teacher]["subset"]),
        latents=lambda wc: text_teacher_latents(wc.teacher),
        backbone=lambda wc: backbone_file(CFG["teachers"][wc.teacher]["backbone"]),
    output:
        weights="results/teachers/{teacher}/model.safetensors",
        config="results/teachers/{teacher}/config.json",
        stats="results/teachers/{teacher}/stats.json",
        snapshots=directory("results/teachers/{teacher}/snapshots"),
    params:
        launch=lambda wc: accelerate_launch(CFG["teachers"][wc.teacher]),
        backbone_dir=lambda wc, input: os.path.dirname(input.backbone),
        spec=lambda wc: as_json({k: v for k, v in CFG["teachers"][wc.teacher].items()
                                 if k in ("train", "latent", "snapshots", "gradient_checkpointing")}),
        out=output_dir,
        gpus=lambda wc: gpus_required(CFG["teachers"][wc.teacher]),
        ckpt=lambda wc: f"checkpoints/teachers/{wc.teacher}",
    threads: lambda wc: cpus_per_task(CFG["teachers"][wc.teacher])
    priority: TEACHER_PRIORITY
    resources:
        gpu=lambda wc: gpu_resources(CFG["teachers"][wc.teacher])["gpu"],
        slurm_partition=lambda wc: partition_for(gpu_resources(CFG["teachers"][wc.teacher])["gpu"]),
        runtime=lambda wc, attempt: gpu_resources(CFG["teachers"][wc.teacher], attempt=attempt)["runtime"],
        mem_mb=lambda wc, attempt: gpu_resources(CFG["teachers"][wc.teacher], attempt=attempt)["mem_mb"],
        cpus_per_task=lambda wc: gpu_resources(CFG["teachers"][wc.teacher])["cpus_per_task"],
    log:
        main="logs/finetune_teacher/{teacher}.log",
        metrics="logs/finetune_teacher/{teacher}.jsonl",
    benchmark:
        "results/benchmarks/finetune_teacher/{teacher}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        preemptible_shell(
            "MEMDISTILL_GPUS={params.gpus} OMP_NUM_THREADS={threads} {params.launch} finetune-teacher "
            "--subset {input.subset} --latents {input.latents} --backbone {params.backbone_dir} --spec {params.spec:q} "
            "--out {params.out} --checkpoint-dir {params.ckpt} --metrics-log {log.metrics}"
        )


# A teacher chosen by memorization rate (App. A's 10% and 30% teachers): the model along a teacher's
# run, snapshots then its end, whose L2 Mem under the selection's sampler lies nearest the rate.
rule select_teacher:
    wildcard_constraints:
        selection=_names(SELECTIONS),
    input:
        models=lambda wc: [model_files(m)["weights"] for m in pconfig.selection_candidates(CFG, wc.selection)],
        metrics=lambda wc: [f"results/metrics/{m}/{CFG['teacher_selections'][wc.selection]['sampler']}.json"
                            for m in pconfig.selection_candidates(CFG, wc.selection)],
    output:
        weights="results/selected/{selection}/model.safetensors",
        config="results/selected/{selection}/config.json",
        stats="results/selected/{selection}/stats.json",
    params:
        candidates=lambda wc: " ".join(pconfig.selection_candidates(CFG, wc.selection)),
        model_dirs=lambda wc, input: " ".join(os.path.dirname(w) for w in input.models),
        threshold=lambda wc: CFG["teacher_selections"][wc.selection]["memorization"],
        out=output_dir,
    log:
        "logs/select_teacher/{selection}.log",
    benchmark:
        "results/benchmarks/select_teacher/{selection}.tsv"
    conda:
        "../envs/report.yaml"
    shell:
        "python -m pipeline select-teacher --candidates {params.candidates} --model-dirs {params.model_dirs} "
        "--metrics {input.metrics} --threshold {params.threshold} --out {params.out} > {log} 2>&1"
