"""The IPAdapter_plus classes the seed workflows use, with the pack's real input schemas.

Faithful: the ``ipadapter`` folder registration, the V1 combo of ``IPAdapterModelLoader`` (a missing file
is a 400 ``value_not_in_list``), the unified loaders' file choice by regex at run time (missing files are
execution errors ``ClipVision model not found.`` / ``IPAdapter model not found.`` / ``LoRA model not
found.``), ``Missing CLIPVision model.`` when no CLIP vision is available, and the ``.ipadpt`` naming of
IPAdapterSaveEmbeds. Synthetic: no weights are read; outputs are digests of all inputs. SDXL vs SD1.5 is
decided from the checkpoint name (``xl`` in it means SDXL) because there is no model class to inspect.
FaceID needs InsightFace: the stand-in pretends it is installed only when
``<models_dir>/insightface/models/<model_name>/`` exists, else it fails like a missing package.
"""

from __future__ import annotations

import os
import re

import folder_paths
from nodes.values import Images, Synthetic, digest

# Register the model folder exactly like the real pack (extra_model_paths.yaml entries win).
if "ipadapter" not in folder_paths.folder_names_and_paths:
    current_paths = [os.path.join(folder_paths.models_dir, "ipadapter")]
else:
    current_paths, _ = folder_paths.folder_names_and_paths["ipadapter"]
folder_paths.folder_names_and_paths["ipadapter"] = (current_paths, folder_paths.supported_pt_extensions)

WEIGHT_TYPES = ["linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                "style and composition", "style transfer precise", "composition precise"]
COMBINE = ["concat", "add", "subtract", "average", "norm average"]
SCALING = ["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"]
PROVIDERS = ["CPU", "CUDA", "ROCM"]


def _is_sdxl(model: Synthetic) -> bool:
    return "xl" in str(model.info.get("name", "")).lower()


def get_clipvision_file(preset: str) -> str | None:
    preset = preset.lower()
    names = folder_paths.get_filename_list("clip_vision")
    if preset.startswith("vit-g"):
        pattern = r"(ViT.bigG.14.*39B.b160k|ipadapter.*sdxl|sdxl.*model\.(bin|safetensors))"
    elif preset.startswith("kolors"):
        pattern = r"(clip.vit.large.patch14.336\.(bin|safetensors))"
    else:
        pattern = r"(ViT.H.14.*s32B.b79K|ipadapter.*sd15|sd1.?5.*model\.(bin|safetensors))"
    found = [e for e in names if re.search(pattern, e, re.IGNORECASE)]
    return folder_paths.get_full_path("clip_vision", found[0]) if found else None


def _ipadapter_pattern(preset: str, is_sdxl: bool) -> tuple[str, bool, str | None]:
    """The pack's preset -> (file regex, needs insightface, lora regex) table."""
    names = folder_paths.get_filename_list("ipadapter")
    if preset.startswith("light"):
        if is_sdxl:
            raise Exception("light model is not supported for SDXL")
        pattern = r"sd15.light.v11\.(safetensors|bin)$"
        if not [e for e in names if re.search(pattern, e, re.IGNORECASE)]:
            pattern = r"sd15.light\.(safetensors|bin)$"
        return pattern, False, None
    if preset.startswith("standard"):
        return (r"ip.adapter.sdxl.vit.h\.(safetensors|bin)$" if is_sdxl
                else r"ip.adapter.sd15\.(safetensors|bin)$"), False, None
    if preset.startswith("vit-g"):
        return (r"ip.adapter.sdxl\.(safetensors|bin)$" if is_sdxl else r"sd15.vit.g\.(safetensors|bin)$"), False, None
    if preset.startswith("plus ("):
        return (r"plus.sdxl.vit.h\.(safetensors|bin)$" if is_sdxl
                else r"ip.adapter.plus.sd15\.(safetensors|bin)$"), False, None
    if preset.startswith("plus face"):
        return (r"plus.face.sdxl.vit.h\.(safetensors|bin)$" if is_sdxl
                else r"plus.face.sd15\.(safetensors|bin)$"), False, None
    if preset.startswith("full face"):
        if is_sdxl:
            raise Exception("full face model is not supported for SDXL")
        return r"full.face.sd15\.(safetensors|bin)$", False, None
    if preset.startswith("faceid portrait unnorm"):
        if not is_sdxl:
            raise Exception("portrait unnorm model is only supported for SDXL")
        return r"portrait.sdxl.unnorm\.(safetensors|bin)$", True, None
    if preset.startswith("faceid portrait"):
        return (r"portrait.sdxl\.(safetensors|bin)$" if is_sdxl
                else r"portrait.v11.sd15\.(safetensors|bin)$"), True, None
    if preset.startswith("faceid plus v2"):
        return ((r"faceid.plusv2.sdxl\.(safetensors|bin)$", True, r"faceid.plusv2.sdxl.lora\.safetensors$")
                if is_sdxl else
                (r"faceid.plusv2.sd15\.(safetensors|bin)$", True, r"faceid.plusv2.sd15.lora\.safetensors$"))
    if preset.startswith("faceid plus"):
        if is_sdxl:
            raise Exception("faceid plus model is not supported for SDXL")
        return r"faceid.plus.sd15\.(safetensors|bin)$", True, r"faceid.plus.sd15.lora\.safetensors$"
    if preset.startswith("faceid"):
        return ((r"faceid.sdxl\.(safetensors|bin)$", True, r"faceid.sdxl.lora\.safetensors$") if is_sdxl else
                (r"faceid.sd15\.(safetensors|bin)$", True, r"faceid.sd15.lora\.safetensors$"))
    raise Exception(f"invalid type '{preset}'")


def get_ipadapter_file(preset: str, is_sdxl: bool) -> tuple[str | None, bool, str | None]:
    pattern, is_insightface, lora_pattern = _ipadapter_pattern(preset.lower(), is_sdxl)
    found = [e for e in folder_paths.get_filename_list("ipadapter") if re.search(pattern, e, re.IGNORECASE)]
    path = folder_paths.get_full_path("ipadapter", found[0]) if found else None
    return path, is_insightface, lora_pattern


def get_lora_file(pattern: str) -> str | None:
    found = [e for e in folder_paths.get_filename_list("loras") if re.search(pattern, e, re.IGNORECASE)]
    return folder_paths.get_full_path("loras", found[0]) if found else None


def insightface_loader(provider: str, model_name: str = "buffalo_l") -> Synthetic:
    """Pretend insightface is installed only when its model folder exists (it is fixed to models_dir)."""
    model_dir = os.path.join(folder_paths.models_dir, "insightface", "models", model_name)
    if not os.path.isdir(model_dir):
        raise Exception(ModuleNotFoundError("No module named 'insightface'"))
    return Synthetic("INSIGHTFACE", digest("insightface", model_name, provider), {"name": model_name})


class IPAdapterModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ipadapter_file": (folder_paths.get_filename_list("ipadapter"),)}}

    RETURN_TYPES = ("IPADAPTER",)
    FUNCTION = "load_ipadapter_model"
    CATEGORY = "ipadapter/loaders"

    def load_ipadapter_model(self, ipadapter_file):
        path = folder_paths.get_full_path_or_raise("ipadapter", ipadapter_file)
        return (Synthetic("IPADAPTER", digest("ipadapter", ipadapter_file, os.path.getsize(path)),
                          {"name": ipadapter_file}),)


class IPAdapterInsightFaceLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"provider": (list(PROVIDERS),), "model_name": (["buffalo_l", "antelopev2"],)}}

    RETURN_TYPES = ("INSIGHTFACE",)
    FUNCTION = "load_insightface"
    CATEGORY = "ipadapter/loaders"

    def load_insightface(self, provider, model_name):
        return (insightface_loader(provider, model_name),)


class IPAdapterUnifiedLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "preset": (["LIGHT - SD1.5 only (low strength)", "STANDARD (medium strength)",
                                         "VIT-G (medium strength)", "PLUS (high strength)", "PLUS FACE (portraits)",
                                         "FULL FACE - SD1.5 only (portraits stronger)"],)},
                "optional": {"ipadapter": ("IPADAPTER",)}}

    RETURN_TYPES = ("MODEL", "IPADAPTER")
    RETURN_NAMES = ("model", "ipadapter")
    FUNCTION = "load_models"
    CATEGORY = "ipadapter"

    def load_models(self, model, preset, lora_strength=0.0, provider="CPU", ipadapter=None):
        clipvision_file = get_clipvision_file(preset)
        if clipvision_file is None:
            raise Exception("ClipVision model not found.")
        ipadapter_file, is_insightface, lora_pattern = get_ipadapter_file(preset, _is_sdxl(model))
        if ipadapter_file is None:
            raise Exception("IPAdapter model not found.")
        parts = [preset, os.path.basename(clipvision_file), os.path.basename(ipadapter_file)]
        if lora_pattern is not None:
            lora_file = get_lora_file(lora_pattern)
            if lora_file is None:
                raise Exception("LoRA model not found.")
            parts += [os.path.basename(lora_file), lora_strength]
        insightface = insightface_loader(provider) if is_insightface else None
        pipeline = Synthetic("IPADAPTER", digest("unified", *parts),
                             {"name": os.path.basename(ipadapter_file),
                              "clipvision": Synthetic("CLIP_VISION", digest("clip_vision", parts[1])),
                              "insightface": insightface})
        new_model = Synthetic("MODEL", digest(model.origin, "unified", *parts), dict(model.info))
        return (new_model, pipeline)


class IPAdapterUnifiedLoaderFaceID(IPAdapterUnifiedLoader):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "preset": (["FACEID", "FACEID PLUS - SD1.5 only", "FACEID PLUS V2",
                                         "FACEID PORTRAIT (style transfer)",
                                         "FACEID PORTRAIT UNNORM - SDXL only (strong)"],),
                             "lora_strength": ("FLOAT", {"default": 0.6, "min": 0, "max": 1, "step": 0.01}),
                             "provider": (["CPU", "CUDA", "ROCM", "DirectML", "OpenVINO", "CoreML"],)},
                "optional": {"ipadapter": ("IPADAPTER",)}}

    RETURN_NAMES = ("MODEL", "ipadapter")
    CATEGORY = "ipadapter/faceid"


def _apply(model, ipadapter, image, clip_vision, **params) -> Synthetic:
    """What every IPAdapter apply node does here: require a CLIP vision model, then fold all inputs in."""
    cv = clip_vision if clip_vision is not None else ipadapter.info.get("clipvision")
    if cv is None:
        raise Exception("Missing CLIPVision model.")
    extras = {k: (v.content_digest() if isinstance(v, Images) or hasattr(v, "content_digest") else
                  getattr(v, "origin", v)) for k, v in sorted(params.items())}
    return Synthetic("MODEL", digest(model.origin, "ipadapter", ipadapter.origin, image.content_digest(),
                                     cv.origin, extras), dict(model.info))


class IPAdapterAdvanced:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "ipadapter": ("IPADAPTER",),
            "image": ("IMAGE",),
            "weight": ("FLOAT", {"default": 1.0, "min": -1, "max": 5, "step": 0.05}),
            "weight_type": (list(WEIGHT_TYPES),),
            "combine_embeds": (list(COMBINE),),
            "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "embeds_scaling": (list(SCALING),),
        }, "optional": {
            "image_negative": ("IMAGE",),
            "attn_mask": ("MASK",),
            "clip_vision": ("CLIP_VISION",),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter"

    def apply_ipadapter(self, model, ipadapter, image, weight=1.0, weight_type="linear", combine_embeds="concat",
                        start_at=0.0, end_at=1.0, embeds_scaling="V only", image_negative=None, attn_mask=None,
                        clip_vision=None, **kwargs):
        return (_apply(model, ipadapter, image, clip_vision, weight=weight, weight_type=weight_type,
                       combine_embeds=combine_embeds, start_at=start_at, end_at=end_at,
                       embeds_scaling=embeds_scaling, image_negative=image_negative, attn_mask=attn_mask),)


class IPAdapter:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "ipadapter": ("IPADAPTER",),
            "image": ("IMAGE",),
            "weight": ("FLOAT", {"default": 1.0, "min": -1, "max": 3, "step": 0.05}),
            "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "weight_type": (["standard", "prompt is more important", "style transfer"],),
        }, "optional": {"attn_mask": ("MASK",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter"

    def apply_ipadapter(self, model, ipadapter, image, weight, start_at, end_at, weight_type, attn_mask=None):
        return (_apply(model, ipadapter, image, None, weight=weight, start_at=start_at, end_at=end_at,
                       weight_type=weight_type, attn_mask=attn_mask),)


class IPAdapterFaceID:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "ipadapter": ("IPADAPTER",),
            "image": ("IMAGE",),
            "weight": ("FLOAT", {"default": 1.0, "min": -1, "max": 3, "step": 0.05}),
            "weight_faceidv2": ("FLOAT", {"default": 1.0, "min": -1, "max": 5.0, "step": 0.05}),
            "weight_type": (list(WEIGHT_TYPES),),
            "combine_embeds": (list(COMBINE),),
            "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "embeds_scaling": (list(SCALING),),
        }, "optional": {
            "image_negative": ("IMAGE",),
            "attn_mask": ("MASK",),
            "clip_vision": ("CLIP_VISION",),
            "insightface": ("INSIGHTFACE",),
        }}

    RETURN_TYPES = ("MODEL", "IMAGE")
    RETURN_NAMES = ("MODEL", "face_image")
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter/faceid"

    def apply_ipadapter(self, model, ipadapter, image, weight=1.0, weight_faceidv2=1.0, weight_type="linear",
                        combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="V only",
                        image_negative=None, attn_mask=None, clip_vision=None, insightface=None):
        face = insightface if insightface is not None else ipadapter.info.get("insightface")
        if face is None:
            raise Exception("InsightFace must be provided for FaceID models.")
        new_model = _apply(model, ipadapter, image, clip_vision, weight=weight, weight_faceidv2=weight_faceidv2,
                           weight_type=weight_type, combine_embeds=combine_embeds, start_at=start_at,
                           end_at=end_at, embeds_scaling=embeds_scaling, image_negative=image_negative,
                           attn_mask=attn_mask, insightface=face)
        return (new_model, image)


class IPAdapterEncoder:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ipadapter": ("IPADAPTER",), "image": ("IMAGE",),
                             "weight": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 3.0, "step": 0.01})},
                "optional": {"mask": ("MASK",), "clip_vision": ("CLIP_VISION",)}}

    RETURN_TYPES = ("EMBEDS", "EMBEDS")
    RETURN_NAMES = ("pos_embed", "neg_embed")
    FUNCTION = "encode"
    CATEGORY = "ipadapter/embeds"

    def encode(self, ipadapter, image, weight, mask=None, clip_vision=None):
        cv = clip_vision if clip_vision is not None else ipadapter.info.get("clipvision")
        if cv is None:
            raise Exception("Missing CLIPVision model.")
        base = digest(ipadapter.origin, cv.origin, image.content_digest(), weight)
        return (Synthetic("EMBEDS", digest(base, "pos")), Synthetic("EMBEDS", digest(base, "neg")))


class IPAdapterSaveEmbeds:
    def __init__(self):
        self.output_dir = folder_paths.get_output_directory()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"embeds": ("EMBEDS",), "filename_prefix": ("STRING", {"default": "IP_embeds"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "ipadapter/embeds"

    def save(self, embeds, filename_prefix):
        full_output_folder, filename, counter, _subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, self.output_dir)
        path = os.path.join(full_output_folder, f"{filename}_{counter:05}.ipadpt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(embeds.origin)
        return (None,)


NODE_CLASS_MAPPINGS = {
    "IPAdapter": IPAdapter,
    "IPAdapterAdvanced": IPAdapterAdvanced,
    "IPAdapterFaceID": IPAdapterFaceID,
    "IPAdapterUnifiedLoader": IPAdapterUnifiedLoader,
    "IPAdapterUnifiedLoaderFaceID": IPAdapterUnifiedLoaderFaceID,
    "IPAdapterModelLoader": IPAdapterModelLoader,
    "IPAdapterInsightFaceLoader": IPAdapterInsightFaceLoader,
    "IPAdapterEncoder": IPAdapterEncoder,
    "IPAdapterSaveEmbeds": IPAdapterSaveEmbeds,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAdapter": "IPAdapter",
    "IPAdapterAdvanced": "IPAdapter Advanced",
    "IPAdapterFaceID": "IPAdapter FaceID",
    "IPAdapterUnifiedLoader": "IPAdapter Unified Loader",
    "IPAdapterUnifiedLoaderFaceID": "IPAdapter Unified Loader FaceID",
    "IPAdapterModelLoader": "IPAdapter Model Loader",
    "IPAdapterInsightFaceLoader": "IPAdapter InsightFace Loader",
    "IPAdapterEncoder": "IPAdapter Encoder",
    "IPAdapterSaveEmbeds": "IPAdapter Save Embeds",
}
