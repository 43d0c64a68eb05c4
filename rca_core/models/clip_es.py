"""CAMs from a frozen CLIP ViT, after CLIP-ES (Lin et al., "CLIP is Also an Efficient Segmenter", CVPR 2023).

No CAM training: a class's CAM is the GradCAM of CLIP's image-text score, refined by the ViT's own attention.
Re-implemented here on open_clip's modules (the architecture comes from open_clip_torch; the forward pass
is ours, so that the attention maps and the last block's input are at hand):

1. Text: each class name (or its `prompt_names` words) in every prompt template, CLIP's text embedding,
   L2-normalised and averaged over the templates; the same for the background words.
2. Image: resized (bicubic) to multiples of the patch size, positional embeddings interpolated bilinearly (as
   CLIP-ES does), run through all blocks but the last without gradients; the last block runs with its
   input's LayerNorm output A (CLIP-ES's GradCAM target layer, `resblocks[-1].ln_1`) as the leaf.
   The image embedding is the mean of the patch tokens after ln_post (not the class token), projected.
3. Score: softmax over [the image's labelled classes, background words] of logit_scale x cosine.
   GradCAM of class c: weights = the spatial mean of d softmax_c / dA per channel, CAM = ReLU(sum of
   weights x A) on the patch grid, min-max normalised.
4. CAA (class-aware attention affinity): the attention maps of the last `caa_layers` blocks, heads and
   layers averaged, class token dropped (n x n, n = patches); Sinkhorn-normalised (columns then rows,
   `sinkhorn_iters` times), symmetrised, squared (two steps of propagation); its columns outside the
   class's boxes (bounding boxes of the regions where the CAM > caa_box_threshold x its max) are zeroed;
   the refined CAM is that matrix times the CAM vector. Then resized to the image and min-max normalised.

Multi-scale / flip (off in CLIP-ES's VOC recipe): each scale's and flip's image-resolution CAM is summed,
then every class is max-normalised, as cam_infer does for the RCA network.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rca_core.config.cam import RANDOM_WEIGHTS

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation
STD = (0.26862954, 0.26130258, 0.27577711)
# the small random CLIP: OpenAI's layout scaled down (one 64-wide head per block, as OpenAI's builder infers
# from a state dict), so a saved copy loads back through the OpenAI path as the same network
SMALL = dict(embed_dim=64, quick_gelu=True, vision_cfg=dict(layers=4, width=64, head_width=64, patch_size=16, image_size=224),
             text_cfg=dict(layers=2, width=64, heads=1, context_length=77, vocab_size=49408))


class ClipWeightsError(ValueError):
    """cam.clip.weights cannot be read or does not fit the model."""


# ------------------------------------------------------------------------------------------ the model
def _open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(f"cam.source clip needs open_clip_torch (CLIP's architecture and tokenizer): "
                          f"pip install 'rca-wsss[clip]' or open_clip_torch ({e})") from e
    return open_clip


def build_clip(clip_cfg, storage=None) -> nn.Module:
    """The frozen CLIP of `cam.clip` (eval mode, no gradients on its parameters)."""
    open_clip = _open_clip()

    if clip_cfg.weights == RANDOM_WEIGHTS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(clip_cfg.seed)  # every worker, on every node, builds the same random CLIP
            model = open_clip.model.CLIP(**(SMALL if clip_cfg.random_arch == "small" else _arch(clip_cfg.model)))
    else:
        model = _load_file(clip_cfg.weights, clip_cfg.model, storage)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_file(location: str, arch: str, storage=None) -> nn.Module:
    open_clip = _open_clip()

    from rca_core import storage as st

    ref = st.file_ref(location, storage)
    if not ref.exists():
        raise ClipWeightsError(f"cam.clip.weights: file not found: {location} (on host {st.host()}; nothing is "
                               f"downloaded - give a local CLIP file such as OpenAI's ViT-B-16.pt, or 'random')")
    data = ref.read_bytes()
    try:
        sd = _state_dict(data)
    except Exception as e:  # noqa: BLE001 - any unreadable file: name it
        raise ClipWeightsError(f"cam.clip.weights: {location} could not be read as CLIP weights: "
                               f"{type(e).__name__}: {e}") from e
    try:
        if "visual.proj" in sd and "text_projection" in sd and "positional_embedding" in sd:  # OpenAI's layout
            # open_clip builds OpenAI's architecture from the state dict (in float16, as OpenAI ships it); the
            # weights are loaded again into the float32 copy so that a float32 file keeps its precision
            model = open_clip.model.build_model_from_openai_state_dict(dict(sd)).float()
            model.load_state_dict(sd, strict=True)
            return model
        model = open_clip.model.CLIP(**_arch(arch))
        model.load_state_dict(sd, strict=True)
        return model
    except Exception as e:  # noqa: BLE001 - a mismatch: name the file and the architecture
        raise ClipWeightsError(f"cam.clip.weights: {location} does not fit CLIP {arch!r} (cam.clip.model): "
                               f"{type(e).__name__}: {str(e)[:300]}") from e


def _arch(name: str) -> dict:
    """open_clip's architecture settings of `name` (cam.clip.model), or an error naming the key."""
    cfg = _open_clip().get_model_config(name)
    if cfg is None:
        raise ClipWeightsError(f"cam.clip.model: {name!r} is not an open_clip architecture (e.g. ViT-B-16, "
                               f"ViT-B-16-quickgelu, ViT-L-14)")
    return cfg


def _state_dict(data: bytes) -> dict:
    """A state dict from OpenAI's TorchScript archive, a plain state dict, or a {'state_dict': ...} checkpoint."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - OpenAI's files are TorchScript archives
        import warnings

        with warnings.catch_warnings():  # torch calls jit.load deprecated; OpenAI's files need it
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
            obj = torch.jit.load(io.BytesIO(data), map_location="cpu").state_dict()
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("expected a state dict of tensors")
    out = {k.removeprefix("module."): v for k, v in obj.items()}
    for k in ("input_resolution", "context_length", "vocab_size"):  # TorchScript extras
        out.pop(k, None)
    return {k: v for k, v in out.items() if not k.endswith("attn_mask")}  # the causal mask: rebuilt, not loaded


@torch.no_grad()
def text_embeddings(model: nn.Module, names: list[str], templates: list[str]) -> torch.Tensor:
    """(len(names), D): each name's prompts embedded, normalised, averaged over the templates, normalised."""
    open_clip = _open_clip()

    tok = open_clip.get_tokenizer("ViT-B-16")  # CLIP's BPE tokenizer (shipped with open_clip)
    dev = next(model.parameters()).device
    out = []
    for name in names:
        emb = model.encode_text(tok([t.format(name) for t in templates]).to(dev)).float()
        emb = F.normalize(emb, dim=-1).mean(0)
        out.append(F.normalize(emb, dim=-1))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------ the method
def gradcam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """GradCAM on a (C, h, w) activation and its gradient: ReLU(sum_c mean(grad_c) * act_c), min-max normalised."""
    w = grads.mean(dim=(1, 2))
    cam = F.relu((w[:, None, None] * acts).sum(0))
    return minmax(cam)


def softmax_gradcams(y: torch.Tensor, embed, fg: torch.Tensor, bg: torch.Tensor, logit_scale: float,
                     grid: tuple[int, int]) -> torch.Tensor:
    """(K, gh, gw) GradCAMs of the K classes `fg` on the tokens y (1, 1 + gh*gw, C; token 0 is the class token):
    the score of class k is its softmax over [fg, bg] of logit_scale x cos(embed(y), text). A region that
    looks like a background word raises that word's share and so lowers the class's score: its CAM drops."""
    gh, gw = grid
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        feat = F.normalize(embed(y), dim=-1)
        text = torch.cat([fg, bg]).to(feat.dtype)
        probs = (logit_scale * feat @ text.T).softmax(dim=-1)[0]
        acts = y[0, 1:].T.reshape(-1, gh, gw).detach()
        cams = []
        for k in range(len(fg)):  # backward() into the leaf's .grad (the model's parameters take none)
            y.grad = None
            probs[k].backward(retain_graph=k < len(fg) - 1)
            cams.append(gradcam(acts, y.grad[0, 1:].T.reshape(-1, gh, gw)))
    return torch.stack(cams) if cams else torch.zeros((0, gh, gw), device=y.device)


def minmax(cam: torch.Tensor) -> torch.Tensor:
    cam = cam - cam.min()
    return cam / (cam.max() + 1e-7)


def boxes_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    """(h, w) 0/1: inside the bounding boxes of the 8-connected regions where the CAM (as uint8, as CLIP-ES
    thresholds it) is above threshold x its max; the whole map when no region is."""
    from scipy import ndimage

    u8 = (np.clip(cam, 0, 1) * 255).astype(np.uint8)
    fg = u8 > int(threshold * u8.max())
    out = np.zeros(cam.shape, np.float32)
    labels, n = ndimage.label(fg, structure=np.ones((3, 3)))
    if n == 0:
        out[:] = 1
        return out
    for sl in ndimage.find_objects(labels):
        out[sl] = 1
    return out


def affinity(attn: torch.Tensor, sinkhorn_iters: int = 3) -> torch.Tensor:
    """CAA's affinity from an (n, n) attention map: Sinkhorn-normalised (columns, then rows), symmetrised,
    squared."""
    t = attn.float()
    for _ in range(sinkhorn_iters):
        t = t / t.sum(dim=0, keepdim=True).clamp_min(1e-12)
        t = t / t.sum(dim=1, keepdim=True).clamp_min(1e-12)
    t = (t + t.T) / 2
    return t @ t


def caa_refine(cam: torch.Tensor, aff: torch.Tensor, box_threshold: float) -> torch.Tensor:
    """Refine an (h, w) CAM with the (h*w, h*w) affinity, restricted to the class's boxes (columns)."""
    h, w = cam.shape
    mask = torch.from_numpy(boxes_mask(cam.detach().cpu().numpy(), box_threshold)).to(cam.device).reshape(1, -1)
    return ((aff * mask) @ cam.reshape(-1, 1)).reshape(h, w)


class ClipCam:
    """CLIP-ES CAMs of one image's labelled classes. `fg` (C, D) and `bg` (B, D) are text embeddings."""

    def __init__(self, model: nn.Module, fg: torch.Tensor, bg: torch.Tensor, clip_cfg, device=None):
        self.model = model
        self.cfg = clip_cfg
        self.device = device or next(model.parameters()).device
        self.fg, self.bg = fg.to(self.device), bg.to(self.device)
        v = model.visual
        self.patch = v.conv1.kernel_size[0]
        self.logit_scale = float(model.logit_scale.exp())
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)

    # the ViT, with the attention maps and the last block's LayerNorm output kept
    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        pe = self.model.visual.positional_embedding
        g = int(round(math.sqrt(pe.shape[0] - 1)))
        if (gh, gw) == (g, g):
            return pe
        grid = pe[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)  # as CLIP-ES
        return torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])

    @staticmethod
    def _attend(blk, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One residual block (open_clip's ResidualAttentionBlock, batch first): (output, attention averaged
        over heads (B, L, L), the ln_1 output)."""
        y = blk.ln_1(x)
        out, attn = blk.attn(y, y, y, need_weights=True, average_attn_weights=True)
        x = x + blk.ls_1(out)
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        return x, attn, y

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A normalised (1, 3, H, W) image (H, W multiples of the patch size) through every block but the last,
        without gradients: (the last block's input (1, 1 + n, width), the attention maps (n, n), class token
        dropped, of the blocks among the last `caa_layers` before the last one)."""
        v = self.model.visual
        gh, gw = img.shape[-2] // self.patch, img.shape[-1] // self.patch
        blocks = v.transformer.resblocks
        keep_from = len(blocks) - self.cfg.caa_layers
        attns = []
        with torch.no_grad():
            x = v.conv1(img).flatten(2).transpose(1, 2)  # (1, n, width)
            cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1) + self._pos_embed(gh, gw).to(x.dtype)
            x = v.ln_pre(x)
            for i, blk in enumerate(blocks[:-1]):
                x, a, _ = self._attend(blk, x)
                if i >= keep_from:
                    attns.append(a[0, 1:, 1:])
        return x, attns

    def scale_cams(self, img: torch.Tensor, fg_idx: list[int]) -> torch.Tensor:
        """(K, gh, gw) refined CAMs on the patch grid of one normalised (1, 3, H, W) image (H, W multiples of
        the patch size)."""
        v = self.model.visual
        gh, gw = img.shape[-2] // self.patch, img.shape[-1] // self.patch
        x, attns = self.encode(img)
        blocks = v.transformer.resblocks
        last = blocks[-1]
        y = last.ln_1(x).detach()  # GradCAM's target: the last block's ln_1 output
        holder = {}

        def image_embedding(y: torch.Tensor) -> torch.Tensor:
            out, holder["attn"] = last.attn(y, y, y, need_weights=True, average_attn_weights=True)
            z = x + last.ls_1(out)
            z = z + last.ls_2(last.mlp(last.ln_2(z)))
            feat = v.ln_post(z)[:, 1:].mean(dim=1)  # CLIP-ES pools the patch tokens, not the class token
            return feat @ v.proj if v.proj is not None else feat

        cams = softmax_gradcams(y, image_embedding, self.fg[fg_idx], self.bg, self.logit_scale, (gh, gw))
        a = holder["attn"]
        attns.append(a.detach()[0, 1:, 1:])
        if not self.cfg.caa or not len(fg_idx):
            return cams
        aff = affinity(torch.stack(attns[-self.cfg.caa_layers:]).mean(0), self.cfg.sinkhorn_iters)
        return torch.stack([caa_refine(c, aff, self.cfg.caa_box_threshold) for c in cams])

    def __call__(self, image: np.ndarray, fg_idx: list[int]) -> np.ndarray:
        """(K, H, W) float32 CAMs in [0, 1] of an (H, W, 3) uint8 image, one per 0-based foreground index."""
        H, W = image.shape[:2]
        if not fg_idx:
            return np.zeros((0, H, W), np.float32)
        base = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None].float() / 255
        total = torch.zeros((len(fg_idx), H, W), device=self.device)
        for s in self.cfg.scales:
            h = int(math.ceil(s * H / self.patch) * self.patch)
            w = int(math.ceil(s * W / self.patch) * self.patch)
            img = F.interpolate(base, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
            img = (img - self.mean) / self.std
            for flip in ((False, True) if self.cfg.flip else (False,)):
                cams = self.scale_cams(img.flip(-1) if flip else img, fg_idx)
                if flip:
                    cams = cams.flip(-1)
                up = F.interpolate(cams[None], size=(H, W), mode="bilinear", align_corners=False)[0]
                total += torch.stack([minmax(c) for c in up])
        total = total / total.flatten(1).amax(1).clamp_min(1e-5)[:, None, None]
        return total.clamp(0, 1).cpu().numpy().astype(np.float32)


__all__ = ["ClipCam", "ClipWeightsError", "build_clip", "text_embeddings", "gradcam", "affinity", "caa_refine",
           "boxes_mask", "minmax", "softmax_gradcams", "SMALL"]
