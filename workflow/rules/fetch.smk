# External datasets and weights, fetched on the login node (localrules) with checksums.
# Jobs never download: a missing file names the rule here that provides it.
from pipeline.data.fetch import KNOWN_FILES, SD15_REPO, SD15_REVISION

CIFAR10_ARCHIVE = os.path.join("data", "raw", KNOWN_FILES["cifar10"]["dest"])
INCEPTION_FILE = KNOWN_FILES["inception"]
INCEPTION_WEIGHTS = CFG["quality"].get("weights", os.path.join("data", "weights", INCEPTION_FILE["dest"]))
SSCD_WEIGHTS = os.path.join("data", "weights", KNOWN_FILES["sscd"]["dest"])
CLIP_DIR = os.path.join("data", "weights", "clip-vit-large-patch14")
# LPIPS backbones (torchvision ImageNet checkpoints), by file name: the consistency metric's weights.
LPIPS_FILES = {KNOWN_FILES[k]["dest"]: KNOWN_FILES[k] for k in ("lpips-vgg", "lpips-alex")}


wildcard_constraints:
    backbone=_names(LPIPS_FILES),
    imagenet_raw=_names(IMAGENET_RAW),
    imagenet_dir=_names(IMAGENET_PREPARED),
    sd_dir=_names(PRETRAINED_DIRS),
    coco_captions=_names(COCO_CAPTIONS),
    coco_images=_names(COCO_IMAGES),


localrules:
    fetch_cifar10,
    fetch_inception,
    fetch_lpips_backbone,
    fetch_sscd,
    fetch_clip,
    fetch_sd15,
    fetch_coco_captions,
    fetch_coco_images,
    imagenet_source,


rule fetch_cifar10:
    output:
        CIFAR10_ARCHIVE,
    params:
        url=KNOWN_FILES["cifar10"]["url"],
        md5=KNOWN_FILES["cifar10"]["md5"],
    log:
        "logs/fetch/cifar10.log",
    benchmark:
        "results/benchmarks/fetch/cifar10.tsv"
    conda:
        "../envs/data.yaml"
    shell:
        "python -m pipeline fetch --url {params.url} --dest {output} --md5 {params.md5} > {log} 2>&1"


rule fetch_inception:
    output:
        INCEPTION_WEIGHTS,
    params:
        url=INCEPTION_FILE["url"],
        checksum=f"--sha256 {INCEPTION_FILE['sha256']}" if INCEPTION_FILE["sha256"] else "",
    log:
        "logs/fetch/inception.log",
    benchmark:
        "results/benchmarks/fetch/inception.tsv"
    conda:
        "../envs/data.yaml"
    shell:
        "python -m pipeline fetch --url {params.url} --dest {output} {params.checksum} > {log} 2>&1"


rule fetch_lpips_backbone:
    output:
        os.path.join("data", "weights", "{backbone}"),
    params:
        url=lambda wc: LPIPS_FILES[wc.backbone]["url"],
        prefix=lambda wc: LPIPS_FILES[wc.backbone]["sha256_prefix"],
    log:
        "logs/fetch/{backbone}.log",
    benchmark:
        "results/benchmarks/fetch/{backbone}.tsv"
    conda:
        "../envs/data.yaml"
    shell:
        "python -m pipeline fetch --url {params.url} --dest {output} --sha256-prefix {params.prefix} > {log} 2>&1"


rule fetch_sscd:
    output:
        SSCD_WEIGHTS,
    params:
        url=KNOWN_FILES["sscd"]["url"],
    log:
        "logs/fetch/sscd.log",
    benchmark:
        "results/benchmarks/fetch/sscd.tsv"
    conda:
        "../envs/data.yaml"
    shell:
        "python -m pipeline fetch --url {params.url} --dest {output} > {log} 2>&1"


rule fetch_clip:
    output:
        os.path.join(CLIP_DIR, "checksums.json"),
    params:
        dest=lambda wc, output: os.path.dirname(output[0]),
    log:
        "logs/fetch/clip.log",
    benchmark:
        "results/benchmarks/fetch/clip.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m pipeline fetch-clip --dest {params.dest} > {log} 2>&1"


# COCO 2017 (text-to-image extra pairs): a split's captions file and its image folder, each from its
# md5-checked archive in data/raw/coco/zips (archives copied there by hand are checked, not fetched).
rule fetch_coco_captions:
    output:
        "{coco_captions}",
    log:
        "logs/fetch/coco_captions/{coco_captions}.log",
    benchmark:
        "results/benchmarks/fetch/coco_captions/{coco_captions}.tsv"
    conda:
        "../envs/data.yaml"
    shell:
        "python -m pipeline fetch-coco --captions-file {output} --zips-dir data/raw/coco/zips > {log} 2>&1"


rule fetch_coco_images:
    output:
        directory("{coco_images}"),
    params:
        captions=lambda wc: COCO_IMAGES[wc.coco_images],
    log:
        "logs/fetch/coco_images/{coco_images}.log",
    benchmark:
        "results/benchmarks/fetch/coco_images/{coco_images}.tsv"
    conda:
        "../envs/data.yaml"
    shell:
        "python -m pipeline fetch-coco --captions-file {params.captions} --images-dir {output} "
        "--zips-dir data/raw/coco/zips > {log} 2>&1"


# Stable Diffusion v1.5 (text-to-image teachers) at the configured repository and revision; copied
# by hand onto an offline cluster, the same rule only checks and records what is there.
rule fetch_sd15:
    output:
        "{sd_dir}/checksums.json",
    params:
        dest=lambda wc, output: os.path.dirname(output[0]),
        repo=lambda wc: BACKBONES[PRETRAINED_DIRS[wc.sd_dir]].get("repo", SD15_REPO),
        revision=lambda wc: BACKBONES[PRETRAINED_DIRS[wc.sd_dir]].get("revision", SD15_REVISION),
    log:
        "logs/fetch/sd15/{sd_dir}.log",
    benchmark:
        "results/benchmarks/fetch/sd15/{sd_dir}.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m pipeline fetch-sd15 --dest {params.dest} --repo {params.repo} --revision {params.revision} > {log} 2>&1"


rule imagenet_source:
    output:
        "{imagenet_raw}",
    log:
        "logs/fetch/imagenet_source/{imagenet_raw}.log",
    benchmark:
        "results/benchmarks/fetch/imagenet_source/{imagenet_raw}.tsv"
    conda:
        "../envs/data.yaml"
    shell:
        "python -m pipeline imagenet-source --expect {output} > {log} 2>&1"


rule prepare_imagenet64:
    input:
        lambda wc: imagenet_raw(imagenet_entry(wc)),
    output:
        manifest="{imagenet_dir}/manifest.json",
        images="{imagenet_dir}/images.npy",
        labels="{imagenet_dir}/labels.npy",
    params:
        source=lambda wc, input: f"--{'train-dir' if 'train_dir' in imagenet_entry(wc) else 'archive'} {input[0]}",
        resolution=lambda wc: imagenet_entry(wc).get("resolution", 64),
        out=lambda wc, output: os.path.dirname(output.manifest),
    threads: 16
    resources:
        runtime=12 * 60,
        mem_mb=32000,
    log:
        "logs/prepare_imagenet64/{imagenet_dir}.log",
    benchmark:
        "results/benchmarks/prepare_imagenet64/{imagenet_dir}.tsv"
    conda:
        "../envs/data.yaml"
    shell:
        "python -m pipeline prepare-imagenet {params.source} --out {params.out} --resolution {params.resolution} "
        "--workers {threads} > {log} 2>&1"
