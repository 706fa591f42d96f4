"""`python -m pipeline <stage> ...`: the thin commands the Snakemake rules call.

Each command parses plain arguments (JSON for config fragments), sets up logging, and calls one
library function; all science lives in the modules it imports.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc


def cmd_fetch(a):
    from .data import fetch
    from .io import sha256_file

    path = fetch(a.url, a.dest, md5=a.md5, sha256=a.sha256, sha256_prefix=a.sha256_prefix)
    logging.info("%s ready, sha256 %s", path, sha256_file(path))


def cmd_subset(a):
    import numpy as np

    from .data import build_subset, build_text_subset, load_captioned, load_source, read_subset, write_subset

    if a.spec.get("kind") == "text_memorization":
        memorized = load_captioned(a.dataset)
        same = a.extra_dataset is None or a.extra_dataset == a.dataset
        subset = build_text_subset(memorized, memorized if same else load_captioned(a.extra_dataset), a.spec, same)
    else:
        images, labels = load_source(a.dataset)
        exclude = np.concatenate([read_subset(p).index for p in a.disjoint_from]) if a.disjoint_from else None
        subset = build_subset(images, labels, a.spec, exclude)
    write_subset(a.out, subset, {"dataset": json.dumps(a.dataset), "spec": json.dumps(a.spec),
                                 "extra_dataset": json.dumps(a.extra_dataset)})
    logging.info("subset: %d unique images, %d with repeats, groups %s", len(subset), len(subset.expanded_indices()),
                 sorted(set(subset.group.tolist())))


def cmd_train_teacher(a):
    from .teacher import train_teacher

    train_teacher(a.subset, a.out, a.spec, a.net, a.checkpoint_dir, a.metrics_log)


def cmd_distill(a):
    if a.method == "lcm":
        from .text2image.runs import distill_lcm

        if not a.latents:
            raise ValueError("--method lcm distils on cached latents: give --latents (the cache_latents rule's file)")
        distill_lcm(a.teacher, a.subset, a.latents, a.out, a.spec, a.checkpoint_dir, a.metrics_log)
        return
    if a.method == "pd":
        from .distill.pd import distill_pd as run
    elif a.method == "dmd":
        from .distill.dmd import distill_dmd as run
    elif a.method == "cd-continuous":
        from .distill.cd_continuous import distill_cd_continuous as run
    else:
        from .distill.cd import distill_cd as run
    run(a.subset, a.teacher, a.out, a.spec, a.checkpoint_dir, a.metrics_log)


def cmd_fetch_coco(a):
    from .data.fetch import coco_split, fetch_coco_captions, fetch_coco_images

    if a.images_dir:
        fetch_coco_images(a.images_dir, coco_split(a.captions_file), a.zips_dir)
        logging.info("COCO 2017 images in %s", a.images_dir)
    else:
        fetch_coco_captions(a.captions_file, a.zips_dir)
        logging.info("COCO 2017 captions in %s", a.captions_file)


def cmd_fetch_sd15(a):
    from .text2image.backbone import fetch_sd15

    logging.info("Stable Diffusion v1.5 in %s", fetch_sd15(a.dest, a.repo, a.revision))


def cmd_build_backbone(a):
    from .text2image.runs import build_miniature

    build_miniature(a.dataset, a.spec, a.out, a.work_dir)


def cmd_cache_latents(a):
    from .text2image.runs import cache_latents

    cache_latents(a.subset, a.backbone, a.out, a.batch_size)


def cmd_finetune_teacher(a):
    from .text2image.runs import finetune_teacher

    finetune_teacher(a.subset, a.latents, a.backbone, a.out, a.spec, a.checkpoint_dir, a.metrics_log)


def cmd_embed(a):
    from .audit import read_images
    from .embed import sscd, write_embeddings
    from .io import read_image_table, sha256_file

    info = {"space": a.space, "source": a.images}
    if a.space == "clip-text":
        from .clip import prompts_of, text_features
        from .shards import read_samples

        table = read_samples(a.images)[1] if Path(a.images).name == "manifest.json" else read_image_table(a.images)[1]
        vectors = text_features(prompts_of(table), a.weights)
    else:
        images, _ = read_images(a.images, "images to embed")
        if a.space == "sscd":
            vectors = sscd(images, a.weights, a.preprocessing)
            info["preprocessing"] = a.preprocessing
        elif a.space == "digits":
            from .embed import digits_descriptors

            vectors = digits_descriptors(images, a.weights)
        else:
            from .clip import image_features

            vectors = image_features(images, a.weights)
    weights = Path(a.weights)
    # a file's digest; a model directory is named by its config (and fetch manifest, when fetched)
    info["weights_sha256"] = sha256_file(weights if weights.is_file() else weights / "config.json")
    write_embeddings(vectors, a.out, info)
    logging.info("%s embeddings of %d items: %s", a.space, len(vectors), a.out)


def cmd_prepare_imagenet(a):
    from .data.imagenet import prepare_imagenet

    manifest = prepare_imagenet(a.out, train_dir=a.train_dir, archive=a.archive, resolution=a.resolution,
                                workers=a.workers)
    logging.info("prepared ImageNet: %s", manifest)


def cmd_imagenet_source(a):
    """What runs when the configured ImageNet copy is absent: fail with how to provide it."""
    from .data.imagenet import HOW_TO_GET

    if not Path(a.expect).exists():
        raise FileNotFoundError(f"ImageNet source not found: {a.expect}. {HOW_TO_GET}")


def cmd_fetch_clip(a):
    from .clip import fetch_clip

    logging.info("CLIP model in %s", fetch_clip(a.dest, a.repo, a.revision))


def cmd_audit(a):
    from .audit import run_audit

    return run_audit(a)


def cmd_select_teacher(a):
    from .selection import select_teacher

    chosen = select_teacher(a.candidates, a.model_dirs, a.metrics, a.threshold, a.out)
    logging.info("selected %s (L2 Mem %.2f%%, the first to reach %.2f%%) into %s", chosen["model"],
                 100 * chosen["mem_ratio"], 100 * a.threshold, a.out)


def cmd_snapshot(a):
    from .modelio import export_snapshot

    meta = export_snapshot(a.run_dir, a.step, a.out)
    logging.info("snapshot of a %s model at step %d exported to %s", meta["kind"], a.step, a.out)


def cmd_sample(a):
    from .sample import write_shard
    from .shards import num_shards, write_manifest

    shards = num_shards(a.num_samples, a.shard_size)
    if a.manifest and shards != 1:
        raise SystemExit(f"--manifest is for a sample set of one shard; {a.num_samples} samples in shards of "
                         f"{a.shard_size} are {shards}: use the manifest command")
    write_shard(a.model, a.out, a.sampler_name, a.sampler, a.shard, a.shard_size, a.num_samples, a.seed,
                a.model_id, a.batch_size, teacher_dir=a.teacher)
    if a.manifest:
        write_manifest([a.out], a.manifest, a.shard_size, a.num_samples)


def cmd_manifest(a):
    from .shards import write_manifest

    write_manifest(a.shards, a.out, a.shard_size, a.num_samples)


def cmd_search(a):
    """Stage 5 for one sample set in one job: the L2 search, the descriptor search when its embeddings are
    given, and the gallery of both (one job instead of three per set keeps the paper grid's DAG small)."""
    from .search import search_samples, similarity_table

    descriptor = (a.sscd_samples, a.sscd_train, a.sscd_out)
    if any(descriptor) and not all(descriptor):
        raise SystemExit("--sscd-samples, --sscd-train and --sscd-out go together")
    summary = search_samples(a.subset, a.manifest, a.out, a.space, a.ratio)
    logging.info("memorized: %.2f%% of %d samples", 100 * summary["mem_ratio"], summary["n_samples"])
    if a.sscd_out:
        similarity_table(a.sscd_samples, a.sscd_train, a.subset, a.manifest, a.sscd_out, space=a.sscd_space)
        logging.info("%s most-similar search written to %s", a.sscd_space, a.sscd_out)
    if a.figure:
        from .figures import neighbour_figure

        neighbour_figure(a.manifest, a.out, a.subset, a.figure, count=a.figure_count, sscd_path=a.sscd_out)


def _heldout(a, num_images):
    """The held-out split of a dataset: images outside every configured subset (--exclude)."""
    from .data import read_subset
    from .yardsticks import heldout_split

    return heldout_split(num_images, [read_subset(p).index for p in a.exclude], a.reserve, a.seed)


def cmd_feature_net(a):
    from .data import load_source
    from .digits_classifier import train_digits_classifier

    images, labels = load_source(a.dataset)
    _, rest = _heldout(a, len(images))
    logging.info("digits classifier: %d of %d images (outside every training subset and the yardstick reserve)",
                 len(rest), len(images))
    train_digits_classifier(images[rest], labels[rest], a.out, epochs=a.epochs)


def cmd_yardstick(a):
    from .data import load_source, read_subset
    from .yardsticks import write_yardstick, yardstick_images, yardstick_prompts

    subset = read_subset(a.subset)
    prompts = None
    if subset.prompts is not None:  # an image-prompt subset: its yardsticks keep their captions
        from .data.sources import load_captioned

        source = load_captioned(a.dataset)
        images, labels, prompts = source, source.labels, source.prompts  # reads only the images chosen
    else:
        images, labels = load_source(a.dataset)
    reserve, _ = _heldout(a, len(images))
    chosen, chosen_labels, own = yardstick_images(a.kind, images, labels, subset, reserve, a.num_samples, a.seed,
                                                  a.blur_sigma, a.replicate)
    if prompts is not None:
        prompts = yardstick_prompts(a.kind, prompts, subset, reserve, a.num_samples, a.seed, a.replicate)
    write_yardstick(a.kind, a.subset_name, chosen, chosen_labels, a.out_dir, a.shard_size, own, prompts)


def cmd_reference_stats(a):
    from .data import load_source, read_subset
    from .quality import write_reference_stats

    if (a.dataset is None) == (a.subset is None):
        raise SystemExit("reference-stats: give exactly one of --dataset (a full dataset) or --subset (a training subset)")
    if a.dataset is not None:
        images, _ = load_source(a.dataset)
        what = f"the full {a.dataset['source']} dataset ({len(images)} images)"
    else:
        subset = read_subset(a.subset)
        images = subset.images[subset.expanded_indices()]  # the distribution trained on, repeats included
        what = f"the training subset {Path(a.subset).stem} ({len(images)} images with repeats)"
    write_reference_stats(a.kind, a.feature_net, images, a.out, what)


def cmd_metrics(a):
    from .metrics import write_metrics

    write_metrics(a.model_id, a.sampler_name, a.neighbours, a.manifest, a.quality_kind, a.feature_net,
                  a.reference_stats, a.model_stats, a.out, a.sscd_neighbours, a.sscd_threshold,
                  a.clip_images, a.clip_texts, a.prompt_classifier, a.sscd_calibration, a.sscd_calibration_quantile)


def cmd_table(a):
    from .tables import write_table

    paper = None
    if a.paper:
        import yaml

        from .config import published_table

        with open(a.published) as f:
            paper = published_table(yaml.safe_load(f), a.paper)
    rows = write_table(a.title, a.rows, a.metrics, a.csv, a.md, paper, a.html)
    print(open(a.md).read())
    logging.info("table with %d rows written to %s", len(rows), a.md)


def cmd_sample_figure(a):
    from .figures import sample_grid_figure

    sample_grid_figure(a.manifests, a.labels, a.out, a.count)


def cmd_curve(a):
    from .figures import curve_figure, refine_figure

    {"curve": curve_figure, "refine": refine_figure}[a.kind](a.table, a.out)


def cmd_theory_analysis(a):
    from .theory.analysis import write_analysis

    result = write_analysis(a.spec, a.seed, a.out)
    print(f"seed {a.seed}: {int(result['p'])} features, {int(result['n'])} points, chosen ridge {float(result['ridge']):g}, "
          f"Gen share {float(result['simulated_gen_share']):.4f} of the simulated C "
          f"(Theorem 5.3's form at that ridge: {float(result['gen_share']):.4f}, error {float(result['theorem_error']):.2f})")


def cmd_theory_bridge(a):
    from .theory.bridge import run_bridge

    result = run_bridge(a.model, a.subset, a.neighbours, a.spec, a.model_id, a.out_md, a.out_png)
    logging.info("Gen share %.3f; Spearman(Mem share, copies) %.3f (shuffled 95%%: %.3f to %.3f)", result.gen_share,
                 result.spearman, *result.null_range)


def cmd_theory_report(a):
    from .theory.report import write_report

    write_report(a.analyses, a.out_dir, a.tolerance)


def cmd_claims(a):
    from .claims import counts, run

    rows = run(a.plan, a.out_dir)
    for scale, tally in counts(rows).items():
        logging.info("%s: %s", scale, dict(tally))


def build_parser() -> argparse.ArgumentParser:
    from .data.fetch import SD15_REPO, SD15_REVISION

    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, **args):
        s = sub.add_parser(name)
        for flag, kw in args.items():
            s.add_argument("--" + flag.replace("_", "-"), dest=flag, **kw)
        s.set_defaults(func=fn)

    req = {"required": True}
    js = {"required": True, "type": _json}
    add("fetch", cmd_fetch, url=req, dest=req, md5={}, sha256={}, sha256_prefix={})
    add("subset", cmd_subset, dataset=js, spec=js, out=req,
        extra_dataset={"type": _json, "help": "the extra pairs' dataset of a text_memorization subset (default: --dataset)"},
        disjoint_from={"nargs": "*", "default": [], "help": "subset files whose source indices this uniform subset excludes"})
    metrics_log = {"help": "JSON lines of loss, lr, images/s and peak memory at every log point"}
    add("train-teacher", cmd_train_teacher, subset=req, net=js, spec=js, out=req, checkpoint_dir={},
        metrics_log=metrics_log)
    add("distill", cmd_distill, method={"required": True, "choices": ["cd", "cd-continuous", "pd", "dmd", "lcm"]}, subset=req, teacher=req, spec=js,
        out=req, checkpoint_dir={}, metrics_log=metrics_log,
        latents={"help": "lcm: the subset's cached VAE posteriors and prompt embeddings"})
    add("fetch-coco", cmd_fetch_coco, captions_file={"required": True, "help": "captions_<split>.json (names the split)"},
        images_dir={"help": "extract the split's images here instead of its captions"}, zips_dir=req)
    add("fetch-sd15", cmd_fetch_sd15, dest=req, repo={"default": SD15_REPO}, revision={"default": SD15_REVISION})
    add("build-backbone", cmd_build_backbone, dataset=js, spec=js, out=req,
        work_dir={"required": True, "help": "tokenizer files and the VAE's resumable checkpoint"})
    add("cache-latents", cmd_cache_latents, subset=req, backbone=req, out=req, batch_size={"type": int, "default": 32})
    add("finetune-teacher", cmd_finetune_teacher, subset=req, latents=req, backbone=req, spec=js, out=req,
        checkpoint_dir={}, metrics_log=metrics_log)
    add("embed", cmd_embed, space={"choices": ["sscd", "digits", "clip", "clip-text"], "default": "sscd"}, images=req,
        weights={"required": True, "help": "the SSCD TorchScript file, the digits classifier's or the CLIP model's directory"},
        preprocessing={"choices": ["official", "square_320", "dcr"], "default": "official"}, out=req)
    add("fetch-clip", cmd_fetch_clip, dest=req, repo={"default": "openai/clip-vit-large-patch14"},
        revision={"default": "32bd64288804d66eefd0ccbe215aa642df71cc41"})
    add("audit", cmd_audit, train={"required": True, "help": "training images: a Parquet image table or a folder"},
        samples={"required": True, "help": "generated images: a Parquet image table or a folder"},
        space={"choices": ["pixels", "sscd"], "default": "pixels"},
        ratio={"type": float, "help": "pixels: memorized when d1 < ratio * d2 (default: memorization.DEFAULT_RATIO, 1/3)"},
        threshold={"type": float, "help": "sscd: copied when the similarity exceeds it (default: memorization.SSCD_THRESHOLD)"},
        sscd_weights={"help": "sscd: the SSCD TorchScript file (rule fetch_sscd)"},
        preprocessing={"choices": ["official", "square_320", "dcr"], "default": "official"},
        out={"required": True, "help": "JSON with the statistics"}, figure={"help": "PNG of the most-copied samples"},
        count={"type": int, "default": 16}, device={"default": "auto"},
        fail_above={"type": float, "help": "exit 1 when the flagged share exceeds this fraction (a release gate)"})
    add("snapshot", cmd_snapshot, run_dir=req, step={"required": True, "type": int}, out=req)
    add("sample", cmd_sample, model=req, model_id=req, sampler_name=req, sampler=js, shard={"required": True, "type": int},
        shard_size={"required": True, "type": int}, num_samples={"required": True, "type": int},
        seed={"required": True, "type": int}, batch_size={"type": int, "default": 256}, out=req,
        teacher={"help": "refine samplers: the student's teacher directory, whose Heun solver refines the samples"},
        manifest={"help": "a set of one shard: also write its manifest here (saves the set a manifest job)"})
    add("select-teacher", cmd_select_teacher, candidates={"required": True, "nargs": "+"},
        model_dirs={"required": True, "nargs": "+"}, metrics={"required": True, "nargs": "+"},
        threshold={"required": True, "type": float}, out=req)
    add("manifest", cmd_manifest, shards={"required": True, "nargs": "+"}, shard_size={"required": True, "type": int},
        num_samples={"required": True, "type": int}, out=req)
    add("search", cmd_search, subset=req, manifest=req, space={"default": "pixels"}, ratio={"type": float}, out=req,
        sscd_samples={"help": "the samples' descriptors (embed): also search the most similar training image"},
        sscd_train={"help": "the training subset's descriptors, in the subset's order"},
        sscd_space={"choices": ["sscd", "digits"], "default": "sscd", "help": "the descriptor the embeddings are in"},
        sscd_out={"help": "the descriptor search's Parquet table"},
        figure={"help": "also draw the set's gallery (most-memorized samples beside their nearest training images)"},
        figure_count={"type": int, "default": 32})
    heldout = dict(exclude={"nargs": "*", "default": []}, reserve={"type": int, "required": True},
                   seed={"type": int, "default": 0})
    add("feature-net", cmd_feature_net, dataset=js, epochs={"type": int, "default": 30}, out=req, **heldout)
    add("yardstick", cmd_yardstick, kind={"required": True, "choices": ["real", "replay", "blur", "train"]}, dataset=js,
        subset=req, subset_name=req, num_samples={"type": int, "required": True},
        shard_size={"type": int, "required": True}, blur_sigma={"type": float, "default": 1.0}, out_dir=req,
        replicate={"type": int, "default": 0, "help": "replay only: replicate r >= 1 draws afresh from the training set"},
        **heldout)
    add("reference-stats", cmd_reference_stats, kind=req, feature_net=req, dataset={"type": _json}, subset={}, out=req)
    add("metrics", cmd_metrics, model_id=req, sampler_name=req, neighbours=req, manifest=req, quality_kind=req,
        feature_net=req, reference_stats=req, model_stats={}, out=req, sscd_neighbours={},
        sscd_threshold={"type": float, "help": "default: memorization.SSCD_THRESHOLD"}, clip_images={}, clip_texts={},
        sscd_calibration={"help": "real held-out images' similarities: the threshold is their --sscd-calibration-quantile"},
        sscd_calibration_quantile={"type": float, "default": 0.99},
        prompt_classifier={"help": "the digits classifier: the share of samples read as the digit their prompt names"})
    add("prepare-imagenet", cmd_prepare_imagenet, out=req, train_dir={}, archive={},
        resolution={"type": int, "default": 64}, workers={"type": int, "default": 1})
    add("imagenet-source", cmd_imagenet_source, expect=req)
    add("table", cmd_table, title={"default": ""}, rows=js, metrics={"required": True, "nargs": "+"}, csv=req, md=req,
        html={"help": "also write the table as an HTML page"}, published={"help": "the published values (config/published.yaml)"}, paper={"help": "its entry for this table"})
    add("gpu-smoke", cmd_gpu_smoke, out=req)
    add("count-parameters", cmd_count_parameters, config={"default": "config/config.yaml"},
        out={"help": "also write the table (Markdown) here"})
    add("sample-figure", cmd_sample_figure, manifests={"required": True, "nargs": "+"},
        labels={"required": True, "nargs": "+"}, count={"type": int, "default": 16}, out=req)
    add("curve", cmd_curve, table=req, out=req,
        kind={"choices": ["curve", "refine"], "default": "curve", "help": "the table's `figure`"})
    add("theory-analysis", cmd_theory_analysis, spec=js, seed={"type": int, "required": True}, out=req)
    add("theory-bridge", cmd_theory_bridge, model=req, model_id=req, subset=req, neighbours=req, spec=js, out_md=req,
        out_png=req)
    add("pairing", cmd_pairing, student=req, teacher=req, out=req, max_matching={"type": int, "default": 512})
    add("pairing-report", cmd_pairing_report, rows=js, out_md=req, out_png=req, teacher_sampler=req)
    add("edge-lab", cmd_edge_lab, case=js, spec=js, seed={"type": int, "required": True}, out=req)
    add("edge-report", cmd_edge_report, labs={"required": True, "nargs": "+"}, out_png=req, out_md=req)
    add("claims", cmd_claims, plan={"required": True, "help": "the claims plan the claims_plan rule wrote"}, out_dir=req)
    add("theory-report", cmd_theory_report, analyses={"required": True, "nargs": "+"}, out_dir=req,
        tolerance={"type": float, "required": True})
    return p


def cmd_edge_lab(a):
    from .theory.edge import write_lab

    r = write_lab(a.case, a.spec, a.seed, a.out)
    print(f"seed {a.seed}: predicted K*/n {r['mc_crossover']:.3f} (brute force), {r['formula_crossover']:.3f} "
          f"(nearest-point formula), {r['upstream_crossover']:.3f} (upstream formula); measured transition "
          f"{r['measured_transition']:.3f}")


def cmd_edge_report(a):
    from .theory.edge_report import write_edge_report

    for row in write_edge_report(a.labs, a.out_png, a.out_md):
        print(row["case"], "predicted", row["mc"], "measured", row["measured"])


def cmd_pairing(a):
    from .pairing import write_pairing

    r = write_pairing(a.student, a.teacher, a.out, a.max_matching)
    print(f"pairing ratio {r['pairing_ratio']:.4f}, inefficiency {r['pairing_inefficiency']:.4f} ({r['n_pairs']} pairs, d = {r['dimension']})")


def cmd_pairing_report(a):
    from .pairing import write_pairing_report

    for e in write_pairing_report(a.rows, a.out_md, a.out_png, a.teacher_sampler):
        print(e["label"], "pairing ratio", e["ratio"])


def cmd_count_parameters(a):
    from .config import load
    from .io import atomic_output
    from .nets import format_parameter_report, parameter_report

    report = format_parameter_report(parameter_report(load(a.config)))
    print(report, end="")
    if a.out:
        with atomic_output(a.out) as tmp:
            tmp.write_text(report)


def cmd_gpu_smoke(a):
    from .cluster import gpu_smoke
    from .io import write_json

    write_json(a.out, gpu_smoke())


# Libraries that cost seconds to import: every job is a fresh process, so a command imports only those
# it uses, and says which it loaded (tests/test_workflow.py holds the rules that need none of torch's).
HEAVY_MODULES = ("torch", "diffusers", "transformers", "accelerate", "faiss", "cleanfid", "sklearn", "matplotlib")


def loaded_heavy_modules() -> list[str]:
    return [m for m in HEAVY_MODULES if m in sys.modules]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .cluster import MissingGPUError, TrainingInterrupted, require_gpus

    try:
        require_gpus()
        return int(args.func(args) or 0)
    except MissingGPUError as exc:
        logging.error("%s", exc)
        return 2
    except TrainingInterrupted as exc:  # SLURM's time limit, scancel or preemption: the retry resumes
        logging.error("%s", exc)
        return exc.exit_code
    finally:
        logging.info("%s: heavy modules loaded: %s", args.command, ", ".join(loaded_heavy_modules()) or "none")


if __name__ == "__main__":
    sys.exit(main())
