# Stage 1: training subsets (uniform N, localized repetition) as Parquet.


rule subset:
    input:
        lambda wc: dataset_inputs(pconfig.dataset_of_subset(CFG, wc.subset)),
    output:
        "results/subsets/{subset}.parquet",
    params:
        dataset=lambda wc: as_json(dataset_spec(pconfig.dataset_of_subset(CFG, wc.subset))),
        spec=lambda wc: as_json({k: v for k, v in CFG["subsets"][wc.subset].items() if k != "dataset"}),
    log:
        "logs/subset/{subset}.log",
    benchmark:
        "results/benchmarks/subset/{subset}.tsv"
    conda:
        "../envs/data.yaml"
    shell:
        "python -m pipeline subset --dataset {params.dataset:q} --spec {params.spec:q} --out {output} > {log} 2>&1"
