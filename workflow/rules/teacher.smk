# Stage 2: EDM teachers, through `accelerate launch` (1 CPU process here, N GPUs on a cluster).
# Resumable state goes to checkpoints/, deliberately not a declared output.


rule train_teacher:
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
    threads: lambda wc: compute(CFG["teachers"][wc.teacher]).get("cpus_per_task", 2)
    resources:
        gpu=lambda wc: gpu_resources(CFG["teachers"][wc.teacher])["gpu"],
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
