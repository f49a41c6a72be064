"""`Inf-DiT HiDiffusion`: patches an SD/SDXL MODEL with RAU-Net and MSW-MSA through ComfyUI's
ModelPatcher hooks (no weight access, no monkeypatching).

The hook objects below take plain tensors and dicts, so tests can drive them without ComfyUI;
comfy.* is imported lazily, only where a real model is inspected or attention is computed.
"""
import logging

from ..infdit_core import hidiffusion as hd
from .loaders import CATEGORY

log = logging.getLogger(__name__)

# Every hook we register carries this attribute, so a second application can find and replace them.
MARKER = "infdit_hidiffusion"


class BlockLayout:
    """Where RAU-Net and MSW-MSA act in one U-Net layout (ComfyUI block numbering, spec §3-5)."""

    def __init__(self, arch, rad_downsample, pool_input, unpool_output, upsample_output, attn_blocks):
        self.arch = arch
        self.rad_downsample = rad_downsample  # input block holding the level-exit Downsample
        self.pool_input = pool_input  # input block whose output (and skip) is pooled
        self.unpool_output = unpool_output  # output block whose input is resized to its skip
        self.upsample_output = upsample_output  # output block whose Upsample mirrors the RAD
        self.attn_blocks = attn_blocks  # (block name, number) of the MSW-MSA self-attentions


LAYOUTS = {
    hd.SDXL: BlockLayout(hd.SDXL, 6, 4, 5, 2, [("input", 4), ("input", 5), ("output", 3), ("output", 4), ("output", 5)]),
    hd.SD: BlockLayout(hd.SD, 3, 4, 8, 8, [("input", 1), ("input", 2), ("output", 9), ("output", 10), ("output", 11)]),
}


class _Hook:
    """Shared settings of the hooks: light and deep-copyable (ModelPatcher.clone deep-copies them)."""

    def __init__(self, layout, native, preset=hd.PRESET_OFFICIAL, aggressive=True, sigma_at=None):
        self.layout = layout
        self.native = native
        self.preset = preset
        self.aggressive = aggressive
        self.sigma_at = sigma_at  # {ratio: percent_to_sigma(ratio)} for the percent fallback
        setattr(self, MARKER, True)

    def phases(self, transformer_options):
        """RAU-Net phases for this model call, from its latent size and position in the schedule."""
        h, w = transformer_options["original_shape"][-2:]
        schedule = hd.select_schedule(self.layout.arch, h, w, self.native, self.preset, self.aggressive)
        if schedule is None:
            return hd.Phases()
        sigma = hd.current_sigma(transformer_options["sigmas"])
        position = hd.resolve_step(transformer_options.get("sample_sigmas"), sigma)
        if position is not None:
            return schedule.phases_at_step(*position)
        if self.sigma_at is None:
            return hd.Phases()
        return schedule.phases_at_sigma(sigma, self.sigma_at)


class PoolPatch(_Hook):
    """input_block_patch: pool the level-1 block output before its skip is stored."""

    def __call__(self, h, transformer_options):
        if transformer_options["block"] == ("input", self.layout.pool_input) and self.phases(transformer_options).pool:
            return hd.pool(h)
        return h


class RadPatch(_Hook):
    """input_block_patch_after_skip on the block before the level-exit Downsample: subsampling
    there makes the unchanged Downsample compute the official dilated stride-4 conv."""

    def __call__(self, h, transformer_options):
        if transformer_options["block"] == ("input", self.layout.rad_downsample - 1) and self.phases(transformer_options).rad:
            return hd.rad_subsample(h)
        return h


class UnpoolPatch(_Hook):
    """output_block_patch: bring a pooled feature map back to the exact size of its skip. Keyed
    on shapes, not on the schedule, so it can never leave a mismatch behind."""

    def __call__(self, h, hsp, transformer_options):
        if transformer_options["block"] == ("output", self.layout.unpool_output) and h.shape[-2:] != hsp.shape[-2:]:
            h = hd.unpool(h, hsp.shape[-2:])
        return h, hsp


def comfy_attention(q, k, v, extra_options):
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"))


class WindowAttention:
    """attn1_replace: shifted 2x2-window self-attention on the projected q, k, v.

    The shift comes from (seed, step, block, block_index), never from the global RNG.
    `attention(q, k, v, extra_options)` defaults to ComfyUI's optimized attention; `grid` is the
    official 2x2 (a 1x1 grid reduces to full attention, which tests use to check the plumbing).
    """

    def __init__(self, seed=0, attention=comfy_attention, grid=(2, 2)):
        self.seed = seed
        self.attention = attention
        self.grid = grid
        setattr(self, MARKER, True)

    def __call__(self, q, k, v, extra_options):
        if "activations_shape" not in extra_options:
            raise RuntimeError("Inf-DiT HiDiffusion: MSW-MSA needs a ComfyUI that reports activations_shape (0.3.40 or newer)")
        height, width = extra_options["activations_shape"][-2:]
        sigma = hd.current_sigma(extra_options["sigmas"])
        position = hd.resolve_step(extra_options.get("sample_sigmas"), sigma)
        # Without a schedule the sigma itself still identifies the step reproducibly.
        step = position[0] if position is not None else round(sigma * 1e4)
        k_draw = hd.shift_index(self.seed, step, extra_options["block"], extra_options.get("block_index", 0))
        shift = hd.shift_for(height, width, k_draw, self.grid)
        return hd.windowed_attention(
            q, k, v, height, width, shift, lambda qw, kw, vw: self.attention(qw, kw, vw, extra_options), self.grid
        )


# --------------------------------------------------------------------------------------------
# Patch-time inspection of the real model


def _layout_of(diffusion_model):
    """Architecture of a ComfyUI UNetModel, after checking every block the patch relies on, so a
    layout we do not understand fails loudly instead of silently doing nothing."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

    inputs = getattr(diffusion_model, "input_blocks", None)
    outputs = getattr(diffusion_model, "output_blocks", None)
    arch = {9: hd.SDXL, 12: hd.SD}.get(len(inputs) if inputs is not None else None)
    if arch is None or len(outputs) != len(inputs):
        raise ValueError("Inf-DiT HiDiffusion supports SD 1.x/2.x and SDXL U-Nets only")
    layout = LAYOUTS[arch]

    def kinds(block):
        return [type(layer) for layer in block]

    problems = []
    if Downsample not in kinds(inputs[layout.rad_downsample]):
        problems.append(f"input block {layout.rad_downsample} has no Downsample")
    if Upsample not in kinds(outputs[layout.upsample_output]):
        problems.append(f"output block {layout.upsample_output} has no Upsample")
    if kinds(inputs[layout.pool_input])[:2] != [ResBlock, SpatialTransformer]:
        problems.append(f"input block {layout.pool_input} is not ResBlock + SpatialTransformer")
    for name, number in layout.attn_blocks:
        block = (inputs if name == "input" else outputs)[number]
        if SpatialTransformer not in kinds(block):
            problems.append(f"{name} block {number} has no SpatialTransformer")
    if problems:
        raise ValueError(f"Inf-DiT HiDiffusion: unexpected {arch.upper()} layout ({'; '.join(problems)})")
    return layout


def _transformer_depth(block):
    from comfy.ldm.modules.attention import SpatialTransformer

    return next(len(layer.transformer_blocks) for layer in block if isinstance(layer, SpatialTransformer))


def _native_latent(base_model, arch):
    if arch == hd.SDXL:
        return hd.NATIVE_LATENT[hd.SDXL]
    import comfy.model_base

    # SD 2.x 768-v is the only SD-layout model trained at 768 px.
    is_sd2 = type(base_model.model_config).__name__ == "SD20"
    if is_sd2 and base_model.model_type == comfy.model_base.ModelType.V_PREDICTION:
        return hd.SD2_768_NATIVE_LATENT
    return hd.NATIVE_LATENT[hd.SD]


def _official_aggressive(base_model):
    """The official code runs the gentler SDXL 2x schedule for inpainting and Playground models."""
    inpainting = base_model.diffusion_model.in_channels == 9
    playground = type(base_model.latent_format).__name__.startswith("SDXL_Playground")
    return not (inpainting or playground)


def _strip_own_patches(model_options):
    """Remove hooks registered by an earlier application of this node (clone-local lists)."""
    options = model_options["transformer_options"]
    patches = options.get("patches", {})
    for name in ("input_block_patch", "input_block_patch_after_skip", "output_block_patch"):
        if name in patches:
            patches[name] = [p for p in patches[name] if not getattr(p, MARKER, False)]
    replaces = options.get("patches_replace", {})
    if "attn1" in replaces:
        replaces["attn1"] = {key: p for key, p in replaces["attn1"].items() if not getattr(p, MARKER, False)}


def _warn_on_deep_shrink(model_options):
    patches = model_options["transformer_options"].get("patches", {})
    for name in ("input_block_patch", "input_block_patch_after_skip", "output_block_patch"):
        if any("model_downscale" in getattr(p, "__module__", "") for p in patches.get(name, [])):
            log.warning("Inf-DiT HiDiffusion: Kohya Deep Shrink resizes the same blocks; use one or the other")
            return


def apply_hidiffusion(model, raunet=True, msw_msa=True, preset=hd.PRESET_OFFICIAL, native_latent_size=0):
    """Patched clone of a ComfyUI ModelPatcher; the input model is left untouched."""
    patched = model.clone()
    base = patched.model
    layout = _layout_of(base.diffusion_model)
    native = native_latent_size or _native_latent(base, layout.arch)
    _strip_own_patches(patched.model_options)
    _warn_on_deep_shrink(patched.model_options)

    if raunet:
        sampling = patched.get_model_object("model_sampling")
        sigma_at = {r: float(sampling.percent_to_sigma(r)) for r in hd.schedule_ratios()}
        settings = dict(layout=layout, native=native, preset=preset, aggressive=_official_aggressive(base), sigma_at=sigma_at)
        patched.set_model_input_block_patch(PoolPatch(**settings))
        patched.set_model_input_block_patch_after_skip(RadPatch(**settings))
        patched.set_model_output_block_patch(UnpoolPatch(**settings))

    if msw_msa:
        attention = WindowAttention()
        for name, number in layout.attn_blocks:
            block = (base.diffusion_model.input_blocks if name == "input" else base.diffusion_model.output_blocks)[number]
            for block_index in range(_transformer_depth(block)):
                patched.set_model_attn1_replace(attention, name, number, block_index)
    return patched


class InfDiTHiDiffusion:
    DESCRIPTION = (
        "HiDiffusion for SD 1.x/2.x and SDXL: generate above the training size without duplicated "
        "objects (RAU-Net) and with cheaper top-level attention (MSW-MSA). Works at any latent size; "
        "deterministic; returns a patched copy of the model."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with HiDiffusion applied (the input model is unchanged).",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD 1.x/2.x or SDXL model. Applying the node again replaces its earlier settings."}),
                "raunet": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "RAU-Net: shrink the deep-block features to about the training size during the first, "
                               "composition-setting steps. Prevents duplicated objects above native size.",
                }),
                "msw_msa": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "MSW-MSA: self-attention inside 4 shifted windows in the highest-resolution attention "
                               "blocks. Faster (a lot on SD 1.5, about 10% on SDXL); shifts are seeded by step and block.",
                }),
                "preset": (list(hd.PRESETS), {
                    "default": hd.PRESET_OFFICIAL,
                    "tooltip": "official: the paper's schedules (SDXL 2x aggressive) at every size. conservative: "
                               "pooling only for SDXL 2x, and RAU-Net off up to 1.25x native size.",
                }),
                "native_latent_size": ("INT", {
                    "default": 0, "min": 0, "max": 1024, "step": 1,
                    "tooltip": "Training size of the model in latent pixels (image px / 8) that picks the RAU-Net "
                               "schedule; 0 = auto (SDXL 128, SD 1.x/2.x 64, SD 2.x 768-v 96).",
                }),
            }
        }

    def patch(self, model, raunet, msw_msa, preset, native_latent_size):
        return (apply_hidiffusion(model, raunet, msw_msa, preset, native_latent_size),)


NODE_CLASS_MAPPINGS = {"InfDiTHiDiffusion": InfDiTHiDiffusion}
# The class key stays InfDiTHiDiffusion so saved workflows keep loading.
NODE_DISPLAY_NAME_MAPPINGS = {"InfDiTHiDiffusion": "Inf-DiT HiDiffusion Model Patch"}
