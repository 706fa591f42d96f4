# Yardsticks: non-generated sample sets beside every model in a table (real held-out images, the
# training set replayed, held-out images blurred), written in the layout of generated samples so
# that search, metrics and tables treat them like any model. `ysubset` is a subset or one of its
# replicates (`digits-48.r1`: the training replay drawn afresh, see yardsticks.REPLICATED).


rule yardstick:
    input:
        subset=lambda wc: subset_file(yardstick_subset(wc)),
        siblings=lambda wc: dataset_subset_files(CFG["subsets"][yardstick_subset(wc)]["dataset"]),
        raw=lambda wc: dataset_inputs(pconfig.dataset_of_subset(CFG, yardstick_subset(wc))),
    output:
        shards=[f"results/samples/{{kind}}~{{ysubset}}/{YARDSTICK_SAMPLER}/shard-{k:05d}.parquet"
                for k in range(num_shards(YARDSTICKS["num_samples"], SAMPLING["shard_size"]))],
        manifest=f"results/samples/{{kind}}~{{ysubset}}/{YARDSTICK_SAMPLER}/manifest.json",
    params:
        dataset=lambda wc: as_json(dataset_spec(pconfig.dataset_of_subset(CFG, yardstick_subset(wc)))),
        replicate=lambda wc: replicates.split(wc.ysubset)[1],
        num_samples=YARDSTICKS["num_samples"],
        reserve=YARDSTICKS["reserve"],
        shard_size=SAMPLING["shard_size"],
        blur_sigma=YARDSTICKS["blur_sigma"],
        seed=CFG["seed"],
        out_dir=lambda wc, output: os.path.dirname(output.manifest),
    log:
        "logs/yardstick/{kind}~{ysubset}.log",
    benchmark:
        "results/benchmarks/yardstick/{kind}~{ysubset}.tsv"
    conda:
        "../envs/data.yaml"
    shell:
        "python -m pipeline yardstick --kind {wildcards.kind} --dataset {params.dataset:q} --subset {input.subset} "
        "--subset-name {wildcards.ysubset} --replicate {params.replicate} --exclude {input.siblings} --reserve {params.reserve} "
        "--num-samples {params.num_samples} --shard-size {params.shard_size} --blur-sigma {params.blur_sigma} "
        "--seed {params.seed} --out-dir {params.out_dir} > {log} 2>&1"
