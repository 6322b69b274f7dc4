"""Peer optimizers the BADM family is measured against, built for a plain ``transformers.Trainer``.

``create_muon_optimizer``: torch's ``torch.optim.Muon`` on the hidden weight matrices and
``torch.optim.AdamW`` on everything else (embeddings, LM head, norms, biases) -- the split every Muon
user makes -- as ONE ``torch.optim.Optimizer`` for ``Trainer(optimizers=create_muon_optimizer(model, args))``.

Which tensor goes where is decided by the same rule as BADM's ``preconditioner="newton_schulz"``
groups (``hf_badm.factory.badm_param_groups``): a trainable 2-D tensor that is not an input/output
embedding is a hidden matrix. So ``muon`` and ``badm-newton_schulz`` orthogonalise exactly the same
tensors, and weight decay follows the Trainer's own decay/no-decay split in both.

Defaults, and why (the learning rates of ``hf-badm compare``: ``hf_badm.app.learning_rates``):

- Muon lr = ``args.learning_rate``; ``hf-badm compare`` gives it ``COMPARE_LEARNING_RATES["muon"]``
  (0.03, the learning rate of ``badm-newton_schulz``).
- ``adjust_lr_fn=None`` (torch's "original", Keller Jordan's): the update of an ``A x B`` matrix is
  scaled by ``sqrt(max(1, A/B))``, exactly BADM newton_schulz's ``sqrt(max(1, rows/cols))``. With it,
  Muon at lr ``x`` and fused BADM newton_schulz at ``rho = sigma = 1/x`` take the same step on every
  hidden matrix (docs/preconditioners.md; up to torch's bfloat16 Newton-Schulz). ``"match_rms_adamw"``
  (Moonshot's ``0.2 sqrt(max(A, B))``) would be about 2-5x larger on these models' matrices and put
  Muon on an AdamW lr scale, so BADM's tuned 0.03 would not carry over.
- AdamW lr of the other tensors = ``MUON_ADAMW_LR`` = 1 / ``LOCAL_SOLVES["normalized"].elementwise_sigma`` = 0.1:
  the learning rate BADM newton_schulz uses on the same tensors (its elementwise ``normalized`` local
  solve steps g / RMS(g) with momentum 0.9, an Adam-scale step; 0.1 was the best elementwise lr of the
  sweeps at both sizes). Checked for Muon itself: tiny GPT-2 (2x64), built-in corpus, the convergence
  bench's 300 steps with 20 warm-up steps, Muon lr 0.03: AdamW lr 0.01 / 0.03 / 0.1 on the other tensors
  ended at held-out loss 0.747 / 0.705 / 0.696 (one seed; BADM newton_schulz's best there: 0.699). Without
  warm-up AdamW's first steps at 0.1 are large (its bias correction gives full-size steps at once, BADM's
  normalized solve ramps up from a zero buffer): use warm-up, or a smaller ``adamw_lr``. AdamW's betas and
  eps are the Trainer's (``adam_beta1/2``, ``adam_epsilon``).
- Muon: Nesterov momentum 0.95, 5 quintic Newton-Schulz steps (torch's defaults, as BADM's).

``create_normuon_optimizer``: the same split with NorMuon (Li et al., arXiv:2510.05491) on the hidden matrices: torch
Muon's momentum and Newton-Schulz, then each row scaled by the inverse root of an EMA (beta2 = 0.95) of its mean
square and the update's Frobenius norm restored; the peer of BADM's ``preconditioner="normuon"``, so that what BADM
adds to NorMuon is measured apart from what NorMuon adds to Muon. Same learning rates and scale as Muon.

``create_muon_qhadam_optimizer``: Muon with QHAdam (nu1 = 8/9, the nu of BADM's ``normalized`` solve at its rho/sigma 9)
in place of AdamW on the other tensors: the peer of BADM newton_schulz with ``normalized`` there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import TrainingArguments

from hf_badm.optim.local_solve import LOCAL_SOLVES
from hf_badm.optim.solves.newton_schulz import orthogonalise, resolve_ns_dtype

__all__ = ["MUON_ADAMW_LR", "MuonWithAdamW", "NorMuon", "NorMuonWithAdamW", "create_muon_optimizer",
           "create_normuon_optimizer", "muon_param_groups", "QHAdam", "MuonWithQHAdam", "create_muon_qhadam_optimizer",
           "Peer", "PEERS", "create_peer_optimizer"]

# The AdamW lr of the tensors Muon does not orthogonalise: BADM newton_schulz's elementwise lr on the same tensors.
MUON_ADAMW_LR = 1.0 / LOCAL_SOLVES["normalized"].elementwise_sigma
_BADM_KEYS = ("preconditioner", "sigma", "rho", "strict")


def muon_param_groups(model: nn.Module, weight_decay: float,
                      solve_overrides: str = "") -> tuple[list[dict], list[dict]]:
    """``(hidden, rest)`` param groups by BADM newton_schulz's rule (``hf_badm.roles``, with ``solve_overrides``:
    regex=matrix|elementwise by name): hidden weight matrices (Muon) and the embeddings, LM head, norms and biases
    (AdamW), each split into decay / no-decay groups by the Trainer's rule. BADM's own keys are dropped from the
    groups. torch's Muon orthogonalises each tensor whole, as its users run it."""
    from hf_badm.config import BADMConfig
    from hf_badm.factory import badm_param_groups

    groups = badm_param_groups(model, weight_decay, require_matrix=False, config=BADMConfig(
        preconditioner="newton_schulz", solve_overrides=solve_overrides))
    # torch.optim.Muon takes 2-D parameters only: fused MoE expert stacks (3-D) go to AdamW, as its users do
    hidden = [{**g, "params": [p for p in g["params"] if p.dim() == 2]} for g in groups if "preconditioner" not in g]
    rest = [g for g in groups if "preconditioner" in g] + [
        {**g, "params": [p for p in g["params"] if p.dim() != 2]} for g in groups if "preconditioner" not in g]
    return _without_badm_keys(hidden), _without_badm_keys(rest)


def _without_badm_keys(groups: list[dict]) -> list[dict]:
    return [{k: v for k, v in g.items() if k not in _BADM_KEYS} for g in groups if g["params"]]


def _closure_loss(closure: Any) -> Any:
    """torch's closure convention: the loss re-evaluated with gradients enabled, or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class NorMuon(torch.optim.Optimizer):
    """NorMuon on 2-D parameters, as its reference code: ``M <- lerp(M, g, 1 - momentum)``, ``u = lerp(g, M,
    momentum)`` (Nesterov), O = NS5(u) (bfloat16 on CUDA, float32 elsewhere), ``v <- lerp(v, mean_j O_ij**2, 1 -
    beta2)`` per row, O' = O / (sqrt(v) + 1e-10) scaled to ||O||_F, times torch Muon's ``adjust_lr_fn`` scale
    (None/"original": sqrt(max(1, A/B)); "match_rms_adamw": 0.2 sqrt(max(A, B))); ``W <- W (1 - lr wd) - lr O'``."""

    def __init__(self, params: Any, lr: float = 0.02, weight_decay: float = 0.0, momentum: float = 0.95,
                 beta2: float = 0.95, nesterov: bool = True, ns_steps: int = 5, adjust_lr_fn: str | None = None) -> None:
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, beta2=beta2,
                                      nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn))
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("NorMuon takes 2-D parameters only")

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = _closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                    state["second_momentum_buffer"] = p.new_zeros(p.shape[0], 1)
                buf = state["momentum_buffer"].lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                rows, cols = p.shape
                o = orthogonalise([update], group["ns_steps"], resolve_ns_dtype("auto", p.device))[0]
                o /= math.sqrt(max(1.0, rows / cols))  # orthogonalise's scale, put back below as adjust_lr_fn says
                v = state["second_momentum_buffer"].lerp_((o * o).mean(dim=-1, keepdim=True), 1 - group["beta2"])
                scaled = o / (v.sqrt() + 1e-10)
                scaled *= o.norm() / (scaled.norm() + 1e-10)
                scale = (0.2 * math.sqrt(max(rows, cols)) if group["adjust_lr_fn"] == "match_rms_adamw"
                         else math.sqrt(max(1.0, rows / cols)))
                lr = float(group["lr"])  # a tensor lr (torch's optimizers take one) as its number
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(scaled, alpha=-lr * scale)
        return loss


# BADM's normalized solve at rho/sigma = r is, in fused mode, quasi-hyperbolic momentum with beta = r / (r + 1) and
# nu = (r - 1) / r over RMS-normalised gradients (docs/preconditioners.md): at its r = 9, nu = 8/9.
QHADAM_NU = 8.0 / 9.0


class QHAdam(torch.optim.Optimizer):
    """QHAdam (Ma & Yarats, ICLR 2019) with decoupled weight decay, as the paper writes it::

        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g**2;  m^ = m / (1 - b1**t);  v^ = v / (1 - b2**t)
        w <- w (1 - lr wd) - lr ((1 - nu1) g + nu1 m^) / (sqrt((1 - nu2) g**2 + nu2 v^) + eps)

    ``nus=(1, 1)`` is AdamW. The peer that tells a gain of BADM's ``normalized`` solve on the tensors newton_schulz
    leaves (QH momentum over RMS-normalised gradients) from what QHAdam itself gives there."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 nus: tuple[float, float] = (QHADAM_NU, 1.0), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        for name, value in (("betas", betas), ("nus", nus)):
            if not all(0.0 <= x <= 1.0 for x in value) or (name == "betas" and max(value) >= 1.0):
                raise ValueError(f"QHAdam {name} must lie in [0, 1{')' if name == 'betas' else ']'}, got {value}")
        super().__init__(params, dict(lr=lr, betas=betas, nus=nus, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = _closure_loss(closure)
        for group in self.param_groups:
            (b1, b2), (nu1, nu2), lr = group["betas"], group["nus"], float(group["lr"])  # a tensor lr as its number
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"]
                state["exp_avg"].lerp_(g, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                num = (state["exp_avg"] / (1 - b1**t)).mul_(nu1).add_(g, alpha=1 - nu1)
                den = (state["exp_avg_sq"] / (1 - b2**t)).mul_(nu2).addcmul_(g, g, value=1 - nu2).sqrt_().add_(group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.addcdiv_(num, den, value=-lr)
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on ``hidden`` groups and ``torch.optim.AdamW`` on ``rest`` groups, as one optimizer.

    ``param_groups`` is the Muon groups followed by the AdamW groups (the very dicts the two inner
    optimizers read, so a scheduler that scales every group's ``"lr"`` scales both parts by the same
    factor); ``state`` is one dict for both (their parameters are disjoint), so ``state_dict`` /
    ``load_state_dict`` round-trip like any torch optimizer. Each group carries ``"optimizer"``:
    ``"muon"`` or ``"adamw"``.
    """

    matrix_optimizer = "muon"
    elementwise_optimizer = "adamw"
    _INNER = ("_muon", "_adamw", "_beta2", "_nu")  # what __init__ keeps beyond torch's entries (subclasses' included)

    def _matrices(self, hidden: list[dict], **kwargs: Any) -> torch.optim.Optimizer:
        return torch.optim.Muon(hidden, **kwargs)

    def _elementwise(self, rest: list[dict], **kwargs: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(rest, **kwargs)

    def __init__(self, hidden: list[dict], rest: list[dict], *, lr: float, adamw_lr: float,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, adjust_lr_fn: str | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, foreach: bool | None = None) -> None:
        hidden = [{**g, "optimizer": self.matrix_optimizer} for g in hidden if g["params"]]
        rest = [{**g, "optimizer": self.elementwise_optimizer} for g in rest if g["params"]]
        if not hidden and not rest:
            raise ValueError("no parameters to optimize")
        self._muon = (self._matrices(hidden, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                     adjust_lr_fn=adjust_lr_fn, weight_decay=0.0) if hidden else None)
        self._adamw = (self._elementwise(rest, lr=adamw_lr, betas=betas, eps=eps, weight_decay=0.0, foreach=foreach)
                       if rest else None)
        inner = [o for o in (self._muon, self._adamw) if o is not None]
        super().__init__([g for o in inner for g in o.param_groups], {})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this optimizer's groups and state (after init and after load)."""
        n = len(self._muon.param_groups) if self._muon is not None else 0
        if self._muon is not None:
            self._muon.param_groups = self.param_groups[:n]
            self._muon.state = self.state
        if self._adamw is not None:
            self._adamw.param_groups = self.param_groups[n:]
            self._adamw.state = self.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's; a group added after construction joins the inner optimizer its ``"optimizer"`` names (default:
        the elementwise one, which takes every shape), so that step() updates it."""
        inner = {o.param_groups[0]["optimizer"]: o for o in (self._muon, self._adamw) if o is not None}
        super().add_param_group(param_group)  # torch's checks over every group
        if any(param_group is g for o in inner.values() for g in o.param_groups):
            return  # __init__: the inner optimizers' own groups
        group = self.param_groups.pop()
        name = group.setdefault("optimizer", self.elementwise_optimizer)
        if name not in inner:
            raise ValueError(f"this optimizer has no {name!r} part to add a param group to (it has {sorted(inner)})")
        inner[name].add_param_group(group)
        self.param_groups[:] = [g for o in (self._muon, self._adamw) if o is not None for g in o.param_groups]
        self._link()

    def __getstate__(self) -> dict[str, Any]:
        """torch's three entries and the inner optimizers with their settings: a deepcopy or pickle steps."""
        return {**super().__getstate__(), **{k: v for k, v in self.__dict__.items() if k in self._INNER}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling, and torch's ``load_state_dict`` (which replaces param_groups and state): the inner optimizers
        are pointed at them and fill what an older state's groups lack, as their own loads would."""
        super().__setstate__(state)
        self._link()
        for opt in (self._muon, self._adamw):
            if opt is not None:
                opt.__setstate__({"state": self.state, "param_groups": opt.param_groups})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = _closure_loss(closure)
        for opt in (self._muon, self._adamw):
            if opt is not None:  # their steps unhooked: global step hooks see one step, this optimizer's
                type(opt).step.__wrapped__(opt)
        return loss


class NorMuonWithAdamW(MuonWithAdamW):
    """:class:`NorMuon` on ``hidden`` groups (``beta2``: its row EMA's rate) and AdamW on ``rest``, as one optimizer."""

    matrix_optimizer = "normuon"

    def __init__(self, hidden: list[dict], rest: list[dict], *, beta2: float = 0.95, **kwargs: Any) -> None:
        self._beta2 = beta2
        super().__init__(hidden, rest, **kwargs)

    def _matrices(self, hidden: list[dict], **kwargs: Any) -> torch.optim.Optimizer:
        return NorMuon(hidden, beta2=self._beta2, **kwargs)


class MuonWithQHAdam(MuonWithAdamW):
    """Muon on ``hidden`` groups and :class:`QHAdam` (``nu``: its nu1) on ``rest``, as one optimizer."""

    elementwise_optimizer = "qhadam"

    def __init__(self, hidden: list[dict], rest: list[dict], *, nu: float = QHADAM_NU, **kwargs: Any) -> None:
        self._nu = nu
        super().__init__(hidden, rest, **kwargs)

    def _elementwise(self, rest: list[dict], foreach: bool | None = None, **kwargs: Any) -> torch.optim.Optimizer:
        return QHAdam(rest, nus=(self._nu, 1.0), **kwargs)


def create_muon_qhadam_optimizer(model: nn.Module, args: TrainingArguments, num_training_steps: int | None = None, *,
                                 adamw_lr: float | None = None,
                                 **kwargs: Any) -> tuple[MuonWithQHAdam, torch.optim.lr_scheduler.LRScheduler | None]:
    """:func:`create_muon_optimizer` with :class:`QHAdam` (nu1 = ``nu``, default 8/9) in place of AdamW on the other
    tensors (``adamw_lr`` is its lr)."""
    return create_muon_optimizer(model, args, num_training_steps, adamw_lr=adamw_lr, optimizer_cls=MuonWithQHAdam,
                                 **kwargs)


def create_normuon_optimizer(model: nn.Module, args: TrainingArguments, num_training_steps: int | None = None, *,
                             adamw_lr: float | None = None,
                             **normuon_kwargs: Any) -> tuple[NorMuonWithAdamW, torch.optim.lr_scheduler.LRScheduler | None]:
    """:func:`create_muon_optimizer` with :class:`NorMuon` on the hidden matrices (``normuon_kwargs`` also takes
    ``beta2``)."""
    return create_muon_optimizer(model, args, num_training_steps, adamw_lr=adamw_lr, optimizer_cls=NorMuonWithAdamW,
                                 **normuon_kwargs)


def create_muon_optimizer(
    model: nn.Module,
    args: TrainingArguments,
    num_training_steps: int | None = None,
    *,
    adamw_lr: float | None = None,
    optimizer_cls: type[MuonWithAdamW] = MuonWithAdamW,
    solve_overrides: str = "",
    **muon_kwargs: Any,
) -> tuple[MuonWithAdamW, torch.optim.lr_scheduler.LRScheduler | None]:
    """Muon (hidden matrices, lr ``args.learning_rate``) + AdamW (the rest, lr ``adamw_lr``, default
    ``MUON_ADAMW_LR`` = 0.1) over the model's trainable parameters, with the Trainer's LR schedule, for
    ``Trainer(optimizers=create_muon_optimizer(model, args))``.

    Weight decay ``args.weight_decay`` on the Trainer's decay group of each part (decoupled, both scaled
    by their group's lr). ``muon_kwargs``: ``momentum``, ``nesterov``, ``ns_steps``, ``adjust_lr_fn``
    (default None = sqrt(max(1, rows/cols)), BADM newton_schulz's scaling), ``foreach`` (AdamW). The
    scheduler is transformers' ``get_scheduler`` exactly as in ``create_badm_optimizer`` (``None`` when
    the number of steps is not known yet: the Trainer then builds the same schedule itself). ``solve_overrides``
    routes tensors by name as BADM's (:func:`muon_param_groups`).
    """
    from hf_badm.factory import refuse_deepspeed, trainer_scheduler

    refuse_deepspeed(args, "create_muon_optimizer", "Use DeepSpeed's own Muon (use_muon parameters) there")
    hidden, rest = muon_param_groups(model, args.weight_decay, solve_overrides)
    optimizer = optimizer_cls(hidden, rest, lr=args.learning_rate,
                              adamw_lr=MUON_ADAMW_LR if adamw_lr is None else adamw_lr,
                              betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, **muon_kwargs)
    return optimizer, trainer_scheduler(optimizer, args, num_training_steps)


@dataclass(frozen=True)
class Peer:
    """A peer that ``hf-badm train --optimizer NAME`` runs: Muon's split (:func:`muon_param_groups`) with
    ``optimizer_cls`` over it. ``options``: the recipe fields it reads beyond ``muon_adamw_lr`` and
    ``solve_overrides`` (every peer's), each with the ``optimizer_cls`` keyword it sets (when given)."""

    optimizer_cls: type[MuonWithAdamW]
    options: dict[str, str] = field(default_factory=dict)


# The peers by name: what the CLI's --optimizer accepts beside badm and the Trainer's optim names.
PEERS: dict[str, Peer] = {
    "muon": Peer(MuonWithAdamW),
    "normuon": Peer(NorMuonWithAdamW),
    "muon_qhadam": Peer(MuonWithQHAdam, {"qhadam_nu": "nu"}),
}


def create_peer_optimizer(name: str, model: nn.Module, args: TrainingArguments, options: dict[str, Any],
                          solve_overrides: str = "", adamw_lr: float | None = None,
                          ) -> tuple[MuonWithAdamW, torch.optim.lr_scheduler.LRScheduler | None]:
    """The peer ``name`` of :data:`PEERS` through :func:`create_muon_optimizer`; ``options`` holds the recipe's
    values of its :attr:`Peer.options` (None: the optimizer's default)."""
    peer = PEERS[name]
    kwargs = {keyword: options[option] for option, keyword in peer.options.items() if options[option] is not None}
    return create_muon_optimizer(model, args, adamw_lr=adamw_lr, optimizer_cls=peer.optimizer_cls,
                                 solve_overrides=solve_overrides, **kwargs)
