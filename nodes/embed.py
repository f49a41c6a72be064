"""Inf-DiT CLIP Semantic Embed: the global-semantics vector Inf-DiT is conditioned on."""
from __future__ import annotations

import torch

from ..infdit_core import ClipEmbedder
from ..infdit_core.clip import DEFAULT_NEGATIVE, DEFAULT_POSITIVE, PRESET_STRENGTH, blend
from . import comfy_bridge as bridge
from .loaders import CATEGORY, InfDiTClip


def _embed_images(clip: ClipEmbedder, image: torch.Tensor) -> torch.Tensor:
    x = bridge.image_to_bchw(image)
    rgb = x[:, :3] if x.shape[1] != 1 else x.expand(-1, 3, -1, -1)  # alpha is not content
    return clip.embed_image(rgb)


def image_embedding(clip: InfDiTClip, image: torch.Tensor, positive: str = DEFAULT_POSITIVE,
                    negative: str = DEFAULT_NEGATIVE, strength: float = 0.0,
                    reference_image: torch.Tensor | None = None, reference_weight: float = 1.0) -> torch.Tensor:
    """INFDIT_EMBED [B, 768] (float32, CPU) for an IMAGE batch. A reference batch is blended in with
    `reference_weight` (several reference images count equally); then the text nudge is applied."""
    if not 0.0 <= reference_weight <= 1.0:
        raise ValueError(f"reference_weight must be between 0 and 1, got {reference_weight}")
    # ComfyUI loads CLIP like any model and evicts it when another needs the room. A ViT-L forward
    # at 224 px needs far less than the inference memory ComfyUI always keeps free (about 1 GB), so
    # nothing beyond the weights is asked for.
    clip.managed.load(0)
    embedder = clip.embedder
    embedding = _embed_images(embedder, image)
    if reference_image is not None and reference_weight > 0:
        references = _embed_images(embedder, reference_image)
        style = blend(list(references.split(1)), [1.0] * len(references))
        embedding = blend([embedding, style], [1.0 - reference_weight, reference_weight])
    embedding = embedder.nudge(embedding, positive, negative, strength)
    return embedding.float().cpu()


class InfDiTClipEmbed:
    DESCRIPTION = ("Computes the CLIP image embedding Inf-DiT uses for global semantics (colours, content), "
                   "optionally blended with a reference image and nudged along a text direction.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("INFDIT_EMBED",)
    OUTPUT_TOOLTIPS = ("One embedding per image of the batch, for the upscaler's embed input.",)
    FUNCTION = "embed"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The low-resolution image that will be upscaled."}),
                "clip": ("INFDIT_CLIP", {"tooltip": "From Load Inf-DiT CLIP."}),
                "positive": ("STRING", {
                    "default": DEFAULT_POSITIVE, "multiline": True,
                    "tooltip": "Text the embedding is pushed towards (only used when strength is not 0)."}),
                "negative": ("STRING", {
                    "default": DEFAULT_NEGATIVE, "multiline": True,
                    "tooltip": "Text the embedding is pushed away from (only used when strength is not 0)."}),
                "strength": ("FLOAT", {
                    "default": 0.0, "min": -10.0, "max": 10.0, "step": 0.1,
                    "tooltip": f"Text-direction nudge (paper eq. 5). 0 is the official behaviour; {PRESET_STRENGTH:g} "
                               "is the paper's preset. Needs the full CLIP file with the text tower "
                               "(open_clip_pytorch_model.bin), not the image tower inside the Inf-DiT checkpoint."}),
            },
            "optional": {
                "reference_image": ("IMAGE", {
                    "tooltip": "Optional style/semantics reference blended into the embedding."}),
                "reference_weight": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                    "tooltip": "Share of the reference in the blend: 0 ignores it, 1 uses only the reference."}),
            },
        }

    def embed(self, image, clip, positive, negative, strength, reference_image=None, reference_weight=1.0):
        return (image_embedding(clip, image, positive, negative, strength, reference_image, reference_weight),)


NODE_CLASS_MAPPINGS = {"InfDiTClipEmbed": InfDiTClipEmbed}
NODE_DISPLAY_NAME_MAPPINGS = {"InfDiTClipEmbed": "Inf-DiT CLIP Semantic Embed"}
