# Stage 1: training subsets (uniform N, localized repetition, text-to-image memorization sets) as Parquet.


rule subset:
    input:
        subset_inputs,
        disjoint_from=lambda wc: [f"results/subsets/{s}.parquet" for s in CFG["subsets"][wc.subset].get("disjoint_from", [])],
    output:
        "results/subsets/{subset}.parquet",
    params:
        dataset=lambda wc: as_json(dataset_spec(pconfig.dataset_of_subset(CFG, wc.subset))),
        extra=extra_dataset_args,
        spec=lambda wc: as_json({k: v for k, v in CFG["subsets"][wc.subset].items()
                                 if k not in ("dataset", "extra_dataset")}),
    log:
        "logs/subset/{subset}.log",
    benchmark:
        "results/benchmarks/subset/{subset}.tsv"
    conda:
        "../envs/data.yaml"
    shell:
        "python -m pipeline subset --dataset {params.dataset:q} {params.extra} --spec {params.spec:q} "
        "--disjoint-from {input.disjoint_from} --out {output} > {log} 2>&1"
