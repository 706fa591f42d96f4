# Cluster first step: one GPU job that proves the GPU partition, driver and CUDA work before the grid
# is submitted (`snakemake --profile profiles/slurm gpu_smoke`). Not part of `all`.


rule gpu_smoke:
    output:
        "results/cluster/gpu-smoke.json",
    threads: 1
    resources:
        gpu=1,
        slurm_partition=partition_for(1),
        runtime=10,
        mem_mb=4000,
    log:
        "logs/gpu_smoke.log",
    benchmark:
        "results/benchmarks/gpu_smoke.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "(nvidia-smi -L || echo 'nvidia-smi failed or is missing') > {log} 2>&1; "
        "python -m pipeline gpu-smoke --out {output} >> {log} 2>&1; cat {output} >> {log}"
