"""Tiny but complete real models for ComfyUI 0.3.64 + IPAdapter_plus on the CPU, made from a seed in ~0.1 s.

    python tests/helpers/tiny_models.py OUT_DIR [--seed N]     (with an interpreter that has torch: ComfyUI's venv)

Writes, under OUT_DIR, the folders the worker's generated extra_model_paths.yaml maps (``MODELS_DIR/<key>``):

    checkpoints/tiny_sdxl.ckpt                        SDXL (detected by its shapes): UNet, CLIP-L + CLIP-G, TAESD VAE
    clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.bin   CLIP-vision ViT-H/14 (32 layers, width 1280, projection 1024)
    ipadapter/ip-adapter_sdxl_vit-h.bin               SDXL IPAdapter, "STANDARD" preset (ImageProjModel)
    ipadapter/ip-adapter-plus_sdxl_vit-h.bin          SDXL IPAdapter, "PLUS (high strength)" preset (Resampler)

and ``models.json`` (every file's size and SHA-256). The same seed and torch version give the same bytes.

Why these are small yet complete: ComfyUI loads ``.ckpt``/``.bin`` with ``torch.load(weights_only=True)`` and
copies the values, and ``torch.save`` keeps tensor views, so every weight is a strided view of one of a few 1-D
storages of 64 Ki floats and each storage is written once (3 MB for a 941M-parameter SDXL). Every key is present
with its exact shape, so nothing is left uninitialised (which gives NaN, a black image). safetensors cannot store
views, hence the ``.bin``/``.ckpt`` files. What ComfyUI and IPAdapter_plus read from the keys and shapes is in
``../shared/upstream/README.md``.

The UNet: model_channels 320, ONE level (channel_mult [1]) with 6 res blocks whose transformer depths are
[0,0,2,2,10,10] (what ComfyUI's SDXL entry matches), no attention in the output blocks, no middle block. So
input blocks 4 and 5 carry cross-attention and IPAdapter_plus patches ("input", 4|5, 0|1): IP layer keys 1, 3, 5,
7 (all 70 of a real SDXL adapter are written, each [320, 2048]).

Only this module's ``generate``/``main`` need torch; importing it does not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEFAULT_SEED = 20251012
CHECKPOINT = "checkpoints/tiny_sdxl.ckpt"
CLIP_VISION = "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.bin"
IPADAPTER_STANDARD = "ipadapter/ip-adapter_sdxl_vit-h.bin"
IPADAPTER_PLUS = "ipadapter/ip-adapter-plus_sdxl_vit-h.bin"
FILES = (CHECKPOINT, CLIP_VISION, IPADAPTER_STANDARD, IPADAPTER_PLUS)
MANIFEST = "models.json"

VOCAB = 49408
CTX = 77
STORAGE_LEN = 1 << 16  # >= the longest view (token embedding [49408, 1280]: 50687) + the largest offset
MAX_OFF = 4096


class Pool:
    """Deterministic strided views of a few shared random storages, one storage per initialisation scale:
    ``w<fan-in bucket>`` ~ N(0, 1/fan_in), ``one`` ~ 1+N(0,.05) (norm weights), ``bias`` and ``emb`` ~ N(0,.02),
    ``half`` ~ .5+N(0,.1) and ``wout`` ~ N(0,(.25/24)^2) (TAESD's last conv, so pixels spread around mid-grey
    instead of clipping to black or white)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.storages: dict[str, torch.Tensor] = {}

    def _storage(self, kind: str) -> torch.Tensor:
        import torch

        if kind not in self.storages:
            g = torch.Generator().manual_seed(self.seed * 1000003 + zlib.crc32(kind.encode()))
            s = torch.randn(STORAGE_LEN, generator=g, dtype=torch.float32)
            if kind == "wout":
                s *= 0.25 / math.sqrt(576)
            elif kind.startswith("w"):
                s *= 1.0 / math.sqrt(int(kind[1:]))
            elif kind == "one":
                s = 1.0 + 0.05 * s
            elif kind in ("bias", "emb"):
                s *= 0.02
            elif kind == "half":
                s = 0.5 + 0.1 * s
            else:
                raise ValueError(f"unknown storage kind {kind!r}")
            self.storages[kind] = s
        return self.storages[kind]

    def view(self, name: str, shape: tuple[int, ...], kind: str) -> torch.Tensor:
        """``W[o, rest...] = s[off + r*o + flat(rest)]``: each row is a window of fan_in distinct storage values
        (all-ones strides would reuse a value up to k*k times in a conv kernel and blow up activations in
        norm-free nets like TAESD); rows start ``r`` apart, as far as the storage allows."""
        import torch

        s = self._storage(kind)
        off = zlib.crc32(name.encode()) % MAX_OFF
        if not shape:
            return s[off].clone()
        inner: list[int] = []
        acc = 1
        for d in reversed(shape[1:]):
            inner.insert(0, acc)
            acc *= d
        fan, rows = acc, shape[0]
        r = fan if rows == 1 else max(1, min(fan, (STORAGE_LEN - off - fan) // (rows - 1)))
        assert off + r * (rows - 1) + fan <= STORAGE_LEN, (name, shape)
        return torch.as_strided(s, shape, (r, *inner), off)

    def w(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A weight scaled by its fan-in (a handful of power-of-two buckets, not one storage per fan-in)."""
        fan_in = math.prod(shape[1:])
        bucket = 2 ** round(math.log2(max(fan_in, 1)))
        return self.view(name, shape, f"w{bucket}")


class StateDict(dict):
    """A state dict built layer by layer from one pool."""

    def __init__(self, pool: Pool) -> None:
        super().__init__()
        self.p = pool

    def linear(self, k: str, o: int, i: int, bias: bool = True) -> None:
        self[k + ".weight"] = self.p.w(k + ".weight", (o, i))
        if bias:
            self[k + ".bias"] = self.p.view(k + ".bias", (o,), "bias")

    def conv(self, k: str, o: int, i: int, ks: int, bias: bool = True) -> None:
        self[k + ".weight"] = self.p.w(k + ".weight", (o, i, ks, ks))
        if bias:
            self[k + ".bias"] = self.p.view(k + ".bias", (o,), "bias")

    def norm(self, k: str, c: int) -> None:
        self[k + ".weight"] = self.p.view(k + ".weight", (c,), "one")
        self[k + ".bias"] = self.p.view(k + ".bias", (c,), "bias")

    def emb(self, k: str, shape: tuple[int, ...]) -> None:
        self[k] = self.p.view(k, shape, "emb")

    def stripped(self, prefix: str) -> dict[str, Any]:
        return {k[len(prefix):]: v for k, v in self.items()}


# ------------------------------------------------------------------------ SDXL UNet (ComfyUI's openaimodel layout)


def unet(sd: StateDict, pre: str, mc: int = 320, ctx: int = 2048, adm: int = 2816,
         depths: tuple[int, ...] = (0, 0, 2, 2, 10, 10)) -> None:
    ted = mc * 4
    sd.linear(pre + "time_embed.0", ted, mc)
    sd.linear(pre + "time_embed.2", ted, ted)
    sd.linear(pre + "label_emb.0.0", ted, adm)
    sd.linear(pre + "label_emb.0.2", ted, ted)
    sd.conv(pre + "input_blocks.0.0", mc, 4, 3)

    def resblock(k: str, cin: int, cout: int) -> None:
        sd.norm(k + ".in_layers.0", cin)
        sd.conv(k + ".in_layers.2", cout, cin, 3)
        sd.linear(k + ".emb_layers.1", cout, ted)
        sd.norm(k + ".out_layers.0", cout)
        sd.conv(k + ".out_layers.3", cout, cout, 3)
        if cin != cout:
            sd.conv(k + ".skip_connection", cout, cin, 1)

    def transformer(k: str, c: int, depth: int) -> None:
        sd.norm(k + ".norm", c)
        sd.linear(k + ".proj_in", c, c)
        for d in range(depth):
            b = f"{k}.transformer_blocks.{d}"
            for a, kv_dim in (("attn1", c), ("attn2", ctx)):
                sd.linear(f"{b}.{a}.to_q", c, c, bias=False)
                sd.linear(f"{b}.{a}.to_k", c, kv_dim, bias=False)
                sd.linear(f"{b}.{a}.to_v", c, kv_dim, bias=False)
                sd.linear(f"{b}.{a}.to_out.0", c, c)
            sd.linear(f"{b}.ff.net.0.proj", c * 8, c)
            sd.linear(f"{b}.ff.net.2", c, c * 4)
            for n in ("norm1", "norm2", "norm3"):
                sd.norm(f"{b}.{n}", c)
        sd.linear(k + ".proj_out", c, c)

    for i, depth in enumerate(depths, start=1):
        resblock(f"{pre}input_blocks.{i}.0", mc, mc)
        if depth:
            transformer(f"{pre}input_blocks.{i}.1", mc, depth)
    for i in range(len(depths) + 1):  # output blocks: the skip concatenated (320+320) -> 320, no attention
        resblock(f"{pre}output_blocks.{i}.0", 2 * mc, mc)
    sd.norm(pre + "out.0", mc)
    sd.conv(pre + "out.2", 4, mc, 3)


# ------------------------------------------------------------------------ CLIP text encoders


def hf_encoder_layers(sd: StateDict, pre: str, dim: int, layers: int, inter: int) -> None:
    """The transformer layers of HF's CLIP encoders, text and vision alike: ``<pre>.layers.N.*``."""
    for layer in range(layers):
        b = f"{pre}.layers.{layer}"
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd.linear(f"{b}.self_attn.{p}", dim, dim)
        sd.norm(b + ".layer_norm1", dim)
        sd.norm(b + ".layer_norm2", dim)
        sd.linear(b + ".mlp.fc1", inter, dim)
        sd.linear(b + ".mlp.fc2", dim, inter)


def clip_text_hf(sd: StateDict, pre: str, dim: int, layers: int, inter: int) -> None:
    """HF CLIPTextModel layout (SDXL's embedders.0, CLIP-L)."""
    sd.emb(pre + "text_model.embeddings.token_embedding.weight", (VOCAB, dim))
    sd.emb(pre + "text_model.embeddings.position_embedding.weight", (CTX, dim))
    hf_encoder_layers(sd, pre + "text_model.encoder", dim, layers, inter)
    sd.norm(pre + "text_model.final_layer_norm", dim)


def clip_text_openclip(sd: StateDict, pre: str, dim: int, layers: int, inter: int) -> None:
    """OpenCLIP layout, as real SDXL checkpoints store embedders.1 (CLIP-G); ComfyUI converts it on load."""
    import torch

    sd.emb(pre + "token_embedding.weight", (VOCAB, dim))
    sd.emb(pre + "positional_embedding", (CTX, dim))
    for layer in range(layers):
        b = f"{pre}transformer.resblocks.{layer}"
        sd[b + ".attn.in_proj_weight"] = sd.p.w(b + ".attn.in_proj_weight", (3 * dim, dim))
        sd[b + ".attn.in_proj_bias"] = sd.p.view(b + ".attn.in_proj_bias", (3 * dim,), "bias")
        sd.linear(b + ".attn.out_proj", dim, dim)
        sd.norm(b + ".ln_1", dim)
        sd.norm(b + ".ln_2", dim)
        sd.linear(b + ".mlp.c_fc", inter, dim)
        sd.linear(b + ".mlp.c_proj", dim, inter)
    sd.norm(pre + "ln_final", dim)
    sd[pre + "text_projection"] = sd.p.w(pre + "text_projection", (dim, dim))  # [in, out]: transposed on load
    sd[pre + "logit_scale"] = torch.tensor(4.6052)


# ------------------------------------------------------------------------ TAESD (comfy/taesd/taesd.py layout)


def taesd(sd: StateDict, pre: str, lc: int = 4) -> None:
    """The tiny autoencoder; ``taesd_decoder.1.weight`` [64, 4, 3, 3] makes ComfyUI pick it as the VAE."""
    import torch

    def block(k: str) -> None:
        for j in (0, 2, 4):
            sd.conv(f"{k}.conv.{j}", 64, 64, 3)

    e = pre + "taesd_encoder."
    sd.conv(e + "0", 64, 3, 3)
    block(e + "1")
    idx = 2
    for _ in range(3):
        sd.conv(f"{e}{idx}", 64, 64, 3, bias=False)
        for j in range(1, 4):
            block(f"{e}{idx + j}")
        idx += 4
    sd.conv(f"{e}{idx}", lc, 64, 3)  # 14

    d = pre + "taesd_decoder."
    sd.conv(d + "1", 64, lc, 3)
    idx = 3
    for _ in range(3):
        for j in range(3):
            block(f"{d}{idx + j}")
        sd.conv(f"{d}{idx + 4}", 64, 64, 3, bias=False)  # idx+3 is the Upsample
        idx += 5
    block(f"{d}{idx}")  # 18
    k = f"{d}{idx + 1}"  # 19: the final conv 64 -> 3
    sd[k + ".weight"] = sd.p.view(k + ".weight", (3, 64, 3, 3), "wout")
    sd[k + ".bias"] = sd.p.view(k + ".bias", (3,), "half")
    sd[pre + "vae_scale"] = torch.tensor(1.0)
    sd[pre + "vae_shift"] = torch.tensor(0.0)


# ------------------------------------------------------------------------ CLIP vision ViT-H/14 (HF layout)


def clip_vision(sd: StateDict, dim: int = 1280, layers: int = 32, inter: int = 5120, proj: int = 1024,
                patch: int = 14, image: int = 224) -> None:
    """ComfyUI tells ViT-H by the presence of ``vision_model.encoder.layers.30``."""
    v = "vision_model."
    sd.emb(v + "embeddings.class_embedding", (dim,))
    sd.conv(v + "embeddings.patch_embedding", dim, 3, patch, bias=False)
    sd.emb(v + "embeddings.position_embedding.weight", ((image // patch) ** 2 + 1, dim))
    sd.norm(v + "pre_layrnorm", dim)
    hf_encoder_layers(sd, v + "encoder", dim, layers, inter)
    sd.norm(v + "post_layernorm", dim)
    sd.linear("visual_projection", proj, dim, bias=False)


# ------------------------------------------------------------------------ IPAdapter (SDXL)


def ip_layers(pool: Pool, channels: int = 320, ctx: int = 2048, n: int = 70) -> dict[str, Any]:
    """``to_k_ip``/``to_v_ip`` per cross-attention layer, keys 1, 3, ..., 139 as in real SDXL adapters."""
    ip = StateDict(pool)
    for i in range(n):
        k = 2 * i + 1
        ip.linear(f"ip_adapter.{k}.to_k_ip", channels, ctx, bias=False)
        ip.linear(f"ip_adapter.{k}.to_v_ip", channels, ctx, bias=False)
    return ip.stripped("ip_adapter.")


def ipadapter_standard(pool: Pool, clip_proj: int = 1024, ctx: int = 2048, tokens: int = 4) -> dict[str, Any]:
    """ImageProjModel: loaded strictly, ``proj.weight`` [tokens*ctx, clip projection]."""
    ipj = StateDict(pool)
    ipj.linear("image_proj.proj", tokens * ctx, clip_proj)
    ipj.norm("image_proj.norm", ctx)
    return {"image_proj": ipj.stripped("image_proj."), "ip_adapter": ip_layers(pool, ctx=ctx)}


def ipadapter_plus(pool: Pool, emb_dim: int = 1280, dim: int = 1280, ctx: int = 2048, queries: int = 16,
                   depth: int = 4, heads: int = 20, dim_head: int = 64) -> dict[str, Any]:
    """The Resampler of the PLUS adapters (``latents`` marks it as such)."""
    r = StateDict(pool)
    p = "image_proj."
    r.emb(p + "latents", (1, queries, dim))
    r.linear(p + "proj_in", dim, emb_dim)
    r.linear(p + "proj_out", ctx, dim)
    r.norm(p + "norm_out", ctx)
    inner = heads * dim_head
    for layer in range(depth):
        a = f"{p}layers.{layer}.0"
        r.norm(a + ".norm1", dim)
        r.norm(a + ".norm2", dim)
        r.linear(a + ".to_q", inner, dim, bias=False)
        r.linear(a + ".to_kv", 2 * inner, dim, bias=False)
        r.linear(a + ".to_out", dim, inner, bias=False)
        f = f"{p}layers.{layer}.1"
        r.norm(f + ".0", dim)
        r.linear(f + ".1", dim * 4, dim, bias=False)
        r.linear(f + ".3", dim, dim * 4, bias=False)
    return {"image_proj": r.stripped(p), "ip_adapter": ip_layers(pool, ctx=ctx)}


# ------------------------------------------------------------------------ writing


def models(seed: int) -> dict[str, Any]:
    """Every file's object (relative path -> what torch.save writes); one pool per file keeps each file to the
    storages it uses."""
    ckpt = StateDict(Pool(seed))
    unet(ckpt, "model.diffusion_model.")
    clip_text_hf(ckpt, "conditioner.embedders.0.transformer.", 768, 12, 3072)
    clip_text_openclip(ckpt, "conditioner.embedders.1.model.", 1280, 32, 5120)
    taesd(ckpt, "first_stage_model.")
    vision = StateDict(Pool(seed + 1))
    clip_vision(vision)
    return {
        CHECKPOINT: {"state_dict": dict(ckpt)},
        CLIP_VISION: dict(vision),
        IPADAPTER_STANDARD: ipadapter_standard(Pool(seed + 2)),
        IPADAPTER_PLUS: ipadapter_plus(Pool(seed + 3)),
    }


def generate(out_dir: Path, seed: int = DEFAULT_SEED) -> dict[str, dict[str, Any]]:
    """Write every file (each atomically) and ``models.json``; returns ``{relative path: {size, sha256}}``."""
    import torch

    out_dir = Path(out_dir)
    written: dict[str, dict[str, Any]] = {}
    for rel, obj in models(seed).items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(obj, tmp)
        tmp.replace(path)
        data = path.read_bytes()
        written[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"seed": seed, "torch": torch.__version__, "files": written}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tiny_models.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="the models root (its checkpoints/, clip_vision/, ipadapter/)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"default {DEFAULT_SEED}")
    args = p.parse_args(argv)
    started = time.monotonic()
    written = generate(args.out_dir, args.seed)
    for rel, meta in written.items():
        print(f"{rel}: {meta['size'] / 1e6:.2f} MB sha256 {meta['sha256'][:12]}")
    print(f"tiny models (seed {args.seed}) in {os.path.abspath(args.out_dir)} in {time.monotonic() - started:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
