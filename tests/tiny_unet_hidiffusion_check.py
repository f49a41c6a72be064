"""Model-level checks of the Inf-DiT HiDiffusion node inside a real ComfyUI (spec §8.2 / §8.3).

Not collected by pytest (CI has no ComfyUI) and never shipped. It builds tiny, randomly initialised
SDXL- and SD1.5-shaped U-Nets with ComfyUI's own classes (real detection refuses such small state
dicts, so the configs are shrunk by hand), patches them with the node and checks shape safety at
odd latents, inactivity outside the schedule, the block-size walk-through, MSW-MSA plumbing, clone
isolation, cond/uncond splitting, sampling, and the step resolver against every core scheduler.

In-process run (about a minute on 2 CPU cores), from this repository, where <ComfyUI> is a ComfyUI
checkout, <python> the Python environment ComfyUI runs in and <pack> this repository:

    <python> tests/tiny_unet_hidiffusion_check.py --comfyui <ComfyUI>

Add `--timing 128` to time one U-Net forward plain vs patched instead (used for the README).

Server end-to-end run: link this file into ComfyUI as a single-file node pack (it then provides
the test-only nodes TinySDXL and RandomSDXLConditioning), link the pack itself, start the server
on loopback, and post a TinySDXL -> Inf-DiT HiDiffusion -> KSampler -> SaveLatent prompt:

    ln -s <pack>/tests/tiny_unet_hidiffusion_check.py <ComfyUI>/custom_nodes/tiny_sdxl_test_nodes.py
    ln -s <pack> <ComfyUI>/custom_nodes/infdit
    (cd <ComfyUI> && <python> main.py --cpu --listen 127.0.0.1 --port 8188 --disable-auto-launch)
    <python> tests/tiny_unet_hidiffusion_check.py --server http://127.0.0.1:8188
"""
import argparse
import copy
import importlib.util
import json
import pathlib
import sys
import time
import urllib.request

import torch

PACK_ROOT = pathlib.Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Tiny models built from ComfyUI's classes


def tiny_unet_config(arch, channels=32):
    common = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
                  in_channels=4, out_channels=4, model_channels=channels, use_temporal_resblock=False,
                  use_temporal_attention=False, dtype=torch.float32)
    if arch == "sdxl":
        # SDXL's layout and conditioning widths; level-1 depth 2 keeps block_index 0 and 1.
        # transformer_depth_output lists output depths by level, top level first (UNetModel pops it).
        return dict(common, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                    channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 1, 1],
                    transformer_depth_output=[0, 0, 0, 2, 2, 2, 1, 1, 1], transformer_depth_middle=1,
                    use_linear_in_transformer=True, context_dim=2048)
    return dict(common, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768)


def tiny_model(arch="sdxl", seed=0, channels=32):
    """A ModelPatcher around a real comfy model_base.SDXL / BaseModel with seeded random weights."""
    import comfy.model_patcher
    import comfy.supported_models

    config_class = comfy.supported_models.SDXL if arch == "sdxl" else comfy.supported_models.SD15
    model_config = config_class(tiny_unet_config(arch, channels))
    model_config.unet_config.update(num_heads=-1, num_head_channels=32)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    # ComfyUI's layers skip initialisation: every parameter must be set explicitly.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim > 1:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def random_conditioning(arch, seed=0, batch=1):
    generator = torch.Generator().manual_seed(seed)
    if arch == "sdxl":
        return [[torch.randn(batch, 77, 2048, generator=generator), {"pooled_output": torch.randn(batch, 1280, generator=generator)}]]
    return [[torch.randn(batch, 77, 768, generator=generator), {}]]


# --------------------------------------------------------------------------------------------
# Test-only nodes for the server run (loaded when ComfyUI imports this file from custom_nodes)


class TinySDXL:
    CATEGORY = "_testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31, "tooltip": "weight seed"})}}

    def build(self, seed):
        return (tiny_model("sdxl", seed),)


class RandomSDXLConditioning:
    CATEGORY = "_testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31, "tooltip": "tensor seed"})}}

    def build(self, seed):
        return (random_conditioning("sdxl", seed),)


NODE_CLASS_MAPPINGS = {"TinySDXL": TinySDXL, "RandomSDXLConditioning": RandomSDXLConditioning}


# --------------------------------------------------------------------------------------------
# In-process checks


def load_node_module():
    """Import the pack the way ComfyUI does (a package from a file location)."""
    name = "infdit_pack_check"
    spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[name] = pack
    spec.loader.exec_module(pack)
    return sys.modules[name + ".nodes.hidiffusion"]


class Forward:
    """Calls a patcher's U-Net directly with the transformer_options the sampler would pass."""

    def __init__(self, arch, sample_sigmas):
        self.arch = arch
        self.sample_sigmas = sample_sigmas

    def conditioning(self, batch, seed=0):
        context, extra = random_conditioning(self.arch, seed, batch)[0]
        y = None
        if self.arch == "sdxl":  # pooled text embedding + zeroed size embeddings
            y = torch.cat([extra["pooled_output"], torch.zeros(batch, 2816 - 1280)], 1)
        return context, y

    def __call__(self, patcher, x, step, cond=None, extra_patches=None):
        context, y = cond if cond is not None else self.conditioning(x.shape[0])
        options = copy.copy(patcher.model_options["transformer_options"])
        if extra_patches:
            options = copy.deepcopy(options)
            for name, fn in extra_patches.items():
                options.setdefault("patches", {}).setdefault(name, []).append(fn)
        sigma = self.sample_sigmas[step].repeat(x.shape[0])
        options.update(sigmas=sigma, sample_sigmas=self.sample_sigmas, cond_or_uncond=list(range(x.shape[0])))
        timestep = patcher.model.model_sampling.timestep(sigma)
        with torch.no_grad():
            return patcher.model.diffusion_model(x, timestep, context=context, y=y, transformer_options=options)


def own_hooks(patcher, node):
    options = patcher.model_options["transformer_options"]
    hooks = [p for plist in options.get("patches", {}).values() for p in plist if getattr(p, node.MARKER, False)]
    hooks += [p for p in options.get("patches_replace", {}).get("attn1", {}).values() if getattr(p, node.MARKER, False)]
    return hooks


def force_phases(patcher, node, phases):
    for hook in own_hooks(patcher, node):
        if isinstance(hook, node._Hook):
            hook.phases = lambda options, phases=phases: phases


def check(label, condition, detail=""):
    print(f"{'PASS' if condition else 'FAIL'}  {label}{'  ' + detail if detail else ''}")
    if not condition:
        check.failures += 1


check.failures = 0


def run_checks(node):
    import comfy.sample
    import comfy.samplers
    import comfy.utils

    hd = node.hd
    model = tiny_model("sdxl")
    sampling = model.model.model_sampling
    sample_sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", 20)
    forward = Forward("sdxl", sample_sigmas)
    print(f"tiny SDXL: {comfy.utils.calculate_parameters(model.model.state_dict()) / 1e6:.1f} M params")

    # 8.2.1 shape safety with each phase forced, MSW-MSA on, over odd latents.
    patched = node.apply_hidiffusion(model, native_latent_size=16)
    for latent in [(17, 23), (24, 40), (31, 65), (33, 33), (64, 64), (65, 129), (8, 200)]:
        x = torch.randn(2, 4, *latent)
        for phases in (hd.Phases(rad=True), hd.Phases(pool=True), hd.Phases(rad=True, pool=True)):
            force_phases(patched, node, phases)
            out = forward(patched, x, 0)
            check(f"shape safety {latent} {phases}", out.shape == x.shape and bool(torch.isfinite(out).all()))
    patched = node.apply_hidiffusion(model, native_latent_size=16)  # fresh hooks, real schedule

    # 8.2.2 inactive outside the RAU-Net window (MSW-MSA off): bitwise equal to the plain model.
    rau_only = node.apply_hidiffusion(model, msw_msa=False, native_latent_size=32)
    x = torch.randn(2, 4, 64, 64)
    # 64 x 64 latent, native 32, 20 steps: SDXL 2x aggressive, RAD steps 0-2, pool 3-7.
    for step in (8, 12, 19):
        check(f"inactive at step {step}", torch.equal(forward(rau_only, x, step), forward(model, x, step)))
    for step in (0, 3, 7):
        check(f"active at step {step}", not torch.equal(forward(rau_only, x, step), forward(model, x, step)))

    # 8.2.3 the §4.4 walk-through, scaled: latent 64 / native 32 is SDXL 2048 / 128.
    expected = {
        0: {("in", 3): 32, ("in", 5): 16, ("in", 6): 8, ("out", 3): 32, ("out", 6): 64},
        3: {("in", 4): 16, ("in", 6): 8, ("out", 3): 16, ("out", 4): 16, ("out", 5): 32, ("out", 6): 64},
        10: {("in", 4): 32, ("in", 6): 16, ("out", 3): 32},
    }
    for step, sizes in expected.items():
        record = {}

        def after_skip(h, options):  # runs after our RAD hook: the size the next block sees
            record[("in", options["block"][1])] = h.shape[-1]
            return h

        def before_output(h, hsp, options):  # h entering an output block, after our unpool
            record[("out", options["block"][1])] = h.shape[-1]
            return h, hsp

        forward(rau_only, x, step, extra_patches={"input_block_patch_after_skip": after_skip, "output_block_patch": before_output})
        got = {key: record[key] for key in sizes}
        check(f"walk-through sizes at step {step}", got == sizes, f"{got}")

    # 8.2.4 MSW-MSA with a one-window grid equals the plain model; the real 2x2 grid does not.
    msw_only = node.apply_hidiffusion(model, raunet=False)
    x = torch.randn(2, 4, 24, 40)
    reference = forward(model, x, 5)
    windowed = forward(msw_only, x, 5)
    for hook in own_hooks(msw_only, node):
        hook.grid = (1, 1)
    one_window = forward(msw_only, x, 5)
    check("MSW-MSA 1x1 grid == plain model", torch.allclose(one_window, reference, atol=1e-5, rtol=1e-5),
          f"max diff {(one_window - reference).abs().max():.2e}")
    check("MSW-MSA 2x2 grid changes the output", not torch.allclose(windowed, reference, atol=1e-4))
    attn_keys = sorted(msw_only.model_options["transformer_options"]["patches_replace"]["attn1"])
    check("MSW-MSA registered on the 10 SDXL level-1 transformer blocks", len(attn_keys) == 10, f"{attn_keys}")

    # 8.2.5 clone isolation and no double application.
    before = copy.deepcopy(model.model_options)
    twice = node.apply_hidiffusion(node.apply_hidiffusion(model, native_latent_size=16), native_latent_size=16)
    check("original model_options untouched", model.model_options == before and not own_hooks(model, node))
    options = twice.model_options["transformer_options"]
    counts = {name: sum(getattr(p, node.MARKER, False) for p in plist) for name, plist in options["patches"].items()}
    check("applying twice keeps one set of hooks", set(counts.values()) == {1} and len(options["patches_replace"]["attn1"]) == 10, f"{counts}")
    x = torch.randn(2, 4, 33, 33)
    check("applying twice == applying once", torch.equal(forward(twice, x, 4), forward(patched, x, 4)))

    # 8.2.6 cond and uncond in separate calls give the batched result.
    x = torch.randn(2, 4, 31, 65)
    context, y = forward.conditioning(2)
    for step in (0, 4, 15):
        batched = forward(patched, x, step, (context, y))
        split = torch.cat([forward(patched, x[i:i + 1], step, (context[i:i + 1], y[i:i + 1])) for i in range(2)])
        check(f"cond/uncond split == batched at step {step}", torch.allclose(split, batched, atol=1e-5, rtol=1e-5),
              f"max diff {(split - batched).abs().max():.2e}")

    # 8.2.7 full sampling through comfy.sample with several samplers: finite and reproducible.
    latent = torch.zeros(1, 4, 24, 40)
    positive, negative = random_conditioning("sdxl", 1), random_conditioning("sdxl", 2)
    for sampler in ("euler", "euler_ancestral", "dpmpp_2m_sde", "heun"):
        runs, seconds = [], []
        for patcher in (patched, patched, model):
            noise = comfy.sample.prepare_noise(latent, 7)
            start = time.perf_counter()
            runs.append(comfy.sample.sample(patcher, noise, 6, 5.0, sampler, "normal", positive, negative, latent, seed=7, disable_pbar=True))
            seconds.append(time.perf_counter() - start)
        check(f"sampling {sampler}: finite, reproducible, differs from plain",
              bool(torch.isfinite(runs[0]).all()) and torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2]),
              f"patched {seconds[1]:.2f} s, plain {seconds[2]:.2f} s")

    # Step resolver against every core scheduler and the sampler's penultimate-sigma discard.
    bad = []
    for scheduler in comfy.samplers.SCHEDULER_NAMES:
        for n in range(1, 61):
            sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, n)
            executed = len(sigmas) - 1
            resolved = [hd.resolve_step(sigmas, sigmas[i]) for i in range(executed)]
            if resolved != [(i, executed) for i in range(executed)]:
                bad.append((scheduler, n))
    check("resolver exact on every core scheduler, N = 1..60", not bad, f"failures: {bad[:10]}")

    # The SD 1.x layout passes the structure check and is shape safe too.
    sd = tiny_model("sd")
    sd_patched = node.apply_hidiffusion(sd, native_latent_size=16)
    sd_forward = Forward("sd", sample_sigmas)
    for latent in [(17, 23), (33, 33), (8, 200)]:
        x = torch.randn(2, 4, *latent)
        for phases in (hd.Phases(rad=True), hd.Phases(pool=True), hd.Phases(rad=True, pool=True)):
            force_phases(sd_patched, node, phases)
            out = sd_forward(sd_patched, x, 0)
            check(f"SD1.x shape safety {latent} {phases}", out.shape == x.shape and bool(torch.isfinite(out).all()))
    check("SD1.x MSW-MSA on 5 level-0 blocks", len(sd_patched.model_options["transformer_options"]["patches_replace"]["attn1"]) == 5)


def run_timing(node, latent=128, repeats=3):
    """Seconds per U-Net forward (batch 2) of the tiny SDXL, plain vs patched, by RAU-Net phase.
    On CPU the full-resolution level-1 attention dominates from ~128^2 latents on, which is where
    MSW-MSA pays off; RAU-Net's saving comes from running levels 1-2 smaller while active."""
    model = tiny_model("sdxl")
    import comfy.samplers

    forward = Forward("sdxl", comfy.samplers.calculate_sigmas(model.model.model_sampling, "normal", 20))
    x = torch.randn(2, 4, latent, latent)
    native = latent // 2  # SDXL 2048^2 / native 1024^2 proportions: 2x aggressive schedule
    variants = {
        "plain": (model, 0),
        "MSW-MSA only": (node.apply_hidiffusion(model, raunet=False), 0),
        "RAU-Net + MSW-MSA, RAD step": (node.apply_hidiffusion(model, native_latent_size=native), 0),
        "RAU-Net + MSW-MSA, pool step": (node.apply_hidiffusion(model, native_latent_size=native), 5),
        "RAU-Net + MSW-MSA, vanilla step": (node.apply_hidiffusion(model, native_latent_size=native), 15),
    }
    for label, (patcher, step) in variants.items():
        forward(patcher, x, step)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            forward(patcher, x, step)
        print(f"TIME  latent {latent}^2  {label}: {(time.perf_counter() - start) / repeats:.2f} s/forward")


def run_server_check(url):
    """Post TinySDXL -> Inf-DiT HiDiffusion -> KSampler -> SaveLatent and wait for the history."""
    prompt = {
        "1": {"class_type": "TinySDXL", "inputs": {"seed": 0}},
        "2": {"class_type": "InfDiTHiDiffusion", "inputs": {"model": ["1", 0], "raunet": True, "msw_msa": True,
                                                             "preset": "official", "native_latent_size": 16}},
        "3": {"class_type": "RandomSDXLConditioning", "inputs": {"seed": 1}},
        "4": {"class_type": "RandomSDXLConditioning", "inputs": {"seed": 2}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 264, "height": 136, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 0, "steps": 8, "cfg": 5.0,
                                                    "sampler_name": "euler_ancestral", "scheduler": "normal",
                                                    "positive": ["3", 0], "negative": ["4", 0],
                                                    "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/hidiffusion_check"}},
    }
    request = urllib.request.Request(f"{url}/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
    prompt_id = json.load(urllib.request.urlopen(request))["prompt_id"]
    for _ in range(240):
        history = json.load(urllib.request.urlopen(f"{url}/history/{prompt_id}"))
        if prompt_id in history:
            status = history[prompt_id]["status"]
            check("server run TinySDXL -> HiDiffusion -> KSampler -> SaveLatent", status["status_str"] == "success",
                  json.dumps(status["messages"])[-600:] if status["status_str"] != "success" else "")
            return
        time.sleep(0.5)
    check("server run finished within 2 minutes", False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=pathlib.Path, help="ComfyUI checkout for the in-process checks")
    parser.add_argument("--server", help="URL of a running ComfyUI with the test nodes, for the end-to-end run")
    parser.add_argument("--timing", type=int, metavar="LATENT", help="with --comfyui: time forwards at this latent size instead of checking")
    args = parser.parse_args()
    if args.comfyui:
        sys.path.insert(0, str(args.comfyui.resolve()))
        sys.argv = sys.argv[:1] + ["--cpu"]
        import comfy.options

        comfy.options.enable_args_parsing()
        torch.manual_seed(0)
        node = load_node_module()
        run_timing(node, args.timing) if args.timing else run_checks(node)
    if args.server:
        run_server_check(args.server.rstrip("/"))
    print(f"{check.failures} failure(s)")
    sys.exit(1 if check.failures else 0)


if __name__ == "__main__":
    main()
