"""MetaCleaner (Zhang, Wang, Qiao, CVPR 2019) and the classifier head built around it.

Modules and pure tensor functions only, no I/O. Shape letters: B class subsets,
N images per subset, D feature dimension, H hidden width, C classes, M single
images. The same :class:`Head` is trained on cached features (stage 2) and on
CNN features during end-to-end fine-tuning (stage 3), where the backbone's
(B·N, D) output is reshaped to (B, N, D).

Noisy Weighting maps a subset v (B, N, D) to confidences alpha (B, N); Clean
Hallucinating turns them into one sample per subset, v_c = sum_i alpha_i v_i /
sum_i alpha_i. Both ways of using alpha depend on it only through the
normalised weights w = alpha / sum(alpha), so N = 1 is exactly plain softmax
training (w = 1).

The weighting nets return log alpha and w is computed as softmax(log alpha).
This is the same w, but it stays finite when every sigmoid of a subset
underflows to 0: the loss only sees alpha / sum(alpha), so nothing holds the
overall level of alpha up and the sigmoid variants (attention_sig, fc_fc_sig,
relation) do drift towards 0 during training; alpha / sum(alpha) then gives 0/0.
"""

from __future__ import annotations

from typing import Callable, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcpipe.config import CleanerConfig, Combine, Weighting
from mcpipe.errors import ConfigError

WEIGHTINGS = get_args(Weighting)
COMBINES = get_args(Combine)

# Initial bias of the last FC of the ReLU-before-sigmoid variants: with PyTorch's
# default bias (about 0) half the outputs start in the ReLU's flat part (alpha
# exactly 0.5, no gradient); a small positive bias starts nearly all of them on
# the slope, alpha ~ 0.6, free to move both ways.
RELU_OUT_BIAS = 0.5


# --------------------------------------------------------------------------- pure functions


def normalized(log_alpha: Tensor) -> Tensor:
    """log alpha (B, N) -> w = alpha / sum_i alpha_i (B, N), as a softmax; exactly 1 when N = 1."""
    return torch.softmax(log_alpha, dim=1)


def convex_combination(v: Tensor, w: Tensor) -> Tensor:
    """v (B, N, D), w (B, N) >= 0 summing to 1 over N -> sum_i w_i v_i (B, D)."""
    return torch.bmm(w.unsqueeze(1), v).squeeze(1)


def hallucinate(v: Tensor, alpha: Tensor) -> Tensor:
    """Clean Hallucinating: v (B, N, D), alpha (B, N) > 0 -> v_c = sum_i alpha_i v_i / sum_i alpha_i (B, D).

    A convex combination of the subset's features, so v_c = v_1 when N = 1.
    """
    return convex_combination(v, alpha / alpha.sum(dim=1, keepdim=True))


def reweighted_loss(logits: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """Loss reweighting (the paper's Table 3 alternative to hallucination).

    logits (B, N, C) of each image on its own, y (B,) the subsets' labels,
    w (B, N) = alpha / sum(alpha) -> scalar mean over subsets of
    sum_i alpha_i CE_i / sum_i alpha_i. Normalising by sum(alpha) keeps the loss
    a weighted mean of the images' losses, so the weighting net cannot lower it
    by shrinking every alpha.
    """
    b, n, c = logits.shape
    ce = F.cross_entropy(logits.reshape(b * n, c), y.repeat_interleave(n), reduction="none")
    return (w * ce.view(b, n)).sum(dim=1).mean()


# --------------------------------------------------------------------------- weighting nets
# Each maps standardised features v (B, N, D) to log alpha (B, N).


class Constant(nn.Module):
    """alpha_i = 1: v_c is the plain mean of the subset. No parameters; any N."""

    def forward(self, v: Tensor) -> Tensor:
        return v.new_zeros(v.shape[:2])


class Attention(nn.Module):
    """Per-image attention, alpha_i = act(a · tanh(W v_i + b)), W: H x D, a: 1 x H.

    act = sigmoid gives alpha in (0, 1); act = exp gives alpha in
    [exp(-|a|_1), exp(|a|_1)], i.e. a softmax over the subset once normalised.
    Each image is scored alone: permutation-equivariant, any N.
    """

    def __init__(self, feature_dim: int, hidden: int, *, exp: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)
        self.exp = exp

    def forward(self, v: Tensor) -> Tensor:
        s = self.score(torch.tanh(self.proj(v))).squeeze(-1)
        return s if self.exp else F.logsigmoid(s)


class ConcatFC(nn.Module):
    """The paper's Noisy Weighting on the concatenated subset (N·D):

    FC(N·D -> H) [-> ReLU] -> FC(H -> N) [-> ReLU] -> sigmoid. With the ReLU
    before the sigmoid alpha lies in [0.5, 1): images are down-weighted, never
    dropped. Position-specific weights, so v must hold exactly ``subset_size``
    images.
    """

    def __init__(self, subset_size: int, feature_dim: int, hidden: int, *, relu_hidden: bool,
                 relu_out: bool) -> None:
        super().__init__()
        self.subset_size = subset_size
        self.fc1 = nn.Linear(subset_size * feature_dim, hidden)
        self.fc2 = nn.Linear(hidden, subset_size)
        self.relu_hidden = relu_hidden
        self.relu_out = relu_out
        if relu_out:
            nn.init.constant_(self.fc2.bias, RELU_OUT_BIAS)

    def forward(self, v: Tensor) -> Tensor:
        b, n, d = v.shape
        if n != self.subset_size:
            raise ValueError(f"this weighting concatenates exactly subset_size = {self.subset_size} images, "
                             f"got subsets of {n}")
        h = self.fc1(v.reshape(b, n * d))
        if self.relu_hidden:
            h = F.relu(h)
        s = self.fc2(h)
        if self.relu_out:
            s = F.relu(s)
        return F.logsigmoid(s)


class Relation(nn.Module):
    """Ours: scores each image against the rest of its subset, weights shared across positions.

    p_i = P v_i (P: D -> H, the one D x H product per image); q_i = mean of the
    other p_j (P is affine, so q_i = P m_i with m_i the mean of the other v_j);
    per image [p_i, q_i, p_i * q_i, |p_i - q_i|, cos(v_i, m_i)] -> FC(4H+1 -> H/4)
    -> ReLU -> FC(-> 1) -> sigmoid, alpha in (0, 1). Permutation-equivariant and
    defined for any N; for N = 1 the "others" are the image itself (q = p, cos = 1).
    """

    def __init__(self, feature_dim: int, hidden: int) -> None:
        super().__init__()
        width = max(1, hidden // 4)  # keeps the MLP well below the D x H projection in cost
        self.proj = nn.Linear(feature_dim, hidden)
        self.mlp = nn.Sequential(nn.Linear(4 * hidden + 1, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, v: Tensor) -> Tensor:
        n = v.shape[1]
        p = self.proj(v)  # (B, N, H)
        if n == 1:
            q, cos = p, v.new_ones(v.shape[:2])
        else:
            q = (p.sum(dim=1, keepdim=True) - p) / (n - 1)
            cos = _cos_to_others(v)
        f = torch.cat([p, q, p * q, (p - q).abs(), cos.unsqueeze(-1)], dim=-1)  # (B, N, 4H+1)
        return F.logsigmoid(self.mlp(f).squeeze(-1))


def _cos_to_others(v: Tensor, eps: float = 1e-8) -> Tensor:
    """v (B, N, D), N >= 2 -> cos(v_i, sum_{j != i} v_j) (B, N).

    Expanded with s = sum_j v_j: v_i.(s - v_i) = v_i.s - |v_i|^2 and
    |s - v_i|^2 = |s|^2 - 2 v_i.s + |v_i|^2, so only (B, N) tensors are built
    besides one batched product (an explicit s - v_i costs ~10x more on CPU).
    """
    s = v.sum(dim=1, keepdim=True)  # (B, 1, D)
    vs = torch.bmm(v, s.transpose(1, 2)).squeeze(-1)  # (B, N)
    vv = torch.linalg.vector_norm(v, dim=-1).square()  # (B, N)
    ss = torch.linalg.vector_norm(s, dim=-1).square()  # (B, 1)
    oo = (ss - 2 * vs + vv).clamp_min(0)
    return (vs - vv) / (vv * oo).clamp_min(eps * eps).sqrt()


# (subset_size, feature_dim, hidden) -> weighting net returning log alpha
_BUILDERS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "constant": lambda n, d, h: Constant(),
    "attention_sig": lambda n, d, h: Attention(d, h, exp=False),
    "attention_exp": lambda n, d, h: Attention(d, h, exp=True),
    "fc_fc_sig": lambda n, d, h: ConcatFC(n, d, h, relu_hidden=False, relu_out=False),
    "fc_fc_relu_sig": lambda n, d, h: ConcatFC(n, d, h, relu_hidden=False, relu_out=True),
    "fc_relu_fc_relu_sig": lambda n, d, h: ConcatFC(n, d, h, relu_hidden=True, relu_out=True),
    "relation": lambda n, d, h: Relation(d, h),
}
assert tuple(_BUILDERS) == WEIGHTINGS


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} = {value!r} is invalid: expected an integer >= 1")


def _check_choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name} = {value!r} is invalid: expected one of {', '.join(valid)}")


def _check_subsets(v: Tensor, feature_dim: int) -> None:
    if v.dim() != 3 or v.shape[2] != feature_dim or v.shape[1] < 1:
        raise ValueError(f"expected subsets of shape (B, N, {feature_dim}), got {tuple(v.shape)}")


# --------------------------------------------------------------------------- modules


class MetaCleaner(nn.Module):
    """Noisy Weighting (one of :data:`WEIGHTINGS`) + Clean Hallucinating, shared by all classes.

    ``combine`` records how the head uses alpha (:data:`COMBINES`); the cleaner
    itself only computes alpha and v_c.
    """

    def __init__(self, subset_size: int, feature_dim: int, *, hidden: int = 384,
                 weighting: str = CleanerConfig.weighting, combine: str = CleanerConfig.combine) -> None:
        super().__init__()
        _check_positive("cleaner.subset_size", subset_size)
        _check_positive("feature_dim", feature_dim)
        _check_positive("cleaner.hidden", hidden)
        _check_choice("cleaner.weighting", weighting, WEIGHTINGS)
        _check_choice("cleaner.combine", combine, COMBINES)
        self.subset_size = subset_size
        self.feature_dim = feature_dim
        self.hidden = hidden
        self.weighting = weighting
        self.combine = combine
        self.net = _BUILDERS[weighting](subset_size, feature_dim, hidden)

    def log_weights(self, v: Tensor) -> Tensor:
        """v (B, N, D) -> log alpha (B, N)."""
        _check_subsets(v, self.feature_dim)
        return self.net(v)

    def weights(self, v: Tensor) -> Tensor:
        """v (B, N, D) -> alpha (B, N) >= 0 (a sigmoid far in its tail reads as 0)."""
        return self.log_weights(v).exp()

    def hallucinate(self, v: Tensor, alpha: Tensor) -> Tensor:
        """v (B, N, D), alpha (B, N) -> v_c = sum_i alpha_i v_i / sum_i alpha_i (B, D)."""
        if alpha.shape != v.shape[:2]:
            raise ValueError(f"alpha of shape {tuple(alpha.shape)} does not match subsets {tuple(v.shape)}")
        return hallucinate(v, alpha)

    def forward(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """v (B, N, D) -> (v_c (B, D), alpha (B, N)), v_c computed from log alpha."""
        log_alpha = self.log_weights(v)
        return convex_combination(v, normalized(log_alpha)), log_alpha.exp()


def _buffer(value: Tensor | None, dim: int, default: float, name: str) -> Tensor:
    if value is None:
        return torch.full((dim,), default)
    value = torch.as_tensor(value, dtype=torch.float32).detach().clone()
    if value.shape != (dim,):
        raise ValueError(f"{name} must have shape ({dim},), got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} holds non-finite values")
    return value


class Head(nn.Module):
    """Feature standardisation (fixed buffers) + MetaCleaner + linear softmax classifier.

    Standardisation, (x - mean) / std, is affine, so it commutes with the convex
    combination of hallucination. ``mean``/``std`` (D,) default to 0 and 1 and
    travel in the state_dict; std must be > 0 (clamp dead feature dimensions
    before passing it).
    """

    def __init__(self, feature_dim: int, num_classes: int, *, subset_size: int = 4, hidden: int = 384,
                 weighting: str = CleanerConfig.weighting, combine: str = CleanerConfig.combine,
                 mean: Tensor | None = None, std: Tensor | None = None) -> None:
        super().__init__()
        _check_positive("feature_dim", feature_dim)
        _check_positive("num_classes", num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.cleaner = MetaCleaner(subset_size, feature_dim, hidden=hidden, weighting=weighting, combine=combine)
        self.classifier = nn.Linear(feature_dim, num_classes)
        std = _buffer(std, feature_dim, 1.0, "std")
        if (std <= 0).any():
            raise ValueError(f"std must be > 0, got {int((std <= 0).sum())} values <= 0")
        self.register_buffer("mean", _buffer(mean, feature_dim, 0.0, "mean"))
        self.register_buffer("std", std)

    def standardize(self, x: Tensor) -> Tensor:
        """x (..., D) -> (x - mean) / std (..., D) in the buffers' dtype (float16 features are cast first)."""
        z = x - self.mean if x.dtype == self.mean.dtype else x.to(self.mean.dtype).sub_(self.mean)
        return z.div_(self.std)  # in place: one (B, N, D) temporary, not two

    def forward(self, x: Tensor) -> Tensor:
        """Test time, cleaner removed: x (M, D) -> logits (M, C)."""
        if x.dim() != 2 or x.shape[1] != self.feature_dim:
            raise ValueError(f"expected features of shape (M, {self.feature_dim}), got {tuple(x.shape)}")
        return self.classifier(self.standardize(x))

    def subset_loss(self, v: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Training step: v (B, N, D) images of B class subsets, y (B,) the subsets' noisy labels
        -> (scalar loss, alpha (B, N) detached).

        hallucinate: CE(classifier(v_c), y); loss_reweight: see :func:`reweighted_loss`.
        """
        _check_subsets(v, self.feature_dim)
        if y.shape != v.shape[:1]:
            raise ValueError(f"expected one label per subset, shape ({v.shape[0]},), got {tuple(y.shape)}")
        z = self.standardize(v)
        if v.shape[1] == 1:  # w = 1 exactly: plain softmax, the weighting net would only cost time
            return F.cross_entropy(self.classifier(z[:, 0]), y), z.new_ones(v.shape[:2])
        log_alpha = self.cleaner.log_weights(z)
        w = normalized(log_alpha)
        if self.cleaner.combine == "hallucinate":
            loss = F.cross_entropy(self.classifier(convex_combination(z, w)), y)
        else:
            loss = reweighted_loss(self.classifier(z), y, w)
        return loss, log_alpha.detach().exp()

    def set_logits(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """Noisy-labelled test set, cleaner applied: v (B, N, D) -> (logits (B, C), alpha (B, N)).

        logits = classifier(v_c), which for a linear classifier is also the
        alpha-weighted mean of the images' logits, so it serves both combines.
        """
        _check_subsets(v, self.feature_dim)
        v_c, alpha = self.cleaner(self.standardize(v))
        return self.classifier(v_c), alpha

    def config(self) -> dict:
        """Keyword arguments that rebuild this head (mean/std come back with the state_dict)."""
        c = self.cleaner
        return {"feature_dim": self.feature_dim, "num_classes": self.num_classes, "subset_size": c.subset_size,
                "hidden": c.hidden, "weighting": c.weighting, "combine": c.combine}
