"""CLIP image embedding for Inf-DiT, with the paper's optional text-direction nudge.

Inf-DiT conditions every layer on the L2-normalised CLIP image embedding of the low-resolution input
(spec 1.4, 7.1): open_clip ViT-L-14, DataComp-XL weights (tag datacomp_xl_s13b_b90k).

Unlike the official code this module never downloads anything: the architecture is inferred from the
state-dict shapes and built with open_clip's classes offline, the weights come from a local file:
- open_clip's open_clip_pytorch_model.bin (or a .safetensors of the same state dict): full CLIP,
  image and text tower;
- an Inf-DiT checkpoint (official state dict or our converted .safetensors): image tower only, under
  `image_encoder.model.visual.*`. The official code deleted the text transformer, so those files carry
  only text leftovers (token_embedding, positional_embedding, text_projection, logit_scale), which
  are dropped on purpose.

The nudge (paper eq. 5) e = norm(e_img + a*t(pos) - a*t(neg)) is dead code in the official release
(spec 7.2, 11.6); here it works when the text tower is loaded and fails clearly when it is not.
"""
from __future__ import annotations

import copy
import functools
import os
import re
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from safetensors import safe_open

from .checkpoint import OFFICIAL_FILENAME, CheckpointError, read_state_dict

CLIP_FILENAME = "open_clip_pytorch_model.bin"
CLIP_FOLDER = "models/clip_vision"
CLIP_HF_REPO = "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"

# Official prompts and the strength the official (disabled) code would have used.
DEFAULT_POSITIVE = "HD, high resolution, clear."
DEFAULT_NEGATIVE = "noisy,blurry,low resolution."
PRESET_STRENGTH = 2.0

# OpenAI CLIP normalisation, used by the official preprocessing (spec 7.1 step 4).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# open_clip's ViT-L-14 config (identical to open_clip/model_configs/ViT-L-14.json); the fallback for
# anything the state-dict shapes cannot tell, so a broken file is reported against the real model.
VIT_L_14 = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
}

INFDIT_PREFIX = "image_encoder.model."
# Where a CLIP image tower's keys start: in an open_clip file, in an Inf-DiT file.
IMAGE_TOWER_PREFIXES = ("visual.", INFDIT_PREFIX + "visual.")
# Key prefixes only an Inf-DiT file has (its DiT, its CLIP part).
_INFDIT_MARKERS = ("transformer.layers.", "mixins.", "image_encoder.")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# Text-side tensors that survive in Inf-DiT checkpoints after the official code deleted the text
# transformer and ln_final: useless without the rest of the text tower.
TEXT_LEFTOVERS = frozenset(
    {"token_embedding.weight", "positional_embedding", "text_projection", "logit_scale"})
_TEXT_TOWER_MARKERS = ("transformer.resblocks.", "ln_final.")
_HEAD_WIDTH = 64  # CLIP ViTs and text towers use 64-wide heads; not visible in any shape

StateDict = Mapping[str, torch.Tensor]


def _missing_file_message(path: str) -> str:
    return (
        f"CLIP weights not found: '{path}'. Inf-DiT needs the open_clip ViT-L-14 DataComp-XL model, "
        f"file {CLIP_FILENAME} (or a .safetensors of the same state dict), in ComfyUI's {CLIP_FOLDER} "
        f"folder. Download it from Hugging Face: {CLIP_HF_REPO}, file {CLIP_FILENAME} "
        f"(https://huggingface.co/{CLIP_HF_REPO}). An Inf-DiT checkpoint that contains "
        f"'{INFDIT_PREFIX}visual.*' keys also works (image tower only). Nothing is downloaded automatically."
    )


def no_image_tower_message(name: str, infdit: bool = True) -> str:
    """What to say when `name` (an Inf-DiT file unless `infdit` is False) has no CLIP image tower."""
    what, keys = (("this Inf-DiT file has no CLIP image tower", f"{INFDIT_PREFIX}visual.*") if infdit
                  else ("this file holds no open_clip CLIP image tower", "visual.*"))
    return (f"{name}: {what}; pick the open_clip ViT-L-14 DataComp-XL file ({CLIP_FILENAME} from {CLIP_HF_REPO}, "
            f"in ComfyUI's {CLIP_FOLDER} folder) or an Inf-DiT checkpoint that includes the image tower (the "
            f"official {OFFICIAL_FILENAME} does, and so does a file converted from it). It has no {keys} keys.")


def _holds_image_tower(keys) -> bool:
    return any(k.startswith(IMAGE_TOWER_PREFIXES) for k in keys)


def _clip_keys(keys: list[str], name: str) -> list[str]:
    """The keys that hold CLIP: the image_encoder.model.* part of an Inf-DiT file, else all. A file
    without an image tower is refused here, before its tensors are read (a DiT-only file would
    otherwise be reported as hundreds of missing and unexpected keys)."""
    if not _holds_image_tower(keys):
        raise CheckpointError(no_image_tower_message(name, any(k.startswith(_INFDIT_MARKERS) for k in keys)))
    return [k for k in keys if k.startswith(INFDIT_PREFIX)] or keys


def has_image_tower(path: str) -> Optional[bool]:
    """Whether the weights file `path` holds a CLIP image tower, told from its safetensors header
    (keys only, no tensor data). None when that cannot be told cheaply: a pickle (.pt/.bin) must be
    loaded whole, and a header that does not read is left for load_clip to report."""
    if not path.lower().endswith(SAFETENSORS_SUFFIXES):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            return _holds_image_tower(f.keys())
    except Exception:  # noqa: BLE001 - any unreadable header (SafetensorError, OSError): not ours to judge
        return None


def _resblock_count(sd: StateDict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _infer_config(sd: StateDict, has_text: bool, override: Optional[Mapping]) -> dict:
    """open_clip model config from tensor shapes; `override` (same layout) wins over inferred values."""
    cfg = copy.deepcopy(VIT_L_14)
    vision = cfg["vision_cfg"]
    if "visual.conv1.weight" in sd:  # [width, 3, patch, patch]
        width, _, _, vision["patch_size"] = sd["visual.conv1.weight"].shape
        vision["width"] = width
    if "visual.positional_embedding" in sd:
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)  # patches + class token
        vision["image_size"] = grid * vision["patch_size"]
    if n := _resblock_count(sd, "visual.transformer.resblocks."):
        vision["layers"] = n
    if "visual.transformer.resblocks.0.mlp.c_fc.weight" in sd:
        vision["mlp_ratio"] = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vision["width"]
    if "visual.proj" in sd:
        cfg["embed_dim"] = sd["visual.proj"].shape[1]

    text = cfg["text_cfg"]
    if has_text:
        if "token_embedding.weight" in sd:
            text["vocab_size"], text["width"] = sd["token_embedding.weight"].shape
        if "positional_embedding" in sd:
            text["context_length"] = sd["positional_embedding"].shape[0]
        if n := _resblock_count(sd, "transformer.resblocks."):
            text["layers"] = n
        if "transformer.resblocks.0.mlp.c_fc.weight" in sd:
            text["mlp_ratio"] = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text["width"]
        text["heads"] = max(1, text["width"] // _HEAD_WIDTH)

    for key, value in (override or {}).items():
        if isinstance(value, Mapping):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def _check_keys(expected: StateDict, given: StateDict) -> None:
    """Strict key/shape comparison with a readable report (load_state_dict's is one long line)."""
    def listing(title, items):
        shown = "\n    ".join(items[:12])
        more = f"\n    ... and {len(items) - 12} more" if len(items) > 12 else ""
        return f"  {title} ({len(items)}):\n    {shown}{more}" if items else ""

    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    misshaped = [
        f"{k}: file {tuple(given[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & given.keys())
        if given[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        parts = [listing("missing keys", missing), listing("unexpected keys", unexpected),
                 listing("wrong shapes", misshaped)]
        raise ValueError("CLIP checkpoint does not match the open_clip model it describes:\n"
                         + "\n".join(p for p in parts if p))


@functools.lru_cache(maxsize=None)
def _tokenizer(context_length: int):
    # The BPE vocabulary ships inside the open_clip package: no download.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def blend(embeddings: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum of embeddings ([B,D] or broadcastable [1,D]), L2-normalised (style mixing)."""
    if not embeddings or len(embeddings) != len(weights):
        raise ValueError(f"blend needs one weight per embedding, got {len(embeddings)} embeddings "
                         f"and {len(weights)} weights")
    total = sum(w * e.float() for e, w in zip(embeddings, weights))
    norm = total.norm(dim=-1, keepdim=True)
    if bool((norm < 1e-6).any()):
        raise ValueError("blend weights cancel out: the weighted sum of the embeddings is zero")
    return total / norm


class ClipEmbedder:
    """The CLIP image tower (and, when loaded, the text tower) with Inf-DiT's preprocessing."""

    def __init__(self, visual: torch.nn.Module, text_model: Optional[torch.nn.Module], image_size: int):
        self.visual = visual
        self._text_model = text_model  # the full open_clip CLIP (shares `visual`) or None
        # The module owning all weights: what a memory manager moves between devices.
        self.module = text_model if text_model is not None else visual
        self.image_size = image_size
        self._text_cache: dict[str, torch.Tensor] = {}  # prompt -> normalised text embedding (cpu fp32)
        self._mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    @property
    def has_text_tower(self) -> bool:
        return self._text_model is not None

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,h,w] in [0,1] -> normalised [B,3,S,S] float32, exactly torchvision's
        Resize(S, BICUBIC) + CenterCrop(S) + Normalize as used by the official encoder (spec 7.1)."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"expected an image batch [B,3,H,W], got shape {tuple(image.shape)}")
        size = self.image_size
        x = image.to(self.device, torch.float32)
        h, w = x.shape[-2:]
        # Shorter side -> S, longer side -> int(S * long / short), torchvision's size rule.
        if w <= h:
            new_h, new_w = int(size * h / w), size
        else:
            new_h, new_w = size, int(size * w / h)
        # torchvision's tensor Resize(S, InterpolationMode.BICUBIC) calls exactly this
        # F.interpolate (align_corners=False; antialias=True is its default since 0.17), so the result
        # is bit-identical. (It skips an already-right size; interpolate is an exact identity there.)
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        # CenterCrop offset uses Python round (ties to even), not floor division (spec 11.4).
        top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
        x = x[..., top:top + size, left:left + size]
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    @torch.no_grad()
    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,h,w] in [0,1] -> L2-normalised CLIP image embedding [B,D] float32 (D = 768)."""
        features = self.visual(self.preprocess(image).to(self.dtype))
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def _text_embedding(self, prompt: str) -> torch.Tensor:
        if prompt not in self._text_cache:
            model = self._text_model
            tokenizer = _tokenizer(model.context_length)
            if model.vocab_size != tokenizer.vocab_size:
                raise ValueError(f"the CLIP text tower has {model.vocab_size} token embeddings but the CLIP "
                                 f"BPE tokenizer has {tokenizer.vocab_size}: not a CLIP text tower")
            tokens = tokenizer([prompt]).to(self.device)
            self._text_cache[prompt] = model.encode_text(tokens, normalize=True)[0].float().cpu()
        return self._text_cache[prompt]

    def nudge(self, embedding: torch.Tensor, positive: str = DEFAULT_POSITIVE,
              negative: str = DEFAULT_NEGATIVE, strength: float = 0.0) -> torch.Tensor:
        """Paper eq. 5: norm(e + strength*t(positive) - strength*t(negative)); identity at strength 0."""
        if strength == 0:
            return embedding
        if not self.has_text_tower:
            raise ValueError(
                "The text-direction nudge (strength != 0) needs the CLIP text tower, but only the image "
                "tower is loaded (Inf-DiT checkpoints carry no text tower). Load the full "
                f"{CLIP_FILENAME} from {CLIP_HF_REPO} (put it in ComfyUI's {CLIP_FOLDER} folder), "
                "or set the strength to 0."
            )
        direction = self._text_embedding(positive) - self._text_embedding(negative)
        e = embedding.float() + strength * direction.to(embedding.device)
        return F.normalize(e, dim=-1)


def load_clip(source: Union[str, os.PathLike, StateDict], *, dtype: torch.dtype = torch.float32,
              device: Union[str, torch.device] = "cpu", config: Optional[Mapping] = None) -> ClipEmbedder:
    """Build the CLIP embedder from a local file or a state dict; never touches the network.

    `source`: open_clip state dict / file (.bin/.pt via torch.load(weights_only=True), or .safetensors),
    or an Inf-DiT state dict / file whose `image_encoder.model.*` keys hold CLIP (other keys ignored).
    `config`: open_clip model config entries ({"embed_dim", "vision_cfg", "text_cfg"}) overriding what
    is inferred from shapes; only needed for non-standard head widths (shapes cannot show heads).
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(_missing_file_message(path))
        # The Inf-DiT loader's reader: pickles loaded weights_only with nothing executed, a truncated
        # or corrupt file reported as such, and of a converted Inf-DiT file only the CLIP part read.
        sd, _ = read_state_dict(path, select=lambda keys: _clip_keys(keys, path))
    else:
        sd = {k: source[k] for k in _clip_keys(list(source), "state dict")}
    if any(k.startswith(INFDIT_PREFIX) for k in sd):  # then all of them are (_clip_keys)
        sd = {k[len(INFDIT_PREFIX):]: v for k, v in sd.items()}

    has_text = any(k.startswith(_TEXT_TOWER_MARKERS) for k in sd)
    if not has_text:
        sd = {k: v for k, v in sd.items() if k not in TEXT_LEFTOVERS}
    cfg = _infer_config(sd, has_text, config)
    visual, text_model = build_model(cfg, has_text)
    root = text_model if text_model is not None else visual
    # Compare with the state-dict naming of a full CLIP so reports read like the file's keys.
    expected = root.state_dict() if has_text else {"visual." + k: v for k, v in visual.state_dict().items()}
    _check_keys(expected, sd)
    root.load_state_dict(sd if has_text else {k[len("visual."):]: v for k, v in sd.items()}, strict=True)
    root.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ClipEmbedder(visual, text_model, cfg["vision_cfg"]["image_size"])


def build_model(cfg: Mapping, with_text: bool) -> tuple[torch.nn.Module, Optional[torch.nn.Module]]:
    """(vision tower, full open_clip CLIP or None) from an open_clip model config, randomly initialised.

    quick_gelu=False: ViT-L-14 DataComp uses standard GELU. Built in float32 and cast by the caller,
    as the official code cast the whole fp32 model (so the LayerNorms run in that dtype too).
    open_clip is imported here, not with the package: the sampler, the CLI without CLIP and the
    benchmarks run where it is not installed.
    """
    from open_clip.model import CLIP, _build_vision_tower

    if with_text:
        model = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=False)
        return model.visual, model
    return _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=False), None
