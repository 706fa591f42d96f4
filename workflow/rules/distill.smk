# Stage 3: distillation of an EDM teacher into a student (consistency distillation, progressive
# distillation, DMD); LCM distils text-to-image teachers below. Snapshots go to snapshots/


rule distill:
    wildcard_constraints:
        student=_names(EDM_STUDENTS),
    input:
        subset=lambda wc: subset_file(pconfig.subset_of(CFG, wc.student)),
        teacher=lambda wc: model_files(student_teacher(wc))["weights"],
        teacher_config=lambda wc: model_files(student_teacher(wc))["config"],
        metric_weights=distill_extra_inputs,
    output:
        weights="results/students/{student}/model.safetensors",
        config="results/students/{student}/config.json",
        stats="results/students/{student}/stats.json",
        snapshots=directory("results/students/{student}/snapshots"),
    params:
        launch=lambda wc: accelerate_launch(STUDENTS[wc.student]),
        method=lambda wc: STUDENTS[wc.student]["method"],
        spec=lambda wc: as_json(distill_spec(STUDENTS[wc.student])),
        teacher_dir=lambda wc: pconfig.model_dir(CFG, student_teacher(wc), MODELS),
        out=output_dir,
        gpus=lambda wc: gpus_required(STUDENTS[wc.student]),
        ckpt=lambda wc: f"checkpoints/students/{wc.student}",
    threads: lambda wc: cpus_per_task(STUDENTS[wc.student])
    priority: STUDENT_PRIORITY
    resources:
        gpu=lambda wc: gpu_resources(STUDENTS[wc.student])["gpu"],
        slurm_partition=lambda wc: partition_for(gpu_resources(STUDENTS[wc.student])["gpu"]),
        runtime=lambda wc, attempt: gpu_resources(STUDENTS[wc.student], attempt=attempt)["runtime"],
        mem_mb=lambda wc, attempt: gpu_resources(STUDENTS[wc.student], attempt=attempt)["mem_mb"],
        cpus_per_task=lambda wc: gpu_resources(STUDENTS[wc.student])["cpus_per_task"],
    log:
        main="logs/distill/{student}.log",
        metrics="logs/distill/{student}.jsonl",
    benchmark:
        "results/benchmarks/distill/{student}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        preemptible_shell(
            "MEMDISTILL_GPUS={params.gpus} OMP_NUM_THREADS={threads} {params.launch} distill --method {params.method} "
            "--subset {input.subset} --teacher {params.teacher_dir} --spec {params.spec:q} --out {params.out} "
            "--checkpoint-dir {params.ckpt} --metrics-log {log.metrics}"
        )


# Latent consistency distillation of a fine-tuned text-to-image teacher, on its own cached latents.
rule distill_lcm:
    wildcard_constraints:
        student=_names(LCM_STUDENTS),
    input:
        subset=lambda wc: subset_file(pconfig.subset_of(CFG, wc.student)),
        latents=lambda wc: text_teacher_latents(student_teacher(wc)),
        teacher=lambda wc: model_files(student_teacher(wc))["weights"],
        teacher_config=lambda wc: model_files(student_teacher(wc))["config"],
        backbone=lambda wc: backbone_file(pconfig.backbone_of(CFG, wc.student)),
    output:
        weights="results/students/{student}/model.safetensors",
        config="results/students/{student}/config.json",
        stats="results/students/{student}/stats.json",
        snapshots=directory("results/students/{student}/snapshots"),
    params:
        launch=lambda wc: accelerate_launch(STUDENTS[wc.student]),
        spec=lambda wc: as_json({k: v for k, v in STUDENTS[wc.student].items()
                                 if k in ("train", "lcm", "snapshots", "gradient_checkpointing")}),
        teacher_dir=lambda wc: pconfig.model_dir(CFG, student_teacher(wc), MODELS),
        out=output_dir,
        gpus=lambda wc: gpus_required(STUDENTS[wc.student]),
        ckpt=lambda wc: f"checkpoints/students/{wc.student}",
    threads: lambda wc: cpus_per_task(STUDENTS[wc.student])
    priority: STUDENT_PRIORITY
    resources:
        gpu=lambda wc: gpu_resources(STUDENTS[wc.student])["gpu"],
        slurm_partition=lambda wc: partition_for(gpu_resources(STUDENTS[wc.student])["gpu"]),
        runtime=lambda wc, attempt: gpu_resources(STUDENTS[wc.student], attempt=attempt)["runtime"],
        mem_mb=lambda wc, attempt: gpu_resources(STUDENTS[wc.student], attempt=attempt)["mem_mb"],
        cpus_per_task=lambda wc: gpu_resources(STUDENTS[wc.student])["cpus_per_task"],
    log:
        main="logs/distill/{student}.log",
        metrics="logs/distill/{student}.jsonl",
    benchmark:
        "results/benchmarks/distill/{student}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        preemptible_shell(
            "MEMDISTILL_GPUS={params.gpus} OMP_NUM_THREADS={threads} {params.launch} distill --method lcm "
            "--subset {input.subset} --latents {input.latents} --teacher {params.teacher_dir} --spec {params.spec:q} "
            "--out {params.out} --checkpoint-dir {params.ckpt} --metrics-log {log.metrics}"
        )
