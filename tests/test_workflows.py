"""Every shipped example workflow (UI format 0.4) is a graph ComfyUI can load and our nodes can run.

Core node definitions below are those of ComfyUI v0.3.64 (checked against its /object_info);
combo option lists are trimmed to a few real entries.
"""
import json
import shutil

import pytest
import torch

from conftest import REPO, load_pack

PACK = load_pack()
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # never sent to the server
SEED = ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True})
SIZE = ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8})
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
    "SaveImage": ({"images": ("IMAGE", {}), "filename_prefix": ("STRING", {})}, []),
    "PreviewImage": ({"images": ("IMAGE", {})}, []),
    "LoadImage": ({"image": (["<file>"], {"image_upload": True})}, ["IMAGE", "MASK"]),
}
# Combos listing files in the user's folders: any file name is valid in a shipped workflow.
FILE_COMBOS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadImage", "image"),
               ("InfDiTModelLoader", "model_name"), ("InfDiTClipLoader", "clip_name")}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def definition(node_type):
    """(ordered {name: (type, options)}, output types) as ComfyUI's /object_info has them."""
    if node_type in PACK.NODE_CLASS_MAPPINGS:
        cls = PACK.NODE_CLASS_MAPPINGS[node_type]
        spec = cls.INPUT_TYPES()
        return {**spec.get("required", {}), **spec.get("optional", {})}, list(cls.RETURN_TYPES)
    return CORE[node_type]


def widget_slots(node_type):
    """[(input name or None for an extra control value, type, options)] in widgets_values order:
    the widget inputs of required then optional, a control value after control_after_generate
    (or an INT named seed/noise_seed), an upload value after an image_upload combo."""
    inputs, _ = definition(node_type)
    slots = []
    for name, (kind, options) in inputs.items():
        if isinstance(kind, list) or (kind in WIDGET_TYPES and not options.get("forceInput")):
            slots.append((name, kind, options))
            if options.get("control_after_generate") or (kind == "INT" and name in ("seed", "noise_seed")):
                slots.append((None, "CONTROL", {}))
            if options.get("image_upload"):
                slots.append((None, "UPLOAD", {}))
    return slots


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


def test_the_shipped_workflows_are_all_there():
    names = {p.stem for p in WORKFLOWS}
    assert {"sdxl_to_4096", "iterative_4x_chain", "upscale_image"} <= names
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
            if node["type"] == "InfDiTUpscale" and path.stem != "sdxl_hidiffusion_2048_to_4096":
                assert node["widgets_values"] == [4.0, 20, 0, "fixed", 0, True, "auto", "auto"], path.name


# --- running a workflow's graph on the tiny model ----------------------------------------------


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
            kwargs = {name: value for (name, _, _), value in zip(widget_slots(node["type"]), node["widgets_values"]) if name}
            kwargs.update({k: v for k, v in overrides.items() if k in kwargs})
            for inp in node["inputs"]:
                if inp["link"] is not None:
                    _, src, slot, _, _, _ = links[inp["link"]]
                    kwargs[inp["name"]] = run(src)[slot]
            if node["type"] == "LoadImage":
                results[node_id] = (images[kwargs["image"]], None)
            elif node["type"] in ("SaveImage", "PreviewImage"):
                results[node_id] = (kwargs["images"],)
            else:
                cls = PACK.NODE_CLASS_MAPPINGS[node["type"]]
                results[node_id] = getattr(cls(), cls.FUNCTION)(**kwargs)
        return results[node_id]

    for node_id in nodes:
        run(node_id)
    return results


def test_iterative_4x_chain_runs(models_root, tmp_path, monkeypatch):
    wf = json.loads((REPO / "example_workflows" / "iterative_4x_chain.json").read_text())
    loader = next(n for n in wf["nodes"] if n["type"] == "InfDiTModelLoader")
    # The workflow's model file, played by the tiny model with a CLIP image tower inside.
    (tmp_path / "infdit").mkdir()
    shutil.copy(models_root / "infdit" / "tiny_with_clip.safetensors", tmp_path / "infdit" / loader["widgets_values"][0])
    monkeypatch.setenv("INFDIT_MODELS_DIR", str(tmp_path))
    image = torch.rand(1, 4, 6, 3, generator=torch.Generator().manual_seed(0))
    results = execute(wf, {"example.png": image}, {"steps": 2})

    by_title = {n.get("title"): n["id"] for n in wf["nodes"]}
    first, second = results[by_title["Inf-DiT 4x (pass 1)"]][0], results[by_title["Inf-DiT 4x (pass 2)"]][0]
    assert first.shape == (1, 16, 24, 3) and second.shape == (1, 64, 96, 3)
    saved = next(results[n["id"]][0] for n in wf["nodes"] if n["type"] == "SaveImage")
    assert saved is second and 0 <= second.min() and second.max() <= 1
    # Pass 2 starts from pass 1: its output, brought back down, still resembles pass 1.
    down = torch.nn.functional.interpolate(second.movedim(-1, 1), size=(16, 24), mode="area").movedim(1, -1)
    assert (down - first).abs().mean() < (down - first.flip(1)).abs().mean()
