"""Stage 6b's figures: students along training (the study's Figures 1 and 8) with each student against
its own teacher, refined samples against the refine level, sample grids (Figs. 4 and 5) and the
nearest-neighbour galleries. Each reads what a table or a search wrote; none recomputes a metric."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from .data import read_subset
from .io import atomic_output, pyplot, save_png
from .shards import read_samples
from .yardsticks import parse_id as parse_yardstick


MARKERS = ("o", "^", "s", "D", "v", "P", "X")


def curve_figure(table_csv: str | Path, out_png: str | Path) -> None:
    """Memorization and quality of students along training (the study's Figures 1 and 8), one panel per
    setting, from a table's CSV: each student run a line through its rows at their training step
    (runs told apart by marker), the setting's teachers as dashed lines, the real held-out quality of
    its training subset as a dotted floor. Where the table sets students against their own teachers
    (replicate by replicate, pipeline.stats), a second row of panels draws that difference in quality
    with its 95% interval against the step: below 0 the student is better."""
    plt = pyplot()

    with open(table_csv) as f:
        rows = list(csv.DictReader(f))
    settings = list(dict.fromkeys(r["setting"] for r in rows if r["role"] == "student"))
    if not settings:
        raise ValueError(f"{table_csv} has no student rows to draw along training")
    qname = rows[0]["quality_name"]
    markers = MARKERS
    paired = any(r.get("vs_teacher_quality") for r in rows if r["role"] == "student" and r["step"])
    fig, axes = plt.subplots(2 if paired else 1, len(settings), figsize=(4.5 * len(settings), 6.6 if paired else 3.4),
                             squeeze=False)
    if paired:
        for ax, setting in zip(axes[1], settings):
            _versus_teacher_panel(ax, [r for r in rows if r["setting"] == setting and r["role"] == "student"
                                       and r["step"] and r.get("vs_teacher_quality")], qname)
    for ax, setting in zip(axes[0], settings):
        students = [r for r in rows if r["setting"] == setting and r["role"] == "student" and r["step"]]
        subsets = {r["subset"] for r in students}
        runs = list(dict.fromkeys(r["model"].split("@")[0] for r in students))
        qax = ax.twinx()
        for k, run in enumerate(runs):
            pts = sorted((r for r in students if r["model"].split("@")[0] == run), key=lambda r: int(float(r["step"])))
            steps = [int(float(r["step"])) for r in pts]
            name = "student" if len(runs) == 1 else run
            mem, mem_sd = _column(pts, "mem", 100), _column(pts, "mem_sd", 100)
            quality, quality_sd = _column(pts, "quality"), _column(pts, "quality_sd")
            marker = markers[k % len(markers)]
            ax.plot(steps, mem, f"{marker}-", color="tab:red", label=f"{name} L2 Mem")
            qax.plot(steps, quality, f"{marker}-", color="tab:blue", label=f"{name} {qname}")
            if not np.isnan(mem_sd).all():  # replicates: a band of one standard deviation
                ax.fill_between(steps, mem - mem_sd, mem + mem_sd, color="tab:red", alpha=0.15, lw=0)
                qax.fill_between(steps, quality - quality_sd, quality + quality_sd, color="tab:blue", alpha=0.15, lw=0)
        for r in rows:
            if r["role"] == "teacher" and r["setting"] == setting:
                ax.axhline(100 * float(r["mem"]), color="tab:red", ls="--", lw=1, label="teacher L2 Mem")
                qax.axhline(float(r["quality"]), color="tab:blue", ls="--", lw=1, label=f"teacher {qname}")
                for axis, key, scale, color in ((ax, "mem", 100, "tab:red"), (qax, "quality", 1, "tab:blue")):
                    sd = r.get(f"{key}_sd")
                    if sd:
                        mid = scale * float(r[key])
                        axis.axhspan(mid - scale * float(sd), mid + scale * float(sd), color=color, alpha=0.08, lw=0)
            elif r["subset"] in subsets and (parse_yardstick(r["model"]) or ("",))[0] == "real":
                qax.axhline(float(r["quality"]), color="tab:blue", ls=":", lw=1, label=f"real held-out {qname}")
        ax.set_xlabel("distillation step")
        ax.set_ylabel("L2 Mem (%)", color="tab:red")
        qax.set_ylabel(f"{qname} (lower is better)", color="tab:blue")
        ax.set_title(setting)
        handles = ax.get_legend_handles_labels()[0] + qax.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="best")
    fig.tight_layout()
    save_png(fig, out_png)
    plt.close(fig)


def _versus_teacher_panel(ax, students: Sequence[Mapping[str, str]], qname: str) -> None:
    """Student minus own teacher in quality against the training step, each run a line with the 95%
    interval of the paired difference at every point (none drawn with one replicate)."""
    runs = list(dict.fromkeys(r["model"].split("@")[0] for r in students))
    for k, run in enumerate(runs):
        pts = sorted((r for r in students if r["model"].split("@")[0] == run), key=lambda r: int(float(r["step"])))
        steps = np.array([int(float(r["step"])) for r in pts])
        mean = _column(pts, "vs_teacher_quality")
        low, high = _column(pts, "vs_teacher_quality_low"), _column(pts, "vs_teacher_quality_high")
        marker = MARKERS[k % len(MARKERS)]
        ax.plot(steps, mean, f"{marker}-", color=f"C{k}", label="student" if len(runs) == 1 else run)
        if not np.isnan(low).all():
            ax.fill_between(steps, low, high, color=f"C{k}", alpha=0.2, lw=0)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("distillation step")
    ax.set_ylabel(f"student - own teacher, {qname}")
    ax.set_title("below 0: the student is better (95% interval over replicates)", fontsize=8)
    ax.legend(fontsize=7, loc="best")


def refine_figure(table_csv: str | Path, out_png: str | Path) -> None:
    """Memorization and quality of refined one-step samples against the refine level (App. A.1's
    "+refine", swept), one panel per training subset: a line per student from its refine rows, its
    unrefined samples at the left edge, the teacher as dashed lines. Where the lines reach the
    teacher's, the refine has handed the sample back to the teacher."""
    plt = pyplot()

    with open(table_csv) as f:
        rows = list(csv.DictReader(f))
    refined = [r for r in rows if r.get("refine_sigma")]
    if not refined:
        raise ValueError(f"{table_csv} has no refine rows (a sampler of kind refine) to draw")
    subsets = list(dict.fromkeys(r["subset"] for r in refined))
    qname = rows[0]["quality_name"]
    fig, axes = plt.subplots(2, len(subsets), figsize=(4.8 * len(subsets), 6.2), squeeze=False, sharex="col")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, subset in enumerate(subsets):
        mem_ax, q_ax = axes[0][col], axes[1][col]
        students = list(dict.fromkeys(r["model"] for r in refined if r["subset"] == subset))
        lo = min(float(r["refine_sigma"]) for r in refined if r["subset"] == subset)
        setting_color = {}
        for k, model in enumerate(students):
            pts = sorted((r for r in refined if r["model"] == model), key=lambda r: float(r["refine_sigma"]))
            x = [float(r["refine_sigma"]) for r in pts]
            color = colors[k % len(colors)]
            setting_color.setdefault(pts[0]["setting"], color)
            for ax, key, scale in ((mem_ax, "mem", 100), (q_ax, "quality", 1)):
                y, sd = _column(pts, key, scale), _column(pts, f"{key}_sd", scale)
                ax.plot(x, y, "o-", color=color, label=f"{model} + refine")
                if not np.isnan(sd).all():
                    ax.fill_between(x, y - sd, y + sd, color=color, alpha=0.15, lw=0)
                raw = [r for r in rows if r["model"] == model and not r.get("refine_sigma")]
                if raw:
                    ax.plot([lo / 2], [scale * float(raw[0][key])], "x", color=color, ms=8,
                            label=f"{model} unrefined ({raw[0]['sampler']})")
        for r in rows:
            if r["subset"] == subset and r["role"] == "teacher":
                color = setting_color.get(r["setting"], "k")  # the teacher in its students' colour
                mem_ax.axhline(100 * float(r["mem"]), color=color, ls="--", lw=1, label=f"teacher {r['model']}")
                q_ax.axhline(float(r["quality"]), color=color, ls="--", lw=1, label=f"teacher {r['model']}")
            elif r["subset"] == subset and (parse_yardstick(r["model"]) or ("",))[0] == "real":
                q_ax.axhline(float(r["quality"]), color="k", ls=":", lw=1, label=f"real held-out {qname}")
        mem_ax.set_title(subset)
        mem_ax.set_ylabel("L2 Mem (%)")
        q_ax.set_ylabel(f"{qname} (lower is better)")
        q_ax.set_xlabel("refine level sigma (x: unrefined)")
        for ax in (mem_ax, q_ax):
            ax.set_xscale("log")
            ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    save_png(fig, out_png)
    plt.close(fig)


def _column(rows: Sequence[Mapping[str, str]], key: str, scale: float = 1.0) -> np.ndarray:
    """A numeric CSV column (NaN where blank or absent), times `scale`."""
    return np.asarray([scale * float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows])


def pair_grid(samples: np.ndarray, neighbours: np.ndarray, flagged: np.ndarray, out_png: str | Path,
              per_row: int = 8, scale: int | None = None, captions: Sequence[str] | None = None) -> None:
    """Each sample beside its nearest training image, flagged pairs framed in red, an optional caption
    under each pair, as one PNG. Small images are enlarged (nearest neighbour, `scale`; by default to
    at least 64 pixels) so that a pair is wider than its caption."""
    count = len(samples)
    if count == 0:
        raise ValueError("no samples to draw")
    h, w, c = samples.shape[1:]
    scale = scale or max(1, -(-64 // w))
    pad = 2
    font = ImageFont.load_default()
    caption_h = 0
    if captions is not None:
        caption_h = max(_text_height(font, t) for t in captions) + 2 * pad
    cell_w, cell_h = 2 * w * scale + 3 * pad, h * scale + 2 * pad + caption_h
    per_row = min(per_row, count)
    rows = -(-count // per_row)
    canvas = Image.new("RGB", (per_row * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)

    def tile(a: np.ndarray) -> Image.Image:
        img = Image.fromarray(a[..., 0] if c == 1 else a).convert("RGB")
        return img.resize((w * scale, h * scale), Image.NEAREST)

    for k in range(count):
        x0, y0 = (k % per_row) * cell_w, (k // per_row) * cell_h
        canvas.paste(tile(samples[k]), (x0 + pad, y0 + pad))
        canvas.paste(tile(neighbours[k]), (x0 + 2 * pad + w * scale, y0 + pad))
        if captions is not None:
            draw.text((x0 + 2 * pad, y0 + h * scale + 2 * pad), captions[k], fill=(0, 0, 0), font=font)
        if flagged[k]:
            draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], outline=(220, 30, 30), width=pad)
    with atomic_output(out_png) as tmp:
        canvas.save(tmp, format="PNG")


def sample_grid_figure(manifests: Sequence[str | Path], labels: Sequence[str], out_png: str | Path, count: int = 16,
                       per_row: int = 8, scale: int | None = None) -> None:
    """Panels of samples side by side (the study's Figs. 4 and 5): each panel the first `count` samples
    of one sample set under its label. Sample i of every set starts from the same seed (run seed, i),
    so panels of models distilled from one teacher show what each does with the same noise."""
    if len(manifests) != len(labels) or not manifests:
        raise ValueError("give one label per sample set, at least one")
    sets = [read_samples(m)[0][:count] for m in manifests]
    h, w, c = sets[0].shape[1:]
    scale = scale or max(1, -(-48 // w))
    pad, font = 2, ImageFont.load_default()
    title_h = max(_text_height(font, t) for t in labels) + 2 * pad
    per_row = min(per_row, count)
    rows = -(-count // per_row)
    panel_w, panel_h = per_row * (w * scale + pad) + 3 * pad, title_h + rows * (h * scale + pad) + 2 * pad
    canvas = Image.new("RGB", (panel_w * len(sets), panel_h), "white")
    draw = ImageDraw.Draw(canvas)
    for p, (images, label) in enumerate(zip(sets, labels)):
        x0 = p * panel_w + pad
        draw.text((x0, pad), label, fill=(0, 0, 0), font=font)
        for k, a in enumerate(images):
            img = Image.fromarray(a[..., 0] if c == 1 else a).convert("RGB").resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(img, (x0 + (k % per_row) * (w * scale + pad), title_h + (k // per_row) * (h * scale + pad)))
    with atomic_output(out_png) as tmp:
        canvas.save(tmp, format="PNG")


def _text_height(font, text: str) -> int:
    return int(font.getbbox(text)[3])


def neighbour_figure(manifest_path, neighbours_path, subset_path, out_png, count: int = 32, per_row: int = 8,
                     scale: int | None = None, sscd_path: str | Path | None = None) -> np.ndarray:
    """The gallery of a sample set: its `count` most-memorized samples (smallest d1/d2 first), each
    beside its nearest training image and captioned with that ratio and, given the SSCD search
    (`sscd_path`), the sample's highest SSCD similarity to any training image; pairs the L2 ratio
    criterion counts as memorized are framed in red. Returns the sample ids drawn, in order."""
    images, _, _ = read_samples(manifest_path)
    nb = pq.read_table(neighbours_path).to_pydict()
    train = read_subset(subset_path).images
    ratio = np.asarray(nb["ratio"], dtype=np.float64)
    ids = np.asarray(nb["sample_id"], dtype=np.int64)
    order = np.argsort(ratio, kind="stable")[:min(count, len(images))]
    captions = [f"d1/d2 {ratio[i]:.3f}" for i in order]
    if sscd_path is not None:
        sim = pq.read_table(sscd_path).to_pydict()
        by_id = dict(zip(sim["sample_id"], sim["similarity"]))
        captions = [f"{t}  SSCD {by_id[int(ids[i])]:.2f}" for t, i in zip(captions, order)]
    nn1 = np.asarray(nb["nn1_index"])[order]
    pair_grid(images[ids[order]], train[nn1], np.asarray(nb["memorized"])[order], out_png, per_row, scale, captions)
    return ids[order]
