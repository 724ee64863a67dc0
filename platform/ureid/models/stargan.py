"""StarGAN (Choi et al., *StarGAN: Unified Generative Adversarial Networks for Multi-Domain Image-to-Image
Translation*, CVPR 2018) with one domain per camera, as camstyle (Lin et al., TIP 2020) uses it through the
HHL ``stargan4reid`` setting. Networks and losses only: pure torch, nothing of Ray, files or MLflow.

Departures from the reference code (yunjey/stargan), each for a reason:

* InstanceNorm without running statistics: the reference tracks them, so ``.eval()`` switches the generator
  to averages over the training set and every fake changes (a known camstyle failure mode); here a fake is
  the same in training and in generation.
* The discriminator's camera head has a ``(H / 2^r, W / 2^r)`` kernel, so it fits non-square re-ID images
  (the reference assumes square ones).
* The learning rate decays linearly to zero over the last ``decay_iterations`` (the paper's schedule); the
  reference subtracts ``lr / decay_iterations`` once every 1,000 iterations, which stops at 99% of it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _norm(dim: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(dim, affine=True, track_running_stats=False)


class ResidualBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False), _norm(dim), nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False), _norm(dim))

    def forward(self, x):
        return x + self.main(x)


class Generator(nn.Module):
    """conv7x7 -> two stride-2 down-convs -> ``repeat_num`` residual blocks -> two stride-2 up-convs ->
    conv7x7 -> tanh; the target camera's one-hot is tiled over the image and concatenated to it."""

    def __init__(self, c_dim: int, conv_dim: int = 64, repeat_num: int = 6):
        super().__init__()
        self.c_dim = c_dim
        layers = [nn.Conv2d(3 + c_dim, conv_dim, 7, 1, 3, bias=False), _norm(conv_dim), nn.ReLU(inplace=True)]
        dim = conv_dim
        for _ in range(2):
            layers += [nn.Conv2d(dim, dim * 2, 4, 2, 1, bias=False), _norm(dim * 2), nn.ReLU(inplace=True)]
            dim *= 2
        layers += [ResidualBlock(dim) for _ in range(repeat_num)]
        for _ in range(2):
            layers += [nn.ConvTranspose2d(dim, dim // 2, 4, 2, 1, bias=False), _norm(dim // 2), nn.ReLU(inplace=True)]
            dim //= 2
        layers += [nn.Conv2d(dim, 3, 7, 1, 3, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 3, H, W) in [-1, 1], H and W multiples of 4; ``c`` (B, c_dim) one-hot target cameras."""
        c = c.to(x.dtype).view(c.size(0), c.size(1), 1, 1).expand(-1, -1, x.size(2), x.size(3))
        return self.main(torch.cat([x, c], dim=1))


class Discriminator(nn.Module):
    """PatchGAN: ``repeat_num`` stride-2 4x4 convs with LeakyReLU(0.01), no normalisation; a 3x3 real/fake map
    and a camera classifier whose kernel covers the whole final map."""

    def __init__(self, c_dim: int, height: int, width: int, conv_dim: int = 64, repeat_num: int = 6):
        super().__init__()
        scale = 2 ** repeat_num
        if height % scale or width % scale:
            raise ValueError(f"the discriminator halves the image {repeat_num} times (gan.d_repeat_num), so "
                             f"height and width must be multiples of {scale}; got {height}x{width}")
        layers, dim = [nn.Conv2d(3, conv_dim, 4, 2, 1), nn.LeakyReLU(0.01)], conv_dim
        for _ in range(1, repeat_num):
            layers += [nn.Conv2d(dim, dim * 2, 4, 2, 1), nn.LeakyReLU(0.01)]
            dim *= 2
        self.main = nn.Sequential(*layers)
        self.src = nn.Conv2d(dim, 1, 3, 1, 1, bias=False)
        self.cls = nn.Conv2d(dim, c_dim, (height // scale, width // scale), bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.main(x)
        return self.src(h), self.cls(h).flatten(1)


def one_hot(cams: torch.Tensor, c_dim: int) -> torch.Tensor:
    return F.one_hot(cams.long(), c_dim).float()


def gradient_penalty(d: nn.Module, real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017, eq. 3): ``E[(||grad_x D(x_hat)||_2 - 1)^2]`` at ``x_hat = a x + (1-a) x~``,
    ``alpha`` (B,) uniform in [0, 1]."""
    a = alpha.view(-1, 1, 1, 1)
    x_hat = (a * real + (1 - a) * fake).requires_grad_(True)
    out, _ = d(x_hat)
    grad, = torch.autograd.grad(out, x_hat, torch.ones_like(out), create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def discriminator_loss(d, real, fake, cam_src, alpha, lambda_cls: float, lambda_gp: float) -> dict:
    """StarGAN eq. 5 for D: ``L_adv + lambda_cls L_cls^r`` with WGAN-GP's adversarial term
    ``-D(x) + D(G(x, c)) + lambda_gp GP``; ``L_cls^r`` is the cross-entropy of D's camera head on real images."""
    out_real, cls_real = d(real)
    out_fake, _ = d(fake.detach())
    adv_real, adv_fake = -out_real.mean(), out_fake.mean()
    cls = F.cross_entropy(cls_real, cam_src)
    gp = gradient_penalty(d, real, fake.detach(), alpha)
    total = adv_real + adv_fake + lambda_cls * cls + lambda_gp * gp
    return {"total": total, "d_adv_real": adv_real, "d_adv_fake": adv_fake, "d_cls": cls, "d_gp": gp}


def generator_loss(g, d, real, cam_src, cam_trg, lambda_cls: float, lambda_rec: float, c_dim: int) -> dict:
    """StarGAN eq. 5 for G: ``-D(G(x, c)) + lambda_cls L_cls^f + lambda_rec ||x - G(G(x, c), c')||_1`` (the
    cycle back to the source camera c')."""
    fake = g(real, one_hot(cam_trg, c_dim))
    out_fake, cls_fake = d(fake)
    adv = -out_fake.mean()
    cls = F.cross_entropy(cls_fake, cam_trg)
    rec = (real - g(fake, one_hot(cam_src, c_dim))).abs().mean()
    total = adv + lambda_cls * cls + lambda_rec * rec
    return {"total": total, "g_adv": adv, "g_cls": cls, "g_rec": rec}


def learning_rate(base: float, iteration: int, iterations: int, decay_iterations: int) -> float:
    """Constant for the first ``iterations - decay_iterations`` iterations, then linear to zero at the end."""
    start = iterations - decay_iterations
    if decay_iterations <= 0 or iteration < start:
        return base
    return base * max(0.0, 1.0 - (iteration - start) / decay_iterations)


def to_image_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (the generator's tanh range to pixels)."""
    return ((x + 1) / 2).clamp(0, 1)
