"""Every shipped example workflow (UI format 0.4) is a graph ComfyUI can load and our nodes can run,
and it opens with every node readable: no node covers another, widgets are not clipped, and the
saved view shows the whole graph. Node definitions and LiteGraph's geometry: tests/workflow_graph.py.
"""
import json
import shutil

import pytest
import torch

import workflow_graph as graph
from conftest import REPO, load_pack
from workflow_graph import CONTROL_VALUES, CORE, FRONTEND_ONLY, WIDGET_TYPES

PACK = load_pack()
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
# Combos listing files in the user's folders: any file name is valid in a shipped workflow.
FILE_COMBOS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadImage", "image"),
               ("InfDiTModelLoader", "model_name"), ("InfDiTClipLoader", "clip_name")}
VIEW = (1600, 800)  # the canvas of a 1600-px wide browser window, below ComfyUI's menu bar


def definition(node_type):
    return graph.definition(PACK, node_type)


def widget_slots(node_type):
    return graph.widget_slots(PACK, node_type)


def check_widget(node_type, name, kind, options, value):
    where = f"{node_type}.{name}"
    if kind == "CONTROL":
        assert value in CONTROL_VALUES, f"{node_type}: control value {value!r}"
    elif kind == "UPLOAD":
        assert value == "image", f"{node_type}: upload value {value!r}"
    elif isinstance(kind, list):
        assert isinstance(value, str), where
        assert (node_type, name) in FILE_COMBOS or value in kind, f"{where}: {value!r} not in {kind}"
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    else:
        assert isinstance(value, (int, float) if kind == "FLOAT" else int) and not isinstance(value, bool), where
        assert options.get("min", value) <= value <= options.get("max", value), f"{where}: {value} out of range"


@pytest.fixture(params=WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def workflow(request):
    return json.loads(request.param.read_text()), request.param


UPSCALE = "Inf-DiT - Upscale an image 4x"
CHAIN = "Inf-DiT - 256 to 4096 in two 4x passes"
SDXL = "Inf-DiT - SDXL 1024 then 4x to 4096"
HIDIFFUSION = "Inf-DiT - SDXL with HiDiffusion 2048 then 2x to 4096"


def test_the_shipped_workflows_are_all_there():
    # The template browser titles a pack's templates by their file names.
    assert {p.stem for p in WORKFLOWS} == {UPSCALE, CHAIN, SDXL, HIDIFFUSION}
    for path in WORKFLOWS:
        assert path.with_suffix(".jpg").is_file(), f"{path.name} has no thumbnail"


def test_workflow_structure_and_links(workflow):
    wf, path = workflow
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    link_ids = [link[0] for link in wf["links"]]
    assert len(set(link_ids)) == len(link_ids) and wf["last_link_id"] >= max(link_ids)
    for link_id, src, slot, dst, tslot, kind in wf["links"]:
        out, inp = nodes[src]["outputs"][slot], nodes[dst]["inputs"][tslot]
        assert out["type"] == kind == inp["type"], f"{path.name}: link {link_id} type"
        assert link_id in (out["links"] or []) and inp["link"] == link_id, f"{path.name}: link {link_id} endpoints"
    referenced = {i["link"] for n in nodes.values() for i in n.get("inputs", []) if i["link"] is not None}
    referenced |= {lid for n in nodes.values() for o in n.get("outputs", []) for lid in (o["links"] or [])}
    assert referenced == set(link_ids), f"{path.name}: dangling link ids"


def test_workflow_nodes_and_widgets_match_definitions(workflow):
    wf, path = workflow
    for node in wf["nodes"]:
        node_type = node["type"]
        if node_type in FRONTEND_ONLY:
            if node_type in ("Note", "MarkdownNote"):
                assert [type(v) for v in node["widgets_values"]] == [str], f"{path.name}: {node_type} text"
            continue
        assert node_type in PACK.NODE_CLASS_MAPPINGS or node_type in CORE, f"{path.name}: unknown node {node_type}"
        inputs, outputs = definition(node_type)
        sockets = {name: kind for name, (kind, _) in inputs.items() if isinstance(kind, str) and kind not in WIDGET_TYPES}
        for inp in node.get("inputs", []):
            if "widget" not in inp:  # a socket; converted widgets carry {"widget": {"name"}}
                assert sockets.get(inp["name"]) == inp["type"], f"{path.name}: {node_type}.{inp['name']}"
        assert [o["type"] for o in node.get("outputs", [])] == outputs, f"{path.name}: {node_type} outputs"
        slots = widget_slots(node_type)
        values = node.get("widgets_values", [])
        assert len(values) == len(slots), f"{path.name}: {node_type} has {len(values)} widget values, expects {len(slots)}"
        for (name, kind, options), value in zip(slots, values):
            check_widget(node_type, name, kind, options, value)


def test_upscale_widgets_are_the_fixed_interface():
    for path in WORKFLOWS:
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "InfDiTUpscale" and path.stem != HIDIFFUSION:
                assert node["widgets_values"] == [4.0, 20, 0, "fixed", 0, True, "auto", "auto", "official", "auto"], \
                    path.name


# The widgets of version 0.2.0 (the last release), in their order: ComfyUI stores a node's widget
# values by position, so a workflow saved with 0.2.0 loads right only while these stay first.
WIDGETS_0_2_0 = {
    "InfDiTUpscale": ["scale", "steps", "seed", "control_after_generate", "block_batch", "lr_noise_init", "offload",
                      "resume"],
    "InfDiTMemoryPlan": ["width", "height", "scale", "steps", "block_batch", "offload"],
}


def test_workflows_saved_with_0_2_0_keep_their_values():
    for node_type, old in WIDGETS_0_2_0.items():
        names = [name for name, _, _ in widget_slots(node_type)]
        assert names[:len(old)] == old, f"{node_type}: new widgets must come after the old ones, got {names}"
    # A 0.2.0 upscale node's values, read by position: each lands in its own widget, and the new
    # widgets (sampler, fast) keep their defaults.
    saved = [2.0, 12, 7, "fixed", 3, False, "canvas", "off"]
    slots = widget_slots("InfDiTUpscale")
    values = dict(zip([name for name, _, _ in slots], saved))
    assert values == {"scale": 2.0, "steps": 12, "seed": 7, "control_after_generate": "fixed", "block_batch": 3,
                      "lr_noise_init": False, "offload": "canvas", "resume": "off"}
    assert [(name, options["default"]) for name, _, options in slots[len(saved):]] == [("sampler", "official"),
                                                                                      ("fast", "auto")]


# --- running a workflow's graph on the tiny model ----------------------------------------------


def image_scale(image, upscale_method, width, height, crop):
    """ComfyUI's Upscale Image, shape for shape: 'center' first crops the image to the target's aspect."""
    assert upscale_method in CORE["ImageScale"][0]["upscale_method"][0] and crop in ("disabled", "center")
    if crop == "center":
        h, w = image.shape[1:3]
        if w * height > h * width:  # too wide: keep the middle columns
            keep = round(h * width / height)
            image = image[:, :, (w - keep) // 2:(w - keep) // 2 + keep]
        else:
            keep = round(w * height / width)
            image = image[:, (h - keep) // 2:(h - keep) // 2 + keep]
    x = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(height, width), mode="bicubic", antialias=True)
    return x.movedim(1, -1).clamp(0, 1)


def execute(wf, images, overrides):
    """Runs a UI-format graph like ComfyUI would: LoadImage yields `images[file]`, SaveImage and
    PreviewImage collect their input, our nodes run with their widget values (`overrides` replaces
    some by name). Returns {node id: outputs}."""
    nodes = {n["id"]: n for n in wf["nodes"] if n["type"] not in FRONTEND_ONLY}
    links = {link[0]: link for link in wf["links"]}
    results = {}

    def run(node_id):
        if node_id not in results:
            node = nodes[node_id]
            kwargs = {name: value for (name, kind, _), value in zip(widget_slots(node["type"]), node["widgets_values"])
                      if kind not in ("CONTROL", "UPLOAD")}
            kwargs.update({k: v for k, v in overrides.items() if k in kwargs})
            for inp in node["inputs"]:
                if inp["link"] is not None:
                    _, src, slot, _, _, _ = links[inp["link"]]
                    kwargs[inp["name"]] = run(src)[slot]
            if node["type"] == "LoadImage":
                results[node_id] = (images[kwargs["image"]], None)
            elif node["type"] == "ImageScale":
                results[node_id] = (image_scale(**kwargs),)
            elif node["type"] in ("SaveImage", "PreviewImage"):
                results[node_id] = (kwargs["images"],)
            else:
                cls = PACK.NODE_CLASS_MAPPINGS[node["type"]]
                results[node_id] = getattr(cls(), cls.FUNCTION)(**kwargs)
        return results[node_id]

    for node_id in nodes:
        run(node_id)
    return results


def workflow_file(stem):
    return json.loads((REPO / "example_workflows" / f"{stem}.json").read_text())


def test_the_chain_reaches_the_size_it_promises_whatever_is_loaded():
    wf = workflow_file(CHAIN)
    nodes = {n["id"]: n for n in wf["nodes"]}
    feeds = {(link[1], link[3]) for link in wf["links"]}
    load = next(n for n in wf["nodes"] if n["type"] == "LoadImage")
    resize = next(n for n in wf["nodes"] if n["type"] == "ImageScale")
    first, second = (next(n for n in wf["nodes"] if n.get("title") == f"Inf-DiT 4x (pass {k})") for k in (1, 2))
    assert (load["id"], resize["id"]) in feeds and (resize["id"], first["id"]) in feeds
    assert (first["id"], second["id"]) in feeds
    assert [n["id"] for n in wf["nodes"] if (load["id"], n["id"]) in feeds] == [resize["id"]]
    assert resize["widgets_values"][1:] == [256, 256, "center"]
    assert 256 * first["widgets_values"][0] * second["widgets_values"][0] == 4096
    assert "256x256" in nodes[resize["id"]]["title"]


def test_iterative_4x_chain_runs(models_root, tmp_path, monkeypatch):
    wf = workflow_file(CHAIN)
    loader = next(n for n in wf["nodes"] if n["type"] == "InfDiTModelLoader")
    # The workflow's model file, played by the tiny model with a CLIP image tower inside.
    (tmp_path / "infdit").mkdir()
    shutil.copy(models_root / "infdit" / "tiny_with_clip.safetensors", tmp_path / "infdit" / loader["widgets_values"][0])
    monkeypatch.setenv("INFDIT_MODELS_DIR", str(tmp_path))
    # A loaded image of another size and aspect; the resize (made 6x4 here to keep the run small)
    # sets what the passes see.
    image = torch.rand(1, 9, 20, 3, generator=torch.Generator().manual_seed(0))
    results = execute(wf, {"example.png": image}, {"sampler": "heun", "steps": 2, "width": 6, "height": 4})

    by_title = {n.get("title"): n["id"] for n in wf["nodes"]}
    first, second = results[by_title["Inf-DiT 4x (pass 1)"]][0], results[by_title["Inf-DiT 4x (pass 2)"]][0]
    assert first.shape == (1, 16, 24, 3) and second.shape == (1, 64, 96, 3)
    saved = next(results[n["id"]][0] for n in wf["nodes"] if n["type"] == "SaveImage")
    assert saved is second and 0 <= second.min() and second.max() <= 1
    # Pass 2 starts from pass 1: its output, brought back down, still resembles pass 1.
    down = torch.nn.functional.interpolate(second.movedim(-1, 1), size=(16, 24), mode="area").movedim(1, -1)
    assert (down - first).abs().mean() < (down - first.flip(1)).abs().mean()


# --- how the workflows open in the front end ----------------------------------------------------


def overlaps(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_no_node_covers_another(workflow):
    wf, path = workflow
    boxes = [(node, graph.box(PACK, node)) for node in wf["nodes"]]
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            assert not overlaps(box_a, box_b), (
                f"{path.name}: {graph.display_name(PACK, a)} {box_a} and {graph.display_name(PACK, b)} {box_b} "
                "overlap (boxes include the 30-px title bar above pos, at the height LiteGraph draws)")


def test_nodes_are_saved_at_the_size_they_are_drawn(workflow):
    wf, path = workflow
    for node in wf["nodes"]:
        name, (w, h) = graph.display_name(PACK, node), node["size"]
        need_w, need_h = graph.min_width(PACK, node), graph.min_height(PACK, node)
        assert w >= need_w, f"{path.name}: {name} is {w} px wide, its title or a widget needs {need_w}"
        assert h >= need_h, f"{path.name}: {name} is saved {h} px tall, LiteGraph draws it {need_h}"
        if "Loader" in node["type"]:
            assert h <= need_h + 20, f"{path.name}: {name} is saved {h} px tall, it needs {need_h}"


def test_the_saved_view_shows_every_node(workflow):
    wf, path = workflow
    ds = wf["extra"]["ds"]
    for node in wf["nodes"]:
        x0, y0, x1, y1 = graph.box(PACK, node)
        # LiteGraph's DragAndScale: canvas = (graph + offset) * scale.
        left, top = (x0 + ds["offset"][0]) * ds["scale"], (y0 + ds["offset"][1]) * ds["scale"]
        right, bottom = (x1 + ds["offset"][0]) * ds["scale"], (y1 + ds["offset"][1]) * ds["scale"]
        assert 0 <= left and right <= VIEW[0] and 0 <= top and bottom <= VIEW[1], (
            f"{path.name}: {graph.display_name(PACK, node)} is out of the saved view ({left:.0f}, {top:.0f}, "
            f"{right:.0f}, {bottom:.0f} on a {VIEW[0]}x{VIEW[1]} canvas)")
