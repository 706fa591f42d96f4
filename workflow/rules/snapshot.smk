# Snapshots of a training run (the EMA weights at configured steps, Figure 1 of the study) as
# models of their own, `<teacher or student>@<step>`, which sampling, search and metrics consume
# like any other model. The training rule collects them in its snapshots/ directory; this rule
# checks one and exports it.


rule snapshot:
    input:
        lambda wc: f"{pconfig.model_dir(CFG, wc.run, MODELS)}/snapshots",
    output:
        weights="results/snapshots/{run}/step-{step}/model.safetensors",
        config="results/snapshots/{run}/step-{step}/config.json",
        stats="results/snapshots/{run}/step-{step}/stats.json",
    params:
        out=output_dir,
    log:
        "logs/snapshot/{run}/step-{step}.log",
    benchmark:
        "results/benchmarks/snapshot/{run}/step-{step}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m pipeline snapshot --run-dir {input} --step {wildcards.step} --out {params.out} > {log} 2>&1"
