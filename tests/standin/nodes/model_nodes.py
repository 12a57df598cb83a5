"""Model-consuming nodes with ComfyUI's real input schemas and synthetic, deterministic results.

Loaders resolve their file in the model folders exactly like ComfyUI (``Model in folder 'x' with
filename 'y' not found.`` when it vanished after validation) but never read weights. Every output is a
``Synthetic``/``Latent`` carrying a digest of all its inputs; VAEDecode renders an image whose pixels are
derived from that digest, so the picture changes whenever seed, prompt text, size, model names or input
image bytes change, and stays identical when they don't. Samplers report ``progress`` every step, taking
``STANDIN_STEP_DELAY_S`` seconds per step.
"""

from __future__ import annotations

import hashlib
import time

import faults
import folder_paths
import runtime

from .values import Images, Latent, Synthetic, digest

MAX_RESOLUTION = 16384

SAMPLERS = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
            "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
            "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
            "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
            "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
            "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde",
            "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
              "linear_quadratic", "kl_optimal"]
CLIP_TYPES = ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
              "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image"]


def model_file(folder: str, name: str) -> str:
    """Resolve a model file like ComfyUI does and return a digest of its name and size (not its bytes)."""
    import os  # noqa: PLC0415
    path = folder_paths.get_full_path_or_raise(folder, name)
    return digest(folder, name, os.path.getsize(path))


def render(origin: str, width: int, height: int, index: int = 0):
    """An RGB picture whose pixels are a function of ``origin``: an 8x8 colour grid scaled up."""
    from PIL import Image  # noqa: PLC0415
    seed = hashlib.sha256(f"{origin}/{index}".encode()).digest()
    data = b""
    while len(data) < 192:
        seed = hashlib.sha256(seed).digest()
        data += seed
    small = Image.frombytes("RGB", (8, 8), data[:192])
    return small.resize((max(1, width), max(1, height)), Image.NEAREST)


class CheckpointLoaderSimple:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),
                                           {"tooltip": "The name of the checkpoint (model) to load."})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The model used for denoising latents.",
                       "The CLIP model used for encoding text prompts.",
                       "The VAE model used for encoding and decoding images to and from latent space.")
    FUNCTION = "load_checkpoint"
    CATEGORY = "loaders"
    DESCRIPTION = "Loads a diffusion model checkpoint, diffusion models are used to denoise latents."

    def load_checkpoint(self, ckpt_name):
        d = model_file("checkpoints", ckpt_name)
        return (Synthetic("MODEL", digest("model", d), {"name": ckpt_name}),
                Synthetic("CLIP", digest("clip", d), {"name": ckpt_name}),
                Synthetic("VAE", digest("vae", d), {"name": ckpt_name}))


class CLIPSetLastLayer:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",),
                             "stop_at_clip_layer": ("INT", {"default": -1, "min": -24, "max": -1, "step": 1})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "set_last_layer"
    CATEGORY = "conditioning"

    def set_last_layer(self, clip, stop_at_clip_layer):
        return (Synthetic("CLIP", digest(clip.origin, "last_layer", stop_at_clip_layer), dict(clip.info)),)


class CLIPTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The text to be encoded."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("A conditioning containing the embedded text used to guide the diffusion model.",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"
    DESCRIPTION = ("Encodes a text prompt using a CLIP model into an embedding that can be used to guide the "
                   "diffusion model towards generating specific images.")

    def encode(self, clip, text):
        if clip is None:
            raise RuntimeError("ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node "
                               "your checkpoint does not contain a valid clip or text encoder model.")
        return (Synthetic("CONDITIONING", digest(clip.origin, "text", text), {"text": text}),)


class EmptyLatentImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                              "tooltip": "The width of the latent images in pixels."}),
            "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                               "tooltip": "The height of the latent images in pixels."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096,
                                   "tooltip": "The number of latent images in the batch."}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The empty latent image batch.",)
    FUNCTION = "generate"
    CATEGORY = "latent"
    DESCRIPTION = "Create a new batch of empty latent images to be denoised via sampling."

    def generate(self, width, height, batch_size=1):
        return ({"samples": Latent(batch_size, height // 8, width // 8, digest("empty", width, height, batch_size))},)


class KSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model used for denoising the input latent."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "The random seed used for creating the noise."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000,
                              "tooltip": "The number of steps used in the denoising process."}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "The Classifier-Free Guidance scale balances creativity and adherence to "
                                         "the prompt. Higher values result in images more closely matching the "
                                         "prompt however too high values will negatively impact quality."}),
            "sampler_name": (list(SAMPLERS), {"tooltip": "The algorithm used when sampling, this can affect the "
                                                         "quality, speed, and style of the generated output."}),
            "scheduler": (list(SCHEDULERS), {"tooltip": "The scheduler controls how noise is gradually removed "
                                                        "to form the image."}),
            "positive": ("CONDITIONING", {"tooltip": "The conditioning describing the attributes you want to "
                                                     "include in the image."}),
            "negative": ("CONDITIONING", {"tooltip": "The conditioning describing the attributes you want to "
                                                     "exclude from the image."}),
            "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "The amount of denoising applied, lower values will maintain the "
                                             "structure of the initial image allowing for image to image "
                                             "sampling."}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = "sampling"
    DESCRIPTION = "Uses the provided model, positive and negative conditioning to denoise the latent image."

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               denoise=1.0):
        pbar = runtime.ProgressBar(steps)
        delay = faults.step_delay()
        for step in range(steps):
            if delay > 0:
                time.sleep(delay)
            pbar.update_absolute(step + 1, steps)
        src: Latent = latent_image["samples"]
        origin = digest("ksampler", model.origin, seed, steps, cfg, sampler_name, scheduler, positive.origin,
                        negative.origin, src.origin, denoise)
        out = dict(latent_image)
        out["samples"] = Latent(src.batch, src.height, src.width, origin)
        return (out,)


class VAEDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
                             "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."})}}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"
    CATEGORY = "latent"
    DESCRIPTION = "Decodes latent images back into pixel space images."

    def decode(self, vae, samples):
        lat: Latent = samples["samples"]
        origin = digest("decode", vae.origin, lat.origin)
        return (Images([render(origin, lat.width * 8, lat.height * 8, i) for i in range(lat.batch)]),)


class VAEEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "latent"

    def encode(self, vae, pixels):
        b, h, w, _ = pixels.shape
        return ({"samples": Latent(b, h // 8, w // 8, digest("encode", vae.origin, pixels.content_digest()))},)


class VAELoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": (cls.vae_list(),)}}

    @staticmethod
    def vae_list() -> list[str]:
        """VAE files plus ``pixel_space`` (ComfyUI also lists TAESD pairs found in vae_approx)."""
        vaes = folder_paths.get_filename_list("vae")
        approx = folder_paths.get_filename_list("vae_approx")
        for name, parts in (("taesd", ("taesd_encoder.", "taesd_decoder.")),
                            ("taesdxl", ("taesdxl_encoder.", "taesdxl_decoder.")),
                            ("taesd3", ("taesd3_encoder.", "taesd3_decoder.")),
                            ("taef1", ("taef1_encoder.", "taef1_decoder."))):
            if all(any(a.startswith(p) for a in approx) for p in parts):
                vaes.append(name)
        vaes.append("pixel_space")
        return vaes

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"
    CATEGORY = "loaders"

    def load_vae(self, vae_name):
        if vae_name in ("pixel_space", "taesd", "taesdxl", "taesd3", "taef1"):
            return (Synthetic("VAE", digest("vae", vae_name), {"name": vae_name}),)
        return (Synthetic("VAE", digest("vae", model_file("vae", vae_name)), {"name": vae_name}),)


class UNETLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),),
                             "weight_dtype": (["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"],)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    CATEGORY = "advanced/loaders"

    def load_unet(self, unet_name, weight_dtype):
        d = model_file("diffusion_models", unet_name)
        return (Synthetic("MODEL", digest("unet", d, weight_dtype), {"name": unet_name}),)


class CLIPLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),),
                             "type": (list(CLIP_TYPES),)},
                "optional": {"device": (["default", "cpu"], {"advanced": True})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = "advanced/loaders"


    def load_clip(self, clip_name, type="stable_diffusion", device="default"):
        d = model_file("text_encoders", clip_name)
        return (Synthetic("CLIP", digest("cliploader", d, type), {"name": clip_name}),)


class LoraLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}),
            "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "The name of the LoRA."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "How strongly to modify the diffusion model. This value can "
                                                    "be negative."}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                        "tooltip": "How strongly to modify the CLIP model. This value can be "
                                                   "negative."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The modified diffusion model.", "The modified CLIP model.")
    FUNCTION = "load_lora"
    CATEGORY = "loaders"
    DESCRIPTION = ("LoRAs are used to modify diffusion and CLIP models, altering the way in which latents are "
                   "denoised such as applying styles. Multiple LoRA nodes can be linked together.")

    def load_lora(self, model, clip, lora_name, strength_model, strength_clip):
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        d = model_file("loras", lora_name)
        return (Synthetic("MODEL", digest(model.origin, "lora", d, strength_model), dict(model.info)),
                Synthetic("CLIP", digest(clip.origin, "lora", d, strength_clip), dict(clip.info)))


class CLIPVisionLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("clip_vision"),)}}

    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load_clip"
    CATEGORY = "loaders"

    def load_clip(self, clip_name):
        d = model_file("clip_vision", clip_name)
        return (Synthetic("CLIP_VISION", digest("clip_vision", d), {"name": clip_name}),)


class CLIPVisionEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_vision": ("CLIP_VISION",), "image": ("IMAGE",),
                             "crop": (["center", "none"],)}}

    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"

    def encode(self, clip_vision, image, crop):
        return (Synthetic("CLIP_VISION_OUTPUT", digest(clip_vision.origin, image.content_digest(), crop)),)


class unCLIPConditioning:  # noqa: N801 - ComfyUI's class name
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "clip_vision_output": ("CLIP_VISION_OUTPUT",),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
            "noise_augmentation": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "apply_adm"
    CATEGORY = "conditioning"

    def apply_adm(self, conditioning, clip_vision_output, strength, noise_augmentation):
        if strength == 0:
            return (conditioning,)
        return (Synthetic("CONDITIONING", digest(conditioning.origin, "unclip", clip_vision_output.origin, strength,
                                                 noise_augmentation), dict(conditioning.info)),)


class ConditioningZeroOut:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "zero_out"
    CATEGORY = "advanced/conditioning"

    def zero_out(self, conditioning):
        return (Synthetic("CONDITIONING", digest(conditioning.origin, "zero")),)


NODE_CLASS_MAPPINGS = {
    "KSampler": KSampler,
    "CheckpointLoaderSimple": CheckpointLoaderSimple,
    "CLIPTextEncode": CLIPTextEncode,
    "CLIPSetLastLayer": CLIPSetLastLayer,
    "VAEDecode": VAEDecode,
    "VAEEncode": VAEEncode,
    "VAELoader": VAELoader,
    "EmptyLatentImage": EmptyLatentImage,
    "LoraLoader": LoraLoader,
    "CLIPLoader": CLIPLoader,
    "UNETLoader": UNETLoader,
    "CLIPVisionLoader": CLIPVisionLoader,
    "CLIPVisionEncode": CLIPVisionEncode,
    "unCLIPConditioning": unCLIPConditioning,
    "ConditioningZeroOut": ConditioningZeroOut,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "KSampler": "KSampler",
    "CheckpointLoaderSimple": "Load Checkpoint",
    "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "CLIPSetLastLayer": "CLIP Set Last Layer",
    "VAEDecode": "VAE Decode",
    "VAEEncode": "VAE Encode",
    "VAELoader": "Load VAE",
    "EmptyLatentImage": "Empty Latent Image",
    "LoraLoader": "Load LoRA",
    "CLIPLoader": "Load CLIP",
    "UNETLoader": "Load Diffusion Model",
    "CLIPVisionLoader": "Load CLIP Vision",
    "CLIPVisionEncode": "CLIP Vision Encode",
}
