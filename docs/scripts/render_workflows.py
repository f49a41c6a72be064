"""Pictures of the shipped workflows, drawn from their JSON the way LiteGraph lays them out.

    python docs/scripts/render_workflows.py        # writes docs/images/workflow-*.png

A render, not a ComfyUI screenshot: node boxes with title bars at the saved positions and sizes
(never smaller than LiteGraph draws them), input and output sockets, every widget with its saved
value, links as LiteGraph's curves coloured by type, notes with their text. Geometry and node
definitions come from tests/workflow_graph.py, the module the workflow tests check; fonts and
colours are close to ComfyUI's dark theme, not pixel-exact. Needs Pillow and matplotlib (its font).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
import workflow_graph as graph  # noqa: E402
from conftest import load_pack  # noqa: E402

OUT = REPO / "docs" / "images"
SUPERSAMPLE = 2
MARGIN = 24
BACKGROUND, GRID = "#202020", "#262626"
TITLE_BG, BODY_BG, TITLE_TEXT = "#333333", "#353535", "#c8c8c8"
WIDGET_BG, WIDGET_OUTLINE, LABEL, VALUE = "#222222", "#666666", "#999999", "#dddddd"
SLOT_TEXT = "#aaaaaa"
TYPE_COLOURS = {"MODEL": "#b39ddb", "CLIP": "#ffd500", "VAE": "#ff6e6e", "CONDITIONING": "#ffa931",
                "LATENT": "#ff9cf9", "IMAGE": "#64b5f6", "MASK": "#81c784"}
OTHER_TYPE = "#99aa99"  # LiteGraph's link colour for types without one of their own (INFDIT_*)


def font(size):
    # DejaVu Sans (shipped with matplotlib) has every glyph the workflows use, Pillow's default not all.
    from matplotlib import font_manager
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size * SUPERSAMPLE)


class Canvas:
    """Graph coordinates in, supersampled pixels out."""

    def __init__(self, bounds):
        self.x0, self.y0 = bounds[0] - MARGIN, bounds[1] - MARGIN
        size = (round((bounds[2] - bounds[0] + 2 * MARGIN) * SUPERSAMPLE),
                round((bounds[3] - bounds[1] + 2 * MARGIN) * SUPERSAMPLE))
        self.image = Image.new("RGB", size, BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.fonts = {n: font(n) for n in (12, 14)}
        for gx in range(0, size[0], 100 * SUPERSAMPLE):
            self.draw.line([(gx, 0), (gx, size[1])], fill=GRID, width=SUPERSAMPLE)
        for gy in range(0, size[1], 100 * SUPERSAMPLE):
            self.draw.line([(0, gy), (size[0], gy)], fill=GRID, width=SUPERSAMPLE)

    def p(self, x, y):
        return (x - self.x0) * SUPERSAMPLE, (y - self.y0) * SUPERSAMPLE

    def rect(self, x0, y0, x1, y1, fill, outline=None, radius=6):
        self.draw.rounded_rectangle([*self.p(x0, y0), *self.p(x1, y1)], radius=radius * SUPERSAMPLE, fill=fill,
                                    outline=outline, width=SUPERSAMPLE)

    def text(self, x, y, s, colour, size=12, anchor="lm"):
        self.draw.text(self.p(x, y), s, fill=colour, font=self.fonts[size], anchor=anchor)

    def width(self, s, size=12):
        return self.draw.textlength(s, font=self.fonts[size]) / SUPERSAMPLE

    def triangle(self, x, y, pointing, fill):
        """LiteGraph's widget arrow: 6 px wide, 10 px tall, centred on (x, y)."""
        tip = x + 3 * pointing
        self.draw.polygon([self.p(tip, y), self.p(tip - 6 * pointing, y - 5), self.p(tip - 6 * pointing, y + 5)],
                          fill=fill)

    def circle(self, x, y, r, fill):
        cx, cy = self.p(x, y)
        r *= SUPERSAMPLE
        self.draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)

    def curve(self, a, b, colour):
        """LiteGraph's link: a cubic Bezier leaving and entering horizontally."""
        dist = 0.25 * ((b[0] - a[0]) ** 2 + (b[1] - a[1]) ** 2) ** 0.5
        c1, c2 = (a[0] + dist, a[1]), (b[0] - dist, b[1])
        points = []
        for i in range(41):
            t = i / 40
            x = (1 - t) ** 3 * a[0] + 3 * (1 - t) ** 2 * t * c1[0] + 3 * (1 - t) * t ** 2 * c2[0] + t ** 3 * b[0]
            y = (1 - t) ** 3 * a[1] + 3 * (1 - t) ** 2 * t * c1[1] + 3 * (1 - t) * t ** 2 * c2[1] + t ** 3 * b[1]
            points.append(self.p(x, y))
        self.draw.line(points, fill=colour, width=3 * SUPERSAMPLE, joint="curve")


def socket_pos(node, index, is_input):
    # LGraphNode.getConnectionPos: half a slot in from the edge, 0.7 of a slot down per row.
    x = node["pos"][0] + (10 if is_input else node["size"][0] - 10)
    return x, node["pos"][1] + (index + 0.7) * graph.SLOT_HEIGHT


def wrap(canvas, text, room):
    """Lines of `text` (paragraphs kept) no wider than `room`, as a textarea wraps them."""
    lines = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}" if line else word
            if line and canvas.width(trial) > room:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def fit(canvas, s, room, size=12):
    if canvas.width(s, size) <= room:
        return s
    while s and canvas.width(s + "…", size) > room:
        s = s[:-1]
    return s + "…"


def draw_widget(canvas, x, y, w, label, kind, options, value):
    left, right = x + 15, x + w - 15
    if kind == "STRING" and options.get("multiline"):
        height = graph.MULTILINE_HEIGHT
        canvas.rect(left, y, right, y + height, WIDGET_BG, WIDGET_OUTLINE, radius=4)
        for i, line in enumerate(wrap(canvas, str(value), right - left - 12)[:3]):
            canvas.text(left + 6, y + 10 + 15 * i, fit(canvas, line, right - left - 12), VALUE)
        return height
    h = graph.WIDGET_HEIGHT
    canvas.rect(left, y, right, y + h, WIDGET_BG, WIDGET_OUTLINE, radius=h // 2)
    mid = y + h / 2
    if kind == "UPLOAD":
        canvas.text((left + right) / 2, mid, "choose file to upload", VALUE, anchor="mm")
        return h
    arrows = isinstance(kind, list) or kind in ("INT", "FLOAT", "CONTROL")
    if arrows:
        canvas.triangle(left + 9, mid, -1, VALUE)
        canvas.triangle(right - 9, mid, 1, VALUE)
    if kind == "BOOLEAN":
        canvas.circle(right - 12, mid, 5, "#89a" if value else "#555")
    inner_l, inner_r = left + (18 if arrows else 10), right - (18 if arrows else (24 if kind == "BOOLEAN" else 10))
    shown = graph.format_value(kind, value)
    value_w = canvas.width(shown)
    canvas.text(inner_r, mid, fit(canvas, shown, inner_r - inner_l), VALUE, anchor="rm")
    canvas.text(inner_l, mid, fit(canvas, label, max(0, inner_r - inner_l - value_w - 10)), LABEL)
    return h


def draw_node(canvas, pack, node):
    x0, y0, x1, y1 = graph.box(pack, node)
    x, y = node["pos"]
    w = x1 - x0
    is_note = node["type"] in ("Note", "MarkdownNote")
    canvas.rect(x0, y0, x1, y1, node.get("bgcolor", BODY_BG))
    canvas.rect(x0, y0, x1, y, node.get("color", TITLE_BG))
    canvas.rect(x0, y - 8, x1, y, node.get("bgcolor", BODY_BG), radius=0)  # square lower title corners
    canvas.circle(x0 + 15, y - graph.TITLE_HEIGHT / 2, 5, "#888888")
    canvas.text(x0 + 28, y - graph.TITLE_HEIGHT / 2, fit(canvas, graph.display_name(pack, node), w - 40, 14),
                TITLE_TEXT, 14)
    if is_note:
        canvas.rect(x + 8, y + 8, x1 - 8, y1 - 8, "#2a2117", radius=4)
        lines = wrap(canvas, node["widgets_values"][0], w - 34)
        for i, line in enumerate(lines[: int((y1 - y - 24) // 15)]):
            canvas.text(x + 16, y + 20 + 15 * i, line, VALUE)
        return
    inputs, outputs = graph.sockets(node)
    for i, slot in enumerate(inputs):
        sx, sy = socket_pos(node, i, True)
        colour = TYPE_COLOURS.get(slot["type"], OTHER_TYPE)
        canvas.circle(sx, sy, 5 if slot["link"] is not None else 3.5, colour)
        canvas.text(sx + 10, sy, slot["name"], SLOT_TEXT)
    for i, slot in enumerate(outputs):
        sx, sy = socket_pos(node, i, False)
        colour = TYPE_COLOURS.get(slot["type"], OTHER_TYPE)
        canvas.circle(sx, sy, 5 if slot.get("links") else 3.5, colour)
        canvas.text(sx - 10, sy, slot.get("label") or slot["name"], SLOT_TEXT, anchor="rm")
    wy = y + max(len(inputs), len(outputs), 1) * graph.SLOT_HEIGHT + 4
    for label, kind, options, value in graph.widgets(pack, node):
        wy += draw_widget(canvas, x, wy, w, label, kind, options, value) + graph.WIDGET_GAP
    if node["type"] == "LoadImage":
        canvas.rect(x + 15, wy + 4, x1 - 15, y1 - 10, "#2a2a2a", WIDGET_OUTLINE, radius=4)
        canvas.text((x + x1) / 2, (wy + y1) / 2, f"preview of {node['widgets_values'][0]}", LABEL, anchor="mm")


def render(pack, path: Path) -> Image.Image:
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    boxes = [graph.box(pack, n) for n in wf["nodes"]]
    canvas = Canvas((min(b[0] for b in boxes), min(b[1] for b in boxes),
                     max(b[2] for b in boxes), max(b[3] for b in boxes)))
    for _, src, src_slot, dst, dst_slot, kind in wf["links"]:
        # A link's target slot indexes the node's inputs; rows count only the drawn sockets.
        row = graph.sockets(nodes[dst])[0].index(nodes[dst]["inputs"][dst_slot])
        canvas.curve(socket_pos(nodes[src], src_slot, False), socket_pos(nodes[dst], row, True),
                     TYPE_COLOURS.get(kind, OTHER_TYPE))
    for node in sorted(wf["nodes"], key=lambda n: n["order"]):
        draw_node(canvas, pack, node)
    final = canvas.image.resize((canvas.image.width // SUPERSAMPLE, canvas.image.height // SUPERSAMPLE),
                                Image.LANCZOS)
    return final.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def slug(stem: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")


def main():
    pack = load_pack()
    OUT.mkdir(parents=True, exist_ok=True)
    for path in sorted((REPO / "example_workflows").glob("*.json")):
        target = OUT / f"workflow-{slug(path.stem)}.png"
        render(pack, path).save(target, optimize=True)
        print(f"{target.relative_to(REPO)}  ({target.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
