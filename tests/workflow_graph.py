"""How ComfyUI's front end reads a shipped UI-format workflow (version 0.4): the node definitions
(ours from the pack, core ones as ComfyUI v0.3.64's /object_info has them, combo option lists
trimmed to a few real entries), the order of `widgets_values`, and the LiteGraph box each node is
drawn in. Shared by tests/test_workflows.py and docs/scripts/render_workflows.py.
"""
from __future__ import annotations

CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SEED = ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True})
SIZE = ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8})
RESIZE = ("INT", {"default": 512, "min": 0, "max": 16384, "step": 1})
CORE = {  # type: (ordered inputs, outputs)
    "CheckpointLoaderSimple": ({"ckpt_name": (["<file>"], {})}, ["MODEL", "CLIP", "VAE"]),
    "CLIPTextEncode": ({"text": ("STRING", {"multiline": True}), "clip": ("CLIP", {})}, ["CONDITIONING"]),
    "EmptyLatentImage": ({"width": SIZE, "height": SIZE, "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})},
                         ["LATENT"]),
    "KSampler": ({"model": ("MODEL", {}), "seed": SEED, "steps": ("INT", {"min": 1, "max": 10000}),
                  "cfg": ("FLOAT", {"min": 0.0, "max": 100.0}),
                  "sampler_name": (["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde"], {}),
                  "scheduler": (["normal", "karras", "exponential", "simple", "sgm_uniform"], {}),
                  "positive": ("CONDITIONING", {}), "negative": ("CONDITIONING", {}), "latent_image": ("LATENT", {}),
                  "denoise": ("FLOAT", {"min": 0.0, "max": 1.0})}, ["LATENT"]),
    "VAEDecode": ({"samples": ("LATENT", {}), "vae": ("VAE", {})}, ["IMAGE"]),
    "VAEEncode": ({"pixels": ("IMAGE", {}), "vae": ("VAE", {})}, ["LATENT"]),
    "ImageScale": ({"image": ("IMAGE", {}),
                    "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], {}),
                    "width": RESIZE, "height": RESIZE, "crop": (["disabled", "center"], {})}, ["IMAGE"]),
    "SaveImage": ({"images": ("IMAGE", {}), "filename_prefix": ("STRING", {})}, []),
    "PreviewImage": ({"images": ("IMAGE", {})}, []),
    "LoadImage": ({"image": (["<file>"], {"image_upload": True})}, ["IMAGE", "MASK"]),
}
DISPLAY_NAMES = {"CheckpointLoaderSimple": "Load Checkpoint", "CLIPTextEncode": "CLIP Text Encode (Prompt)",
                 "EmptyLatentImage": "Empty Latent Image", "KSampler": "KSampler", "VAEDecode": "VAE Decode",
                 "VAEEncode": "VAE Encode", "ImageScale": "Upscale Image", "SaveImage": "Save Image",
                 "PreviewImage": "Preview Image", "LoadImage": "Load Image", "Note": "Note"}
IMAGE_NODES = {"LoadImage", "SaveImage", "PreviewImage"}  # draw an image below their widgets

# LiteGraph's geometry (litegraph.js: NODE_TITLE_HEIGHT, NODE_SLOT_HEIGHT, NODE_WIDGET_HEIGHT and
# LGraphNode.computeSize): `pos` is the top-left of the body, the title bar sits above it.
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 20
WIDGET_GAP = 4
MULTILINE_HEIGHT = 60  # the smallest a multiline text box is drawn
CHAR_WIDTH = 7  # an upper bound for the 12-px sans-serif of widget labels and values
TITLE_CHAR_WIDTH = 8  # the 14-px title font


def definition(pack, node_type):
    """(ordered {name: (type, options)}, output types) as ComfyUI's /object_info has them."""
    if node_type in pack.NODE_CLASS_MAPPINGS:
        cls = pack.NODE_CLASS_MAPPINGS[node_type]
        spec = cls.INPUT_TYPES()
        return {**spec.get("required", {}), **spec.get("optional", {})}, list(cls.RETURN_TYPES)
    return CORE[node_type]


def display_name(pack, node):
    if node.get("title"):
        return node["title"]
    return pack.NODE_DISPLAY_NAME_MAPPINGS.get(node["type"]) or DISPLAY_NAMES.get(node["type"], node["type"])


def widget_slots(pack, node_type):
    """[(input name or None for an extra control value, type, options)] in widgets_values order:
    the widget inputs of required then optional, a control value after control_after_generate
    (or an INT named seed/noise_seed), an upload value after an image_upload combo."""
    if node_type in ("Note", "MarkdownNote"):
        return [("text", "STRING", {"multiline": True})]
    inputs, _ = definition(pack, node_type)
    slots = []
    for name, (kind, options) in inputs.items():
        if isinstance(kind, list) or (kind in WIDGET_TYPES and not options.get("forceInput")):
            slots.append((name, kind, options))
            if options.get("control_after_generate") or (kind == "INT" and name in ("seed", "noise_seed")):
                slots.append(("control_after_generate", "CONTROL", {}))
            if options.get("image_upload"):
                slots.append(("upload", "UPLOAD", {}))
    return slots


def widgets(pack, node):
    """[(label, type, options, value)] of a node's widgets, in the order they are drawn."""
    return [(name, kind, options, value)
            for (name, kind, options), value in zip(widget_slots(pack, node["type"]), node.get("widgets_values", []))]


def sockets(node):
    """(input sockets, outputs) as drawn: inputs converted from widgets carry {"widget"} and are not rows."""
    return [i for i in node.get("inputs", []) if "widget" not in i], node.get("outputs", [])


def widget_height(kind, options):
    return (MULTILINE_HEIGHT if kind == "STRING" and options.get("multiline") else WIDGET_HEIGHT) + WIDGET_GAP


def min_height(pack, node):
    """The body height LiteGraph's computeSize gives the node: one slot row per input socket or output
    (the larger), then the widgets; a node saved smaller is drawn this tall."""
    if node["type"] in ("Note", "MarkdownNote"):
        return MULTILINE_HEIGHT
    inputs, outputs = sockets(node)
    height = max(len(inputs), len(outputs), 1) * SLOT_HEIGHT
    drawn = widgets(pack, node)
    if drawn:
        height += sum(widget_height(kind, options) for _, kind, options, _ in drawn) + 8
    return height + 6


def min_width(pack, node):
    """The narrowest body in which the title and every one-line widget's label and value fit unclipped."""
    width = TITLE_CHAR_WIDTH * len(display_name(pack, node)) + 40
    for label, kind, options, value in widgets(pack, node):
        if kind in ("CONTROL", "UPLOAD") or (kind == "STRING" and options.get("multiline")):
            continue
        width = max(width, CHAR_WIDTH * (len(label) + len(format_value(kind, value))) + 60)
    return width


def format_value(kind, value):
    if kind == "BOOLEAN":
        return "true" if value else "false"
    if kind == "FLOAT":
        return f"{value:.2f}"
    return str(value)


def box(pack, node):
    """(x0, y0, x1, y1) in graph coordinates, title bar included, at the size the node is drawn."""
    (x, y), (w, h) = node["pos"], node["size"]
    if node["type"] not in FRONTEND_ONLY:
        h = max(h, min_height(pack, node))
    return x, y - TITLE_HEIGHT, x + w, y + h
