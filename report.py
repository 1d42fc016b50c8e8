"""Typeset REPORT.md as an A4 PDF (figures/report.pdf) with fpdf2.

    python visualize.py --task report        # the usual way
    python report.py [--source REPORT.md] [--out figures/report.pdf]

The Markdown subset the report uses, and how each part is set:
  # Title                     title block on the first page (with the paragraphs up to the first ##)
  ## Part                     a new page, a large heading and a PDF bookmark
  ### Section                 a smaller heading, kept with what follows
  paragraphs                  DejaVu Sans 9.5 pt, with **bold**, *italic*, `code` and [links](url)
  - items / 1. items          lists
  | a | b |                   tables (the first row is the header)
  ```                         code blocks, in a monospace font
  ![alt](path)                a figure at text width, or smaller where it would fall below
  *Figure N: caption*         150 ppi; the italic paragraph right after it is its caption, and
                              N must count the figures in order

The fonts are the DejaVu family that matplotlib ships, so the PDF needs nothing from the
system and every character of the text (Greek letters, arrows, <=) prints.
"""
import os
import re

import utils

MIN_PPI = 150  # figures are never enlarged beyond this many source pixels per inch
SHRINK = 0.85  # a figure may shrink to this share of its width to finish a page instead of starting one
BODY_PT, TABLE_PT, CAPTION_PT, CODE_PT = 9.5, 8.0, 8.5, 8.0
IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)\s*$")
CAPTION = re.compile(r"^\*Figure (\d+)[.:]\s*(.*)\*$", re.S)
# `code`, **bold**, *italic* (as in Markdown, a '*' glued to a word, as in eps*, opens nothing) and [links](url)
INLINE = re.compile(r"(`[^`]+`|\*\*[^*]+\*\*|(?<![\w*])\*[^*\s][^*]*(?<!\s)\*(?![\w*])|\[[^\]]+\]\([^)]+\))")


def parse(text):
    """Markdown text -> a list of blocks (kind, payload): ('title', str), ('h2', str), ('h3', str),
    ('para', str), ('list', [(marker, str)]), ('table', [[cells]]), ('code', str),
    ('image', (alt, path, caption or None, number or None))."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped or stripped.startswith("<!--"):
            i += 1
        elif stripped.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            blocks.append(("code", "\n".join(lines[i + 1:j])))
            i = j + 1
        elif re.match(r"^#{1,3} ", line):
            level = len(line) - len(line.lstrip("#"))
            blocks.append((("title", "h2", "h3")[level - 1], line[level:].strip()))
            i += 1
        elif stripped.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = [c.strip() for c in re.split(r"(?<!\\)\|", lines[i].strip().strip("|"))]
                if not all(re.fullmatch(r":?-{2,}:?", c) for c in cells):  # skip the |---| rule
                    rows.append([c.replace("\\|", "|") for c in cells])
                i += 1
            blocks.append(("table", rows))
        elif IMAGE.match(stripped):
            alt, path = IMAGE.match(stripped).groups()
            blocks.append(("image", (alt, path, None, None)))
            i += 1
        elif re.match(r"^(\s*)([-*]|\d+\.) ", line):
            items = []
            while i < len(lines) and lines[i].strip():
                m = re.match(r"^\s*([-*]|\d+\.) (.*)", lines[i])
                if m:
                    items.append([m.group(1), m.group(2)])
                else:  # a continuation line of the item above
                    items[-1][1] += " " + lines[i].strip()
                i += 1
            blocks.append(("list", [tuple(item) for item in items]))
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"^(#{1,3} |\||```|!\[|\s*([-*]|\d+\.) )", lines[i]):
                para.append(lines[i].strip())
                i += 1
            text_ = " ".join(para)
            caption = CAPTION.match(text_)
            if caption and blocks and blocks[-1][0] == "image" and blocks[-1][1][2] is None:
                alt, path, _, _ = blocks[-1][1]
                blocks[-1] = ("image", (alt, path, caption.group(2).strip(), int(caption.group(1))))
            else:
                blocks.append(("para", text_))
    return blocks


def name_parts(word):
    """A long path cut after each '/' and '_' outside braces: "a_b/{c,d_e}.json" -> "a_", "b/", "{c,d_e}.json"."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(word):
        depth += (ch == "{") - (ch == "}")
        if ch in "/_" and depth == 0:
            parts.append(word[start:i + 1])
            start = i + 1
    return parts + [word[start:]] if start < len(word) else parts


def plain(text):
    """Inline Markdown removed: for table cells and headings."""
    text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)
    return text.replace("**", "").replace("`", "").replace("\\|", "|")


def fit_widths(wanted, least, total):
    """Column widths that add up to `total` in proportion to `wanted`, except that none is
    below its `least`: those are held at it and the others share what is left."""
    if sum(least) >= total:  # no room beyond the longest words: share the width in their proportion
        return [total * m / sum(least) for m in least]
    held = [False] * len(wanted)
    while True:
        room = total - sum(m for m, h in zip(least, held) if h)
        share = sum(max(w, 1e-9) for w, h in zip(wanted, held) if not h)
        widths = [m if h else room * max(w, 1e-9) / share for w, m, h in zip(wanted, least, held)]
        short = [i for i, (w, m) in enumerate(zip(widths, least)) if w < m and not held[i]]
        if not short:
            return widths
        for i in short:
            held[i] = True


def render(source, out, locate=None, missing_hint=None):
    """Typeset the Markdown file `source` as the PDF `out` (written atomically). locate(path) gives
    the file of an image path (default: relative to the folder of `source`). A missing image
    raises a one-line UserError, naming the command that makes it when missing_hint(path) gives
    one. Returns {"pages": number of pages, "parts": {part heading: the page it starts on},
    "figures": [(path, placed width in mm, source pixels per inch as placed)]}."""
    from fpdf import FPDF
    from fpdf.fonts import FontFace
    from PIL import Image
    import matplotlib

    if not os.path.exists(source):
        raise utils.UserError(f"{source} not found: the report is typeset from it")
    with open(source, encoding="utf-8") as f:
        blocks = parse(f.read())
    folder = os.path.dirname(os.path.abspath(source))
    locate = locate or (lambda path: os.path.join(folder, path))
    figures = [b[1] for b in blocks if b[0] == "image"]
    for k, (alt, path, caption, number) in enumerate(figures, 1):
        if not os.path.exists(locate(path)):
            hint = missing_hint(path) if missing_hint else None
            raise utils.UserError(f"the report needs {path}, which does not exist" + (f"; make it with `{hint}`" if hint else ""))
        if number is not None and number != k:
            raise utils.UserError(f"{source}: the caption of figure {k} ({path}) is numbered {number}")

    fonts = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")

    class Report(FPDF):
        def footer(self):
            if self.page_no() > 1:
                self.set_y(-12)
                self.set_font("Sans", "", 8)
                self.set_text_color(110)
                self.cell(0, 5, f"{self.page_no()} / {{nb}}", align="C")
                self.set_text_color(0)

    pdf = Report(format="A4", unit="mm")
    pdf.set_margins(20, 18, 20)
    pdf.set_auto_page_break(True, margin=18)
    for style, name in (("", "DejaVuSans.ttf"), ("B", "DejaVuSans-Bold.ttf"), ("I", "DejaVuSans-Oblique.ttf"),
                        ("BI", "DejaVuSans-BoldOblique.ttf")):
        pdf.add_font("Sans", style, os.path.join(fonts, name))
    pdf.add_font("Mono", "", os.path.join(fonts, "DejaVuSansMono.ttf"))
    pdf.set_title(next((b[1] for b in blocks if b[0] == "title"), os.path.basename(source)))
    pdf.add_page()
    line_h = BODY_PT * 0.3528 * 1.45  # mm per line of body text

    def write_code(code, h, size, lead="", style=""):
        """Inline code word by word: a path, flag or command that does not fit in what is left of the
        line starts the next one instead of being cut at the margin ("--preci" / "sion"), which would
        also break it when copied; one longer than a whole line breaks between the parts of its name.
        `lead`, an opening bracket of the text before it, goes to the new line with the first word.
        fpdf keeps a cell margin clear at each end of a line."""
        line = pdf.epw - 2 * pdf.c_margin
        pdf.set_font("Sans", style, size)
        lead_width = pdf.get_string_width(lead)
        pdf.set_font("Mono", "", size * 0.92)
        for k, word in enumerate(code.replace("\\|", "|").split(" ")):
            if k:
                pdf.write(h, " ")
            for part in name_parts(word) if pdf.get_string_width(word) > line else [word]:
                room = pdf.w - pdf.r_margin - pdf.get_x() - 2 * pdf.c_margin
                if room < lead_width + pdf.get_string_width(part) <= line:
                    pdf.ln(h)
                if lead:
                    pdf.set_font("Sans", style, size)
                    pdf.write(h, lead)
                    pdf.set_font("Mono", "", size * 0.92)
                    lead, lead_width = "", 0
                pdf.write(h, part)

    def write_inline(text, size=BODY_PT, style="", height=None):
        """Flowing text with **bold**, *italic*, `code` and [links](url), wrapped at the margin."""
        h = height or size * 0.3528 * 1.45
        pieces = [piece for piece in INLINE.split(text) if piece]
        lead = ""
        for i, piece in enumerate(pieces):
            link = ""
            if piece.startswith("`"):
                write_code(piece[1:-1], h, size, lead, style)
                lead = ""
                continue
            elif piece.startswith("**"):
                pdf.set_font("Sans", "B" + style.replace("B", ""), size)
                piece = piece[2:-2]
            elif piece.startswith("*") and piece.endswith("*") and len(piece) > 2:
                pdf.set_font("Sans", "I" + style.replace("I", ""), size)
                piece = piece[1:-1]
            elif piece.startswith("["):
                label, target = re.match(r"\[([^\]]+)\]\(([^)]+)\)", piece).groups()
                piece = plain(label)
                link = target if re.match(r"https?://", target) else ""
                pdf.set_font("Sans", style, size)
            else:
                pdf.set_font("Sans", style, size)
                if piece.endswith("(") and i + 1 < len(pieces) and pieces[i + 1].startswith("`"):
                    piece, lead = piece[:-1], "("  # the bracket stays on the line of the code it opens
            if piece:
                pdf.write(h, piece.replace("\\|", "|"), link)
        pdf.set_font("Sans", style, size)

    def paragraph(text, size=BODY_PT, style="", after=2.2):
        write_inline(text, size, style)
        pdf.ln(size * 0.3528 * 1.45 + after)

    def heading(text, size, before, after):
        if pdf.get_y() + 30 > pdf.h - pdf.b_margin:  # keep a heading with what follows
            pdf.add_page()
        pdf.ln(before)
        pdf.set_font("Sans", "B", size)
        pdf.multi_cell(0, size * 0.3528 * 1.25, plain(text), align="L", new_x="LMARGIN", new_y="NEXT")
        pdf.ln(after)

    def table(rows):
        ncol = max(len(r) for r in rows)
        rows = [r + [""] * (ncol - len(r)) for r in rows]
        # room for the longest body cell on one line, and for the header on about two (in
        # characters); then no column narrower than its longest word (in mm, header in bold)
        wanted = [min(40, max(4, len(plain(rows[0][c])) / 2, *(len(plain(r[c])) for r in rows[1:])))
                  for c in range(ncol)]
        longest = []
        for c in range(ncol):
            words = []
            for i, r in enumerate(rows):
                pdf.set_font("Sans", "B" if i == 0 else "", TABLE_PT)
                words += [pdf.get_string_width(word) for word in plain(r[c]).split()]
            longest.append(max(words, default=0) + 2 * 0.8 + 0.5)  # cell padding both sides, and a margin
        widths = fit_widths(wanted, longest, pdf.epw)
        pdf.set_font("Sans", "", TABLE_PT)
        with pdf.table(col_widths=widths, width=pdf.epw, line_height=TABLE_PT * 0.3528 * 1.5,
                       headings_style=FontFace(emphasis="BOLD", fill_color=(232, 236, 242)),
                       borders_layout="HORIZONTAL_LINES", text_align="LEFT", padding=0.8) as t:
            for r in rows:
                row = t.row()
                for cell in r:
                    row.cell(plain(cell))
        pdf.set_font("Sans", "", BODY_PT)
        pdf.ln(3)

    def figure(path, caption, number):
        full = locate(path)
        with Image.open(full) as im:
            px_w, px_h = im.size
        w = min(pdf.epw, px_w / MIN_PPI * 25.4)
        caption_text = f"Figure {number}: {caption}" if caption else f"Figure {number}"
        pdf.set_font("Sans", "I", CAPTION_PT)
        caption_h = len(pdf.multi_cell(pdf.epw, CAPTION_PT * 0.3528 * 1.4, caption_text, dry_run=True,
                                       output="LINES")) * CAPTION_PT * 0.3528 * 1.4
        room = pdf.h - pdf.b_margin - pdf.t_margin - caption_h - 4  # a whole page
        h = w * px_h / px_w
        if h > room:  # taller than a page: shrink to fit one
            w, h = w * room / h, room
        left = pdf.h - pdf.b_margin - pdf.get_y() - caption_h - 2  # what is left of this page
        if h > left:
            if left >= SHRINK * h:  # slightly smaller, rather than a half-empty page
                w, h = w * left / h, left
            else:
                pdf.add_page()
        pdf.image(full, x=pdf.l_margin + (pdf.epw - w) / 2, y=pdf.get_y(), w=w, h=h)
        placed.append((path, w, px_w / (w / 25.4)))
        pdf.set_y(pdf.get_y() + h + 1.5)
        pdf.set_font("Sans", "I", CAPTION_PT)
        pdf.multi_cell(pdf.epw, CAPTION_PT * 0.3528 * 1.4, caption_text, align="L", new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Sans", "", BODY_PT)
        pdf.ln(4)

    number, seen_part, parts, placed = 0, False, [], []
    for kind, payload in blocks:
        if kind == "title":
            pdf.set_font("Sans", "B", 20)
            pdf.multi_cell(0, 9, plain(payload), align="L", new_x="LMARGIN", new_y="NEXT")
            pdf.set_draw_color(60)
            pdf.line(pdf.l_margin, pdf.get_y() + 1.5, pdf.l_margin + pdf.epw, pdf.get_y() + 1.5)
            pdf.ln(5)
        elif kind == "h2":
            if seen_part or pdf.get_y() > pdf.t_margin + 1:
                pdf.add_page()
            seen_part = True
            parts.append((plain(payload), pdf.page_no()))
            pdf.start_section(plain(payload), level=0)
            heading(payload, 15, 0, 2.5)
        elif kind == "h3":
            pdf.start_section(plain(payload), level=1)
            heading(payload, 11.5, 2.5, 1.5)
        elif kind == "para":
            paragraph(payload)
        elif kind == "list":
            for marker, text in payload:
                pdf.set_font("Sans", "", BODY_PT)
                pdf.set_x(pdf.l_margin + 2)
                pdf.cell(5, line_h, "•" if marker in "-*" else marker)
                left = pdf.l_margin
                pdf.set_left_margin(left + 7)
                write_inline(text)
                pdf.set_left_margin(left)
                pdf.ln(line_h + 0.8)
            pdf.ln(1.5)
        elif kind == "table":
            table(payload)
        elif kind == "code":
            pdf.set_font("Mono", "", CODE_PT)
            pdf.set_fill_color(244, 244, 244)
            pdf.multi_cell(0, CODE_PT * 0.3528 * 1.35, payload, fill=True, align="L", new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2.5)
        elif kind == "image":
            number += 1
            alt, path, caption, _ = payload
            figure(path, caption or alt, number)
    utils.atomic_write(out, lambda tmp: pdf.output(tmp), suffix=".pdf")
    return {"pages": pdf.pages_count, "parts": dict(parts), "figures": placed}


def main(argv=None):
    p = utils.ArgumentParser(description=__doc__, formatter_class=utils.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="REPORT.md", help="the Markdown file to typeset (default REPORT.md)")
    p.add_argument("--out", default=os.path.join("figures", "report.pdf"), help="the PDF to write (default figures/report.pdf)")
    args = p.parse_args(argv)
    utils.ensure_writable_dir(args.out)
    import reproduce
    result = render(args.source, args.out, missing_hint=reproduce.maker)
    print(f"wrote {args.out} ({result['pages']} pages)")


if __name__ == "__main__":
    utils.run_main(main)
