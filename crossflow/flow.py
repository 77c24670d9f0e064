"""The pure math of CrossFlow's objective: flow matching from a text latent to an image latent.

Convention (the project's design notes outside this repository, reference/crossflow.md §1.7): t = 0 is the text latent
z0 (the Text VE's sample), t = 1 the image latent z1.

    z_t = t * z1 + (1 - (1 - sigma_min) * t) * z0        v = dz_t/dt = z1 - (1 - sigma_min) * z0

Total loss of one step (§8): FM-MSE + CLIP(z0, image features) + kl_weight * KL, all trained jointly; the FM
gradient reaches the Text VE through z0 (never detached). The model assembles it (`CrossFlow.forward`); this module
holds the functions of tensors it is made of.

Randomness: every draw takes an explicit `torch.Generator` and is made on that generator's device, then moved to
the data's device. The trainer passes a CPU generator seeded per step, so a run is reproducible and resumable on any
device, and the host-side decisions (which samples are null) never need a device sync.

Shapes: B batch, C/H/W latent channels/height/width, L text tokens, D text width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KL_KINDS = ("standard", "official")


def _draw_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    # Draw where the generator lives (a CPU generator cannot fill a CUDA tensor).
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) to broadcast against `like`."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Path, target, time
# ---------------------------------------------------------------------------------------------------------------------


def sample_t(
    batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Logit-normal(0, 1) times, (B,) float32 in (0, 1): sigmoid of a standard normal (SD3 / CrossFlow)."""
    z = torch.randn(batch_size, generator=generator, device=_draw_device(generator, device))
    return torch.sigmoid(z).to(device if device is not None else z.device)


def interpolate(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor, sigma_min: float = 1e-5) -> torch.Tensor:
    """z_t = t * z1 + (1 - (1 - sigma_min) * t) * z0. z0, z1: (B, ...); t: (B,)."""
    tb = _bcast(t, z1)
    return tb * z1 + (1 - (1 - sigma_min) * tb) * z0


def velocity_target(z0: torch.Tensor, z1: torch.Tensor, sigma_min: float = 1e-5) -> torch.Tensor:
    """d z_t / dt = z1 - (1 - sigma_min) * z0, constant along the straight path."""
    return z1 - (1 - sigma_min) * z0


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Un-weighted MSE: per-sample mean over C, H, W, then the batch mean (fp32)."""
    if pred.shape != target.shape:
        raise ValueError(f"flow_matching_loss: pred {tuple(pred.shape)} != target {tuple(target.shape)}")
    err = (pred.float() - target.float()).pow(2)
    return err.flatten(1).mean(dim=1).mean()


def contrastive_loss(z0: torch.Tensor, img_feat: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric CLIP cross-entropy between normalised flattened z0 (B, ...) and image features (B, F).

    As in the official code: the *sampled* z0 (not mu), `logit_scale` used raw (not exponentiated), labels
    arange(B), negatives from this process's batch only (open_clip ClipLoss with world_size=1).
    """
    txt = F.normalize(z0.flatten(1).float(), dim=-1)
    img = F.normalize(img_feat.flatten(1).float(), dim=-1)
    if txt.shape != img.shape:
        raise ValueError(f"contrastive_loss: z0 flattens to {tuple(txt.shape)}, image features are {tuple(img.shape)}")
    logits = logit_scale * img @ txt.T  # (B, B) image -> text
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def kl_loss(mu: torch.Tensor, logvar: torch.Tensor, kind: str = "standard") -> torch.Tensor:
    """KL of the Text VE posterior, summed over latent dims per sample, then the batch mean.

    "standard": KL(N(mu, sigma^2) || N(0, 1)) = -0.5 * sum(1 + log sigma^2 - mu^2 - sigma^2)   (paper, lambda 1e-4)
    "official": -0.5 * sum(1 + log sigma^2 - (0.3 mu)^6 - sigma^2)  (released code, weight 1e-2): a flatter pull on
                mu that leaves |mu| < ~3 nearly free.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kl_loss: unknown kind {kind!r}; choose one of {KL_KINDS}")
    mu, logvar = mu.float().flatten(1), logvar.float().flatten(1)
    pull = mu.pow(2) if kind == "standard" else (0.3 * mu).pow(6)
    return (-0.5 * (1 + logvar - pull - logvar.exp()).sum(dim=1)).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Indicator dropout (the CFG training signal)
# ---------------------------------------------------------------------------------------------------------------------


def indicator_dropout(
    z1: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the unconditional ("null") samples and give them another sample's image as target.

    Each sample is null with probability `p`; if at most one is, none is (a single null sample has no other image
    to map to). The targets of the null subset are rolled by one *within the subset* (official `cat(t[1:], t[:1])`);
    the source z0 is untouched. Returns (indicator (B,) long: 0 = cond, 1 = uncond, z1 targets (B, ...)).
    The input `z1` is not modified.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"indicator_dropout: p must be in [0, 1], got {p}")
    b = z1.shape[0]
    null = torch.rand(b, generator=generator, device=_draw_device(generator, None)) < p
    if int(null.sum()) <= 1:
        null.zero_()
    idx = null.nonzero().squeeze(1)
    perm = torch.arange(b)
    perm[idx] = idx.roll(-1)  # new[idx[k]] = old[idx[k+1]]
    targets = z1[perm.to(z1.device)] if idx.numel() else z1
    return null.long().to(z1.device), targets
