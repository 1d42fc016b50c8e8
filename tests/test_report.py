"""report.py: REPORT.md-style Markdown typeset as a PDF; parts on new pages; one-line errors."""
import functools
import json
import math
import os
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
import torch

import report
import utils

LONG = " ".join(["A long paragraph that fills the page."] * 400)


def write_doc(folder, image="fig.png", caption_number=1, body="Some text with **bold** and `code`."):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(np.arange(5))
    fig.savefig(folder / "fig.png", dpi=150)
    plt.close(fig)
    text = f"""# A test report

A summary paragraph.

## Problem 1: the first

{body}

| T | energy distance |
| --- | --- |
| 5 | 0.041 |
| 50 | 0.0011 |

![a line]({image})

*Figure {caption_number}: A straight line.*

## Problem 2: the second

- one item
- another item
"""
    (folder / "doc.md").write_text(text, encoding="utf-8")
    return folder / "doc.md"


def test_parse_finds_each_kind_of_block(tmp_path):
    blocks = report.parse(write_doc(tmp_path).read_text())
    kinds = [k for k, _ in blocks]
    assert kinds == ["title", "para", "h2", "para", "table", "image", "h2", "list"]
    table = blocks[kinds.index("table")][1]
    assert table == [["T", "energy distance"], ["5", "0.041"], ["50", "0.0011"]]  # the |---| rule is dropped
    alt, path, caption, number = blocks[kinds.index("image")][1]
    assert (alt, caption, number) == ("a line", "A straight line.", 1)  # the caption belongs to the image


def test_report_builds_and_each_problem_starts_a_new_page(tmp_path):
    source = write_doc(tmp_path)
    result = report.render(source, tmp_path / "out.pdf")
    assert (tmp_path / "out.pdf").read_bytes()[:5] == b"%PDF-"
    assert result["parts"] == {"Problem 1: the first": 2, "Problem 2: the second": 3} and result["pages"] == 3
    # a part that runs over several pages pushes the next one to a fresh page after it
    result = report.render(write_doc(tmp_path, body=LONG), tmp_path / "long.pdf")
    parts = result["parts"]
    assert parts["Problem 2: the second"] > parts["Problem 1: the first"] + 1 and result["pages"] == parts["Problem 2: the second"]


def test_figures_keep_their_pixels(tmp_path):
    # the 600 px wide test figure is placed 600 / 150 inches (101.6 mm) wide, not stretched to the
    # 170 mm text width: never below 150 source pixels per inch; and its own pixels are embedded
    source = write_doc(tmp_path)
    result = report.render(source, tmp_path / "out.pdf")
    (path, width_mm, ppi), = result["figures"]
    assert width_mm == pytest.approx(101.6) and ppi == pytest.approx(150)
    assert b"/Width 600" in (tmp_path / "out.pdf").read_bytes()


def test_missing_image_and_wrong_number_are_one_line_errors(tmp_path):
    source = write_doc(tmp_path, image="nowhere.png")
    with pytest.raises(utils.UserError, match="nowhere.png"):
        report.render(source, tmp_path / "out.pdf", missing_hint=lambda p: "python make_it.py")
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(report.__file__), "report.py"),
                        "--source", str(source), "--out", str(tmp_path / "out.pdf")], capture_output=True, text=True)
    assert r.returncode == 2 and "nowhere.png" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.pdf").exists()
    with pytest.raises(utils.UserError, match="numbered 2"):
        report.render(write_doc(tmp_path, caption_number=2), tmp_path / "out.pdf")


def test_missing_figure_names_the_command_that_makes_it(root, tmp_path):
    import reproduce
    assert reproduce.maker("figures/twopixel_fast_sampling.png") == "python visualize.py --task fast"
    assert reproduce.maker("figures/mnist_eval.png") == "python mnist_ddpm.py evaluate --replot"
    # every figure REPORT.md shows is made by a step of reproduce.py
    shown = [b[1][1] for b in report.parse(open(os.path.join(root, "REPORT.md"), encoding="utf-8").read()) if b[0] == "image"]
    assert shown and all(reproduce.maker(p) for p in shown), [p for p in shown if not reproduce.maker(p)]


def test_the_write_up_has_no_unfilled_numbers(root):
    for name in ("README.md", "REPORT.md"):
        text = open(os.path.join(root, name), encoding="utf-8").read()
        assert "{{" not in text and "}}" not in text, name


def test_every_shipped_file_the_write_up_names_exists(root):
    # a path under figures/ or data/ (lower case: a placeholder such as K is not a file), with {a,b} expanded as a shell would
    import itertools
    import re

    def expand(path):
        parts = re.split(r"\{([^{}]*)\}", path)
        choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
        return ["".join(c) for c in itertools.product(*choices)]

    for name in ("README.md", "REPORT.md"):
        text = open(os.path.join(root, name), encoding="utf-8").read()
        named = re.findall(r"(?<![\w/.-])((?:figures|data)/[a-z0-9_./{},-]+\.(?:json|png|pdf|gif|npz))(?![\w.-])", text)
        assert len(named) > 5, name  # the pattern finds paths at all
        missing = sorted({p for path in named for p in expand(path) if not os.path.exists(os.path.join(root, p))})
        assert not missing, (name, missing)


def test_table_columns_share_the_width_but_none_falls_below_its_longest_word():
    assert report.fit_widths([1, 3], [0, 0], 100) == [25, 75]  # in proportion when nothing binds
    widths = report.fit_widths([30, 5, 5], [10, 20, 4], 100)  # the second would get 12.5 < 20
    assert widths[1] == 20 and widths[2] >= 4 and sum(widths) == pytest.approx(100)
    assert widths[0] / widths[2] == pytest.approx(30 / 5)  # the rest keep their proportions


def test_the_from_scratch_estimate_leaves_out_time_a_run_spent_paused(tmp_path):
    import reproduce
    paused = tmp_path / "paused.pt"  # four epochs of 100 s, with a 700 s pause in the second
    torch.save({"train": {"seconds": 1100.0, "history": {"seconds": [100.0, 900.0, 1000.0, 1100.0]}}}, paused)
    assert reproduce.recorded_seconds(str(paused)) == pytest.approx(400.0)
    whole = tmp_path / "whole.pt"  # no record per epoch: the total is all there is
    torch.save({"train": {"seconds": 55.0}}, whole)
    assert reproduce.recorded_seconds(str(whole), per_model=4) == pytest.approx(220.0)


def test_a_code_span_is_not_broken_inside_a_word(tmp_path, monkeypatch):
    # Words before a command in `code` shift it along the line; wherever it lands, every word of
    # it ends on the line it started on (fpdf would otherwise cut a word at the margin, "--preci" /
    # "sion", and a command copied from the PDF would be broken), a word moves to the next line
    # only when it does not fit, and an opening bracket before the code moves with it.
    from fpdf import FPDF
    writes = []  # every call: its text, font, where it started and ended, the room it left and its width
    original = FPDF.write

    def write(self, h, text, link=""):
        start = (self.page, self.get_y(), self.get_x())
        out = original(self, h, text, link)
        writes.append({"text": text, "mono": self.font_family.lower().startswith("mono"), "start": start,
                       "end": (self.page, self.get_y(), self.get_x()), "room_after": self.w - self.r_margin
                       - self.get_x() - 2 * self.c_margin, "width": self.get_string_width(text),
                       "at_margin": start[2] - self.l_margin < 0.01, "ends_at_margin": self.get_x() - self.l_margin < 0.01})
        return out

    monkeypatch.setattr(FPDF, "write", write)
    long_path = "figures/" + "_".join(["a_part_of_a_name"] * 12) + "{,_seed1}.json"  # longer than a line
    command = f"python mnist_ddpm.py train --precision auto --out checkpoints/study/a_long_name_40_epochs.pt {long_path}"
    body = " ".join(f"{'word ' * k}{'(' if k % 2 else ''}`{command}`{')' if k % 2 else ''} and" for k in range(40))
    report.render(write_doc(tmp_path, body=body), tmp_path / "out.pdf")
    words = [w for w in writes if w["mono"] and w["text"].strip()]
    assert "".join(w["text"] for w in words) == command.replace(" ", "") * 40  # all of it, in order
    assert all(" " not in w["text"] for w in words)  # a word or part of a name per call
    # on the line it started on, or, begun at the margin of the page's last line, whole on the next page
    assert all(w["start"][:2] == w["end"][:2] or (w["at_margin"] and w["end"][0] == w["start"][0] + 1) for w in words)
    # the long path broke only between the parts of its name, never inside the braces
    parts = [w["text"] for w in words if w["text"] not in command.split()]
    assert len(parts) > 40 and all(p.endswith(("/", "_")) or p == "name{,_seed1}.json" for p in parts)
    moved = 0
    for before, w, after in zip(writes, writes[1:], writes[2:]):
        if w["at_margin"] and not before["ends_at_margin"] and before["end"][0] == w["start"][0]:
            # started a new line although the line before did not end at the margin: it did not fit there
            needed = w["width"] + (after["width"] if w["text"] == "(" else 0)
            assert (w["mono"] or w["text"] == "(") and before["room_after"] < needed, (before, w)
            moved += 1
    assert moved >= 10  # many had to move
    brackets = [k for k, w in enumerate(writes) if w["text"] == "("]
    assert len(brackets) == 20 and all(writes[k + 1]["mono"] and writes[k + 1]["start"][:2] == writes[k]["end"][:2]
                                       for k in brackets)  # each on the line of the code it opens


NUMBER_WORDS = dict(enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty twenty-one twenty-two twenty-three twenty-four twenty-five".split()))


def matching(ev, w, steps=200):
    """An evaluation's entries at w by DDPM over `steps` steps."""
    return [e for e in ev["by_w"] if e["w"] == w and e["sampler"] == "ddpm" and e["steps"] == steps]


def scored_at(ev, w, steps=200):
    """The study's setting in an evaluation: 100 samples per digit, DDPM with 200 steps (or `steps`),
    at w (None if not run)."""
    assert ev["n_per_digit"] == 100
    found = matching(ev, w, steps)
    return found[-1] if found else None


def scored_entries(folder, stem, seeds=(0, 1), w=0.0, steps=200):
    """(evaluation, its entry at w in the study's setting) at each sampling seed; w = 0: without guidance."""
    found = []
    for seed in seeds:
        path = os.path.join(folder, f"{stem}_eval{f'_seed{seed}' if seed else ''}.json")
        with open(path) as f:
            ev = json.load(f)
        e = scored_at(ev, w, steps)
        assert ev["seed"] == seed and e is not None, path
        found.append((ev, e))
    return found


def printed(entries):
    """As asked and Frechet / floor of each (evaluation, entry) pair, as the report prints them."""
    return [(f"{100 * e['accuracy']:.1f}%", f"{e['frechet_distance'] / ev['frechet_floor_train_vs_test']:.2f}")
            for ev, e in entries]


def printed_scores(folder, stem, seeds=(0, 1), w=0.0):
    """As asked and Frechet / floor at w at each sampling seed, as the report prints them."""
    return printed(scored_entries(folder, stem, seeds, w))


def flowing(root, name):
    """A Markdown file of the project with its line breaks and runs of spaces as single spaces."""
    with open(os.path.join(root, name), encoding="utf-8") as f:
        return " ".join(f.read().split())


def table_rows(text, header):
    """The cells of each row of the markdown table that starts with `header`, below its rule."""
    lines = text[text.index(header):].splitlines()[2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[:next(
        i for i, line in enumerate(lines) if not line.startswith("|"))]]


def as_asked(entries):
    """% of the samples of these (evaluation, entry) pairs read as asked, counted in samples and
    given to 0.01 (half up), as the report prints pooled shares."""
    right = sum(round(10 * ev["n_per_digit"] * e["accuracy"]) for ev, e in entries)
    total = sum(10 * ev["n_per_digit"] for ev, _ in entries)
    return (Decimal(100 * right) / total).quantize(Decimal("0.01"), ROUND_HALF_UP)


def gap(a, b):
    """Points between two shares as printed ("98.1%", "98.7%" -> "-0.6")."""
    return f"{float(a[:-1]) - float(b[:-1]):+.1f}".replace("+0.0", "0.0")


DESIGN_RUNS = {  # the design table's rows (by configuration) and the evaluations they report
    "bias (first model)": "bias_22_epochs",
    "scale-shift": "scale_shift_24_epochs",
    "scale-shift + Min-SNR 5": "min_snr_24_epochs",
    "scale-shift + Min-SNR 5 (shipped first)": "min_snr_5_40_epochs",
    "scale-shift + Min-SNR 1": "min_snr_1_40_epochs",
    "scale-shift + Min-SNR 5, channels 8 / 32 / 96 / 96": "channels_8_32_96_96_32_epochs",
    "scale-shift + Min-SNR 1, steps drawn by weight": "min_snr_1_sampled_40_epochs",
    "scale-shift + Min-SNR 1, channels 16 / 48 / 96 / 96": "channels_16_48_96_96_min_snr_1_28_epochs",
    "scale-shift + Min-SNR 5, predicting v": "v_min_snr_5_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05 (reference)": "min_snr_1_lr_2e-3_p_uncond_0.05_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, 2 residual layers":
        "two_residual_layers_min_snr_1_lr_2e-3_p_uncond_0.05_28_epochs",
    "scale-shift + Min-SNR 1, lr 4e-3, p_uncond 0.05": "min_snr_1_lr_4e-3_p_uncond_0.05_30_epochs",
    "scale-shift + Min-SNR 1, lr 4e-3, p_uncond 0.05, 40 epochs": "min_snr_1_lr_4e-3_p_uncond_0.05_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, 2-layer embedding":
        "embedding_layers_2_min_snr_1_lr_2e-3_p_uncond_0.05_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, 2-layer embedding, residual layers 1 / 1 / 2 / 2":
        "embedding_layers_2_res_layers_1_1_2_2_36_epochs",
    "scale-shift + Min-SNR 1, lr 3e-3, p_uncond 0.05, batch 128": "batch_128_lr_3e-3_min_snr_1_p_uncond_0.05_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.02": "min_snr_1_lr_2e-3_p_uncond_0.02_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, training seed 1":
        "min_snr_1_lr_2e-3_p_uncond_0.05_40_epochs_seed_1",
    "scale-shift + Min-SNR 0.5, lr 2e-3, p_uncond 0.05": "min_snr_0.5_lr_2e-3_p_uncond_0.05_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, 80 epochs": "min_snr_1_lr_2e-3_p_uncond_0.05_80_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, channels 32 / 32 / 64 / 64": "channels_32_32_64_64_32_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, EMA 0.9995": "ema_0.9995_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, EMA 0.9998": "ema_0.9998_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, 2-layer embedding, EMA 0.9995":
        "embedding_layers_2_ema_0.9995_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, 2-layer embedding, EMA 0.9998 (plain-target model)":
        "embedding_layers_2_ema_0.9998_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, 2-layer embedding, dropout 0.1":
        "embedding_layers_2_dropout_0.1_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, 2-layer embedding, dropout 0.1, EMA 0.9998":
        "embedding_layers_2_dropout_0.1_ema_0.9998_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, 2-layer embedding, training seed 1":
        "embedding_layers_2_seed_1_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, 2-layer embedding, EMA 0.9998, training seed 1":
        "embedding_layers_2_ema_0.9998_seed_1_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, 2-layer embedding, embedding token":
        "embedding_layers_2_embedding_token_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, 2-layer embedding, embedding token, EMA 0.9998":
        "embedding_layers_2_embedding_token_ema_0.9998_40_epochs",
    "scale-shift + Min-SNR 1, lr 2e-3, p_uncond 0.05, 2-layer embedding, EMA 0.9998, model guidance 0.2 (shipped)":
        "model_guidance_0.2_32_epochs",
}


def test_the_design_table_reports_what_the_evaluations_measured(root):
    text = open(os.path.join(root, "REPORT.md"), encoding="utf-8").read()
    rows = {cells[0]: cells for cells in table_rows(text, "| configuration | parameters |")}
    assert set(rows) == set(DESIGN_RUNS)
    # the figure of the study (mnist_ddpm.py study) shows the same runs in the table's order
    import mnist_ddpm
    assert [DESIGN_RUNS[name] for name in rows] == [stem for stem, _ in mnist_ddpm.DESIGN_RUNS]

    def load(path):
        with open(os.path.join(root, "figures", path)) as f:
            return json.load(f)

    reference = load("mnist_study/guided_all_steps_eval.json")  # the reference model's evaluation at every w
    for name, stem in DESIGN_RUNS.items():
        accuracy, distance = [], []
        for seed, suffix in ((0, ""), (1, "_seed1")):
            ev = load(f"mnist_study/{stem}_eval{suffix}.json")
            assert ev["seed"] == seed
            e = scored_at(ev, 0.0)
            accuracy.append(f"{100 * e['accuracy']:.1f}%" if e else "not run")
            distance.append(f"{e['frechet_distance'] / ev['frechet_floor_train_vs_test']:.2f}" if e else "not run")
        assert rows[name][4:6] == [" / ".join(accuracy), " / ".join(distance)], name
        ev = load(f"mnist_study/{stem}_eval.json")
        if name.endswith("(reference)"):
            assert reference["model"] == ev["model"]
            ev = reference
        e = scored_at(ev, 0.4)
        guided = "not evaluated" if e is None else (
            f"{100 * e['accuracy']:.1f}% / {e['frechet_distance']:.1f} "
            f"({e['frechet_distance'] / ev['frechet_floor_train_vs_test']:.2f}) / {100 * e['diversity_ratio']:.0f}%")
        assert rows[name][6] == guided, name


def test_the_default_w_is_the_smallest_evaluated_w_that_meets_the_targets_with_margin(root):
    # at both seeds at least one sample above 99.5% read as asked, Frechet at most 1.15 times
    # its floor and at least 90% of real diversity (REPORT.md, how strong should guidance be?)
    import mnist_ddpm
    seeds = []
    for name in ("mnist_eval.json", "mnist_eval_seed1.json"):
        with open(os.path.join(root, "figures", name)) as f:
            ev = json.load(f)
        n = 10 * ev["n_per_digit"]
        seeds.append({e["w"]: round(n * e["accuracy"]) > 0.995 * n and e["diversity_ratio"] >= 0.9
                      and e["frechet_distance"] <= 1.15 * ev["frechet_floor_train_vs_test"]
                      for e in ev["by_w"] if e["sampler"] == "ddpm" and e["steps"] == ev["T"]})
    assert seeds[0].keys() == seeds[1].keys()
    meets = [w for w in sorted(seeds[0]) if seeds[0][w] and seeds[1][w]]
    assert meets and meets[0] == mnist_ddpm.DEFAULT_W


@pytest.mark.parametrize("header, stem", [("| w | seed | read as asked |", "mnist_eval"),  # the shipped model
                                          ("| w (plain-target model) | seed | read as asked |",
                                           "mnist_study/plain_target_guided_eval")])
def test_the_evaluation_tables_report_every_setting_of_their_model(root, header, stem):
    # each row: w, seed -> that entry of figures/<stem>{,_seed1}.json, every evaluated w at both seeds
    text = open(os.path.join(root, "REPORT.md"), encoding="utf-8").read()
    rows = table_rows(text, header)
    expected = []
    for seed, name in ((0, f"{stem}.json"), (1, f"{stem}_seed1.json")):
        with open(os.path.join(root, "figures", name)) as f:
            ev = json.load(f)
        # written when its model was checkpoints/mnist_T200.pt
        assert ev["seed"] == seed and ev["checkpoint"].replace("\\", "/") == "checkpoints/mnist_T200.pt"
        for e in ev["by_w"]:
            per_digit = [round(100 * a) for a in e["accuracy_per_digit"]]
            lowest = [str(d) for d, a in enumerate(per_digit) if a == min(per_digit)]
            lowest = "every digit" if len(lowest) == 10 else ", ".join(lowest)
            ratio = e["frechet_distance"] / ev["frechet_floor_train_vs_test"]
            expected.append([f"{e['w']:g}", str(seed), f"{100 * e['accuracy']:.1f}%", f"{lowest}: {min(per_digit)}%",
                             f"{e['frechet_distance']:.1f} ({ratio:.2f})", f"{100 * e['diversity_ratio']:.0f}%",
                             f"{e['sampling_seconds']:.0f}"])
    assert sorted(rows, key=lambda r: (float(r[0]), r[1])) == sorted(expected, key=lambda r: (float(r[0]), r[1]))


def test_the_guided_steps_table_reports_what_the_evaluations_measured(root):
    # each row: steps guided, w -> the evaluations of the reference model (no step or all 200 guided: its
    # evaluation at every w)
    text = open(os.path.join(root, "REPORT.md"), encoding="utf-8").read()
    rows = table_rows(text, "| guided steps (t from 200 down to) |")
    assert [r[:2] for r in rows] == [["none", "0"], ["20 (181)", "0.3"], ["40 (161)", "0.3"], ["40 (161)", "0.6"],
                                     ["100 (101)", "0.3"], ["100 (101)", "0.4"], ["all 200", "0.3"]]

    def cell(path, w, guided_steps):
        try:
            with open(os.path.join(root, "figures", path)) as f:
                ev = json.load(f)
        except FileNotFoundError:
            return "not run"
        assert ev.get("guided_steps") == guided_steps
        e = scored_at(ev, w)
        if e is None:
            return "not run"
        return (f"{100 * e['accuracy']:.1f}% / {e['frechet_distance'] / ev['frechet_floor_train_vs_test']:.2f} / "
                f"{100 * e['diversity_ratio']:.0f}%")

    for row in rows:
        guided = {"none": 0, "all 200": 200}[row[0]] if row[0] in ("none", "all 200") else int(row[0].split()[0])
        w, k = float(row[1]), (None if guided in (0, 200) else guided)
        stem = "mnist_study/guided_all_steps_eval" if k is None else f"mnist_study/guided_first_{k}_steps_eval"
        assert row[2] == f"{(200 + guided) / 400:.2f}", row  # one pass per step, two on a guided one
        assert row[3:] == [cell(f"{stem}.json", w, k), cell(f"{stem}_seed1.json", w, k)], row
        assert row[3] != "not run", row


def test_the_shared_misreads_paragraph_reports_the_study_numbers(root):
    import mnist_ddpm
    with open(os.path.join(root, "figures", "mnist_study.json")) as f:
        numbers = json.load(f)
    # the counts are those of the evaluations in figures/mnist_study/ today
    shared = mnist_ddpm.shared_misreads(mnist_ddpm.design_points(os.path.join(root, "figures", "mnist_study")))
    for run, cells in zip(numbers["runs"], shared):
        for seed, cell in zip(run["seeds"], cells):
            kept = [] if seed is None or "misread" not in seed else [
                seed["misread"], seed["also_misread_by_reference"], pytest.approx(seed["expected_shared_by_chance"])]
            assert kept == ([] if cell is None else list(cell)), run["stem"]
    after = numbers["runs"][[r["stem"] for r in numbers["runs"]].index(numbers["reference"]) + 1:]
    averages = {"ema_0.9995_40_epochs", "ema_0.9998_40_epochs"}  # the reference run's own weights, averaged more slowly
    # and those of a repeat of the two-layer-embedding run: not further trainings either
    repeats = {"embedding_layers_2_ema_0.9995_40_epochs", "embedding_layers_2_ema_0.9998_40_epochs"}
    # every slower average of a run's weights is named for its decay; the rest are further trainings
    assert averages | repeats <= {run["stem"] for run in after if "ema_0.999" in run["stem"]}
    later = [run["seeds"] for run in after if "ema_0.999" not in run["stem"]]
    text = flowing(root, "REPORT.md")
    counts = [[s[seed] for s in later] for seed in (0, 1)]
    pooled = " and ".join(f"{sum(s['also_misread_by_reference'] for s in c)} of {sum(s['misread'] for s in c)} at seed {i}"
                          for i, c in enumerate(counts))
    ranges = " and ".join(f"{min(s['also_misread_by_reference'] for s in c)} to "
                          f"{max(s['also_misread_by_reference'] for s in c)}" + (" per run" if i == 0 else "") + f" at seed {i}"
                          for i, c in enumerate(counts))
    chance = [s["expected_shared_by_chance"] for c in counts for s in c]
    count = NUMBER_WORDS[len(later)]
    assert f"the {count} different trainings after the reference, {pooled}, about half" in text
    own = [" and ".join(f"{s['also_misread_by_reference']} of {s['misread']}" for s in run["seeds"])
           for run in after if run["stem"] in averages]
    assert f"share {own[0]} misreads (0.9995, seeds 0 and 1) and {own[1]} (0.9998)" in text
    assert f": {ranges}, " in text
    assert f"would share {min(chance):.1f} to {max(chance):.1f} of them with the reference model." in text
    # the two-layer-embedding run's slower averages against its own 0.999 average, from the same noise
    folder = os.path.join(root, "figures", "mnist_study")
    base, slower, slowest = (mnist_ddpm.design_points(folder)[[stem for stem, _ in mnist_ddpm.DESIGN_RUNS].index(stem)]
                             for stem in ("embedding_layers_2_min_snr_1_lr_2e-3_p_uncond_0.05_40_epochs", *sorted(repeats)))
    assert all(a.misread == b.misread for a, b in zip(base, slower))
    assert "0.9995 reads 98.7% and 98.3% as asked (seeds 0 and 1), misreading exactly the samples" in text
    kept = [len(s.misread & b.misread) for s, b in zip(slowest, base)]
    assert (f"Of the 0.9998 average's {len(slowest[0].misread)} and {len(slowest[1].misread)} misreads, {kept[0]} and "
            f"{kept[1]} are misreads of the 0.999 average too (of its {len(base[0].misread)} and {len(base[1].misread)})"
            in text)
    turned = [len(b.misread - s.misread) for s, b in zip(slowest, base)]
    added = [len(s.misread - b.misread) for s, b in zip(slowest, base)]
    assert added[0] == 0 and (f"turns {NUMBER_WORDS[turned[0]]} and {NUMBER_WORDS[turned[1]]} of those samples into the digit asked "
                              f"for, and adds {NUMBER_WORDS[added[1]]} new misread at seed 1" in text)


def test_the_heldout_sentence_reports_the_saved_comparisons(root):
    text = flowing(root, "REPORT.md")
    cells, seconds = [], []
    for stem in ("min_snr_1_lr_2e-3_p_uncond_0.05", "embedding_layers_2_ema_0.999"):
        with open(os.path.join(root, "figures", "mnist_study", f"{stem}_40_epochs_heldout.json")) as f:
            result = json.load(f)
        assert result["n"] == 10000 and result["min_snr"] == 1.0 and result["prediction"] == "eps"
        with open(os.path.join(root, "figures", "mnist_study",
                               f"{stem.replace('ema_0.999', 'min_snr_1_lr_2e-3_p_uncond_0.05')}_40_epochs_eval.json")) as f:
            scored = json.load(f)["model"]  # the weights scored in the design table (the same run, repeated, for the second)
        assert result["model"]["final_loss"] == scored["final_loss"], stem
        seconds.append(f"{result['seconds']:.0f}")
        cells.append([(f"{result['losses'][k]['test_over_train']:.3f}", f"{result['losses'][k]['standard_error']:.3f}")
                      for k in ("weighted", "weighted_noisy_half")])
    (reference_all, reference_noisy), (emb2_all, emb2_noisy) = [[f"{r} ({se})" for r, se in c] for c in cells]
    ratio, se = cells[0][0]
    assert f"the loss on test digits is {ratio} times that on training digits (standard error {se};" in text
    assert f"and {reference_noisy} on the noisy half of the chain" in text
    assert f"(the 0.999 average of its exact repeat, below) {emb2_all} and {emb2_noisy} (" in text
    assert f"heldout.json`; {seconds[0]} and {seconds[1]} s on 2 cores" in text


def test_the_dropout_paragraph_reports_its_evaluations_and_heldout_loss(root):
    text = flowing(root, "REPORT.md")
    folder = os.path.join(root, "figures", "mnist_study")
    scores = functools.partial(printed_scores, folder)
    (a0, f0), (a1, f1) = scores("embedding_layers_2_dropout_0.1_40_epochs")
    (b0, g0), (b1, g1) = scores("embedding_layers_2_dropout_0.1_ema_0.9998_40_epochs")
    assert (f"its 0.999 average reads {a0} and {a1} as asked (seeds 0 and 1) at {f0} and {f1} times the Frechet "
            f"floor, and its 0.9998 average {b0} and {b1} at {g0} and {g1}") in text
    (c0, _), (c1, _) = scores("embedding_layers_2_min_snr_1_lr_2e-3_p_uncond_0.05_40_epochs")
    (d0, _), (d1, _) = scores("embedding_layers_2_ema_0.9998_40_epochs")
    assert (f"Against the same recipe without dropout ({c0} and {c1}; {d0} and {d1} for the 0.9998 averages) that is "
            f"{gap(a0, c0)} and {gap(a1, c1)} points, and {gap(b0, d0)} and {gap(b1, d1)}:") in text
    with open(os.path.join(root, "figures", "mnist_study.json")) as f:
        run = {r["stem"]: r for r in json.load(f)["runs"]}["embedding_layers_2_dropout_0.1_40_epochs"]
    seeds = run["seeds"]
    assert (f"Of the 0.999 average's {seeds[0]['misread']} and {seeds[1]['misread']} misreads, "
            f"{seeds[0]['also_misread_by_reference']} and {seeds[1]['also_misread_by_reference']} are the reference "
            f"model's too") in text
    with open(os.path.join(folder, "embedding_layers_2_dropout_0.1_40_epochs_heldout.json")) as f:
        held = json.load(f)["losses"]
    w, noisy = held["weighted"], held["weighted_noisy_half"]
    assert (f"its loss is {w['train']:.5f} on training digits and {w['test']:.5f} on test digits, test / train "
            f"{w['test_over_train']:.3f} (standard error {w['standard_error']:.3f}) and {noisy['test_over_train']:.3f} "
            f"({noisy['standard_error']:.3f}) on the noisy half") in text


def test_the_study_counts_in_the_prose_follow_the_design_runs(root):
    import mnist_ddpm
    text = flowing(root, "REPORT.md")
    stems = [stem for stem, _ in mnist_ddpm.DESIGN_RUNS]
    averages = [stem for stem in stems if "ema_0.999" in stem]  # slower averages of a run's weights, not trainings
    after = len(stems) - 1 - stems.index(mnist_ddpm.REFERENCE_RUN)
    # the trainings that kept them: an average's evaluation records its run (seed, epochs, seconds, final loss)
    folder = os.path.join(root, "figures", "mnist_study")
    averaged = {tuple(sorted(ev["model"].items())) for stem in averages
                for ev, _ in scored_entries(folder, stem)}
    assert f"The {NUMBER_WORDS[after]} models after the reference" in text
    trainings = NUMBER_WORDS[len(stems) - len(averages)].capitalize()
    assert (f"{trainings} different trainings (22 to 80 epochs), with the slower averages "
            f"kept for {NUMBER_WORDS[len(averaged)]} of them, {len(stems)} "
            f"models in all") in text
    assert f"{len(stems)} models of the study does at one seed or both" in text
    readme = flowing(root, "README.md")
    plain = len([stem for stem in stems if not stem.startswith("model_guidance")])  # on the plain target
    assert f"the only one of the design study's {len(stems)} models" in readme
    assert f"the best of the {plain} models trained without model guidance" in readme
    assert f"none of {plain} reaches 98.7% at both seeds" in text


def test_the_second_training_of_the_two_layer_embedding_is_reported_from_its_evaluations(root):
    import mnist_ddpm
    text = flowing(root, "REPORT.md")
    folder = os.path.join(root, "figures", "mnist_study")
    scores = functools.partial(printed_scores, folder)
    first, first_slow = "embedding_layers_2_min_snr_1_lr_2e-3_p_uncond_0.05_40_epochs", "embedding_layers_2_ema_0.9998_40_epochs"
    second, second_slow = "embedding_layers_2_seed_1_40_epochs", "embedding_layers_2_ema_0.9998_seed_1_40_epochs"
    (a0, f0), (a1, f1) = scores(second)
    (b0, g0), (b1, g1) = scores(second_slow)
    assert (f"its 0.999 average reads {a0} and {a1} as asked (seeds 0 and 1) at {f0} and {f1} times the Frechet "
            f"floor, and its 0.9998 average {b0} and {b1} at {g0} and {g1}") in text
    (c0, _), (c1, _) = scores(first)
    (d0, _), (d1, _) = scores(first_slow)
    assert (f"Against the first training that is {gap(a0, c0)} and {gap(a1, c1)} points, and {gap(b0, d0)} and "
            f"{gap(b1, d1)} for the 0.9998 averages") in text

    def pooled(*stems):  # over the trainings and both sampling seeds
        return as_asked([pair for stem in stems for pair in scored_entries(folder, stem)])

    reference = pooled(mnist_ddpm.REFERENCE_RUN, "min_snr_1_lr_2e-3_p_uncond_0.05_40_epochs_seed_1")
    assert (f"the 0.999 averages of the two-layer embedding read {pooled(first, second)}%, as those of the "
            f"reference recipe do ({reference}%); its 0.9998 averages read {pooled(first_slow, second_slow)}%, "
            f"against {pooled('ema_0.9998_40_epochs')}% for the one training of the reference recipe that kept "
            f"that average") in text
    # two more sampling seeds for the two trainings' 0.9998 averages and the reference model, from the same noise
    models = [scored_entries(folder, stem, range(4)) for stem in (first_slow, second_slow, mnist_ddpm.REFERENCE_RUN)]
    real = [{round(1000 * ev["real_test_accuracy"]) for ev, _ in at_seed} for at_seed in zip(*models)]
    assert all(len(digits) == 1 for digits in real)  # the same real digits at each seed
    (a2, a3), (b2, b3), (c2, c3) = ([f"{100 * e['accuracy']:.1f}%" for _, e in m[2:]] for m in models)
    assert (f"At seeds 2 and 3 the first training's 0.9998 average reads {a2} and {a3} as asked, the second training's "
            f"{b2} and {b3}, and the reference model {c2} and {c3}, against real test digits read at "
            f"{real[2].pop() / 10:.1f}% and {real[3].pop() / 10:.1f}%") in text
    means = [as_asked(m) for m in models]
    assert (f"they read {means[0]}%, {means[1]}% and {means[2]}%: the two trainings of the recipe "
            f"are {abs(means[0] - means[1]):.1f} points apart") in text
    assert f"the recipe reads {as_asked(models[0] + models[1])}% over its eight evaluations" in text
    right = [[round(1000 * e["accuracy"]) for _, e in m] for m in models]  # samples of 1,000 at each seed
    leads = [(a - c) / 10 for a, c in zip(right[0], right[2])]
    ahead = sum(b > c for b, c in zip(right[1], right[2]))
    assert min(leads) > 0 and (f"ahead of the reference model at all four seeds (by {min(leads):.1f} to {max(leads):.1f} "
                               f"points), its second at {NUMBER_WORDS[ahead]}") in text
    # misreads shared with the first training and with the reference model, from the same noise
    points = mnist_ddpm.design_points(folder)
    runs = [stem for stem, _ in mnist_ddpm.DESIGN_RUNS]
    new, old, ship = (points[runs.index(stem)] for stem in (second, first, mnist_ddpm.REFERENCE_RUN))
    assert (f"Of the 0.999 average's {len(new[0].misread)} and {len(new[1].misread)} misreads, "
            f"{len(new[0].misread & old[0].misread)} and {len(new[1].misread & old[1].misread)} are misreads of the "
            f"first training too (of its {len(old[0].misread)} and {len(old[1].misread)}), and "
            f"{len(new[0].misread & ship[0].misread)} and {len(new[1].misread & ship[1].misread)} the reference "
            f"model's") in text


def test_the_two_more_seeds_paragraph_reports_their_evaluations(root):
    # the default w at seeds 2 and 3, beside w = 0.2 and the reference model at its default
    import mnist_ddpm
    text = flowing(root, "REPORT.md")
    para = text[text.index("**Two more seeds.**"):]
    para = para[:para.index("**", len("**Two more seeds.**"))]
    for name, w in ((mnist_ddpm.SHIPPED_RUN, 0.0), ("shipped_guided", 0.25), ("shipped_guided", 0.2),
                    ("reference_w_0.3", 0.3)):
        (a2, f2), (a3, f3) = printed_scores(os.path.join(root, "figures", "mnist_study"), name, (2, 3), w)
        assert f"{a2} and {a3}" in para and f"{f2} and {f3} times the floor" in para, (name, w)
    # the shipped model over the four seeds, from its evaluations at seeds 0 to 3
    every = scored_entries(os.path.join(root, "figures", "mnist_study"), mnist_ddpm.SHIPPED_RUN, (0, 1, 2, 3))
    counts = [round(1000 * e["accuracy"]) for _, e in every]
    ratios = [e["frechet_distance"] / ev["frechet_floor_train_vs_test"] for ev, e in every]
    assert (f"reads {as_asked(every)}% as asked over the four seeds ({', '.join(map(str, counts[:-1]))} and "
            f"{counts[-1]} of 1000), at {sum(ratios) / 4:.2f} times the floor on average ({min(ratios):.2f} to "
            f"{max(ratios):.2f})") in para


PLAIN_TARGET_EVAL = "plain_target_guided"


def plain_target_model(root):
    """The training record of the plain-target model, shipped before the model-guidance run (its
    evaluation, written while it was checkpoints/mnist_T200.pt; the study's evaluations of the same
    weights, kept as a second average of another run, carry that run's record)."""
    with open(os.path.join(root, "figures", "mnist_study", f"{PLAIN_TARGET_EVAL}_eval.json")) as f:
        return json.load(f)["model"]


def test_the_plain_target_model_at_eight_seeds_is_reported_from_its_evaluations(root):
    # seeds 4 to 7 measure the plain-target model alone; with seeds 0 to 3 they give its pooled share
    import mnist_ddpm
    text = flowing(root, "REPORT.md")
    study, stem = os.path.join(root, "figures", "mnist_study"), mnist_ddpm.PLAIN_TARGET_RUN
    later = scored_entries(study, stem, (4, 5, 6, 7))
    (a4, f4), (a5, f5), (a6, f6), (a7, f7) = printed_scores(study, stem, (4, 5, 6, 7))
    real = [100 * ev["real_test_accuracy"] for ev, _ in later]
    assert (f"{a4}, {a5}, {a6} and {a7} read as asked, at {f4}, {f5}, {f6} and {f7} times the Frechet floor, "
            f"against real test digits read at {min(real):.1f}% to {max(real):.1f}% there") in text
    every = scored_entries(study, PLAIN_TARGET_EVAL) + scored_entries(study, stem, (2, 3)) + later
    share = as_asked(every)
    error = 100 * math.sqrt(float(share) / 100 * (1 - float(share) / 100) / 8000)
    assert f"Over all eight seeds it reads {share}% (one standard error {error:.2f} points)" in text
    assert f"seeds 4 to 7 alone read {as_asked(later)}%" in text
    model = plain_target_model(root)
    assert all(ev["model"] == model for ev, _ in later)  # that model itself
    # the target at a seed: one point below the classifier's share of the real test digits drawn there
    met = [seed for seed, (ev, e) in enumerate(every)
           if round(1000 * e["accuracy"]) >= round(1000 * ev["real_test_accuracy"]) - 10]
    assert f"which it meets at {NUMBER_WORDS[len(met)]} of the eight ({' and '.join(map(str, met))})" in text


def test_the_clip_sentences_report_their_evaluations(root):
    # the plain-target model without guidance, with and without the clip of x0_hat, from the same noise
    import mnist_ddpm
    text = flowing(root, "REPORT.md")
    free = scored_entries(os.path.join(root, "figures", "mnist_study"), "shipped_no_clip")
    clipped = scored_entries(os.path.join(root, "figures", "mnist_study"), PLAIN_TARGET_EVAL)
    for (ev, e), (ev_c, e_c) in zip(free, clipped):
        assert ev["clip_x0"] is False and "clip_x0" not in ev_c  # unclipped against the default
        assert ev["model"] == ev_c["model"] == plain_target_model(root)
        assert matching(ev, 0.0) == [e] and ev["seed"] == ev_c["seed"]
        assert max(len(e["misread"]), len(e_c["misread"])) < mnist_ddpm.MISREAD_KEPT  # all of them kept
    shares, ratios = zip(*printed(free + clipped))
    misread = [{m["index"]: m["read"] for m in e["misread"]} for _, e in free + clipped]
    shared = [misread[seed].keys() & misread[2 + seed].keys() for seed in (0, 1)]
    assert all(misread[seed][i] == misread[2 + seed][i] for seed in (0, 1) for i in shared[seed])  # same wrong digit
    assert (f"the plain-target model reads {shares[0]} and {shares[1]} as asked, at {ratios[0]} and {ratios[1]} "
            f"times the Frechet floor (`figures/mnist_study/shipped_no_clip_eval{{,_seed1}}.json`; {ratios[2]} and "
            f"{ratios[3]} with the clip). From the same noise, {len(shared[0])} of its {len(misread[0])} misreads at "
            f"seed 0 and {len(shared[1])} of its {len(misread[1])} at seed 1 are samples it misreads with the clip too "
            f"(of {len(misread[2])} and {len(misread[3])}), each read as the same wrong digit") in text
    most = max(abs(round(1000 * e["accuracy"]) - round(1000 * e_c["accuracy"])) for (_, e), (_, e_c) in zip(free, clipped))
    assert f"share read as asked without guidance by at most {most / 10:.1f} points" in text
    readme = flowing(root, "README.md")
    assert (f"reads {shares[0]} and {shares[1]} as asked at seeds 0 and 1, against {shares[2]} and "
            f"{shares[3]} with the clip") in readme


def test_the_sampler_step_sentence_reports_its_evaluations(root):
    # the plain-target model without guidance, strided DDPM over 100 and 50 of its 200 steps
    text = flowing(root, "REPORT.md")
    shares, entries, model = {}, {}, plain_target_model(root)
    for steps in (100, 50, 200):
        stem = PLAIN_TARGET_EVAL if steps == 200 else f"shipped_ddpm_{steps}_steps"
        entries[steps] = scored_entries(os.path.join(root, "figures", "mnist_study"), stem, steps=steps)
        for seed, (ev, e) in enumerate(entries[steps]):
            assert ev["model"] == model and matching(ev, 0.0, steps) == [e]  # that one run
            shares[steps, seed] = f"{100 * e['accuracy']:.1f}%"
    assert (f"over 100 and over 50 of its 200 steps reads {shares[100, 0]} and {shares[100, 1]}, and "
            f"{shares[50, 0]} and {shares[50, 1]} as asked (seeds 0 and 1; "
            f"`figures/mnist_study/shipped_ddpm_{{100,50}}_steps_eval{{,_seed1}}.json`), against "
            f"{shares[200, 0]} and {shares[200, 1]} over all 200") in text
    pooled = [as_asked(entries[steps]) for steps in (50, 100, 200)]
    assert f"that is {pooled[0]}%, {pooled[1]}% and {pooled[2]}% for 50, 100 and 200 steps" in text
    steps_up = sorted(float(b - a) for a, b in zip(pooled, pooled[1:]))
    assert f"if anything {steps_up[0]:.2f} to {steps_up[1]:.2f} points per doubling" in text
