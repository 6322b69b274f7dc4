"""BADMConfig: the BADM settings of a Trainer run, usable with HfArgumentParser and YAML recipes."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

from hf_badm.optim.badm import KEYWORD_SETTINGS
from hf_badm.optim.local_solve import LOCAL_SOLVES, elementwise_solves
from hf_badm.optim.settings import MODE, NONFINITE, NS_DTYPE, OPTIMIZER_SETTINGS, PRECONDITIONER, RHO, SIGMA, Setting, \
    solve_settings
from hf_badm.optim.validation import count, one_of, penalty
from hf_badm.parallel.orthogonalise import COMM_DTYPES, DEFAULT_BUCKET_NUMEL, check_parallel_settings
from hf_badm.roles import SPLITS, parse_overrides

WEIGHTINGS = ("items", "uniform")


def _check_solve_settings(name: str, text: str) -> None:
    try:
        _parse_solve_settings(text)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _check_overrides(name: str, text: str) -> None:
    parse_overrides(text)


def _check_bucket_numel(name: str, value: int) -> None:
    check_parallel_settings(value, NS_COMM_DTYPE.default, prefix="ns_")


# The settings of a Trainer run beyond BADM's own (OPTIMIZER_SETTINGS and the solves' settings).
SUB_BATCHES = Setting("sub_batches_per_micro_batch", int, 1, "Split each micro-batch into this many sub-batches "
                      "(per_sub_batch mode); S = gradient_accumulation_steps * this * world size.", count)
SUB_BATCH_WEIGHTS = Setting("sub_batch_weights", str, "items", "Sub-batch weights alpha_s: 'items' = share of loss "
                            "items (label tokens for causal LMs, as the Trainer's num_items_in_batch); 'uniform' = equal "
                            "(the paper).", one_of, lambda: WEIGHTINGS)
ELEMENTWISE_PRECONDITIONER = Setting(
    "elementwise_preconditioner", str, "normalized", "newton_schulz: the preconditioner of the parameters that are not "
    "hidden weight matrices (embeddings, LM head, norms, biases). 'normalized' (QHAdam-like) won the sweeps at both "
    "sizes; 'adam' at its default rho = sigma is AdamW, what the Muon peer gives them.", one_of, elementwise_solves)
SOLVE_SETTINGS = Setting(
    "solve_settings", str, "", "Settings of the local solves, comma-separated key=value (each solve's file lists its "
    "own, e.g. ns_coefficients=polar_express,ns_lr_scale=match_rms_adamw,beta2=0.99); every param group takes them.",
    _check_solve_settings)
ELEMENTWISE_SIGMA = Setting(
    "elementwise_sigma", float, None, "newton_schulz: sigma of the parameters that are not hidden weight matrices "
    "(embeddings, LM head, norms, biases). Default: 10 (lr 0.1) for normalized and adam, 0.1 for second_moment "
    "(measured, docs/preconditioners.md).", penalty)
ELEMENTWISE_RHO = Setting(
    "elementwise_rho", float, None, "newton_schulz: rho of those parameters. Default: 9 * elementwise_sigma (beta 0.9) "
    "for normalized, elementwise_sigma for adam, 600 for second_moment (sigma << rho sqrt(v) works).", penalty)
NS_SPLIT = Setting(
    "ns_split", str, "parts", "newton_schulz: how a fused projection (GPT-2's c_attn, Phi-3's qkv_proj and "
    "gate_up_proj, GPT-NeoX's query_key_value, fused expert gate_up_proj...) is orthogonalised. 'parts': each part (Q, "
    "K, V; gate, up) on its own, as separate layers would be; 'heads': attention parts per head; 'none': the whole "
    "weight as one matrix.", one_of, lambda: SPLITS)
SOLVE_OVERRIDES = Setting(
    "solve_overrides", str, "", "newton_schulz: route tensors by name, ';'-separated regex=action (the regex searched in "
    "each parameter name; the last match wins): 'matrix' (orthogonalise, with ns_split), 'whole', 'parts', 'heads' "
    "(orthogonalise so split) or 'elementwise'. A pattern that matches no trainable parameter stops the run at "
    "start-up. E.g. 'router|\\.gate\\.=elementwise'.", _check_overrides)
NS_BUCKET_NUMEL = Setting(
    "ns_bucket_numel", int, DEFAULT_BUCKET_NUMEL, "newton_schulz on sharded engines (ZeRO, FSDP2): the most matrix "
    "elements one exchange of matrix pieces holds at once (default as DeepSpeed's reduce bucket, 5e8).",
    _check_bucket_numel)
NS_COMM_DTYPE = Setting(
    "ns_comm_dtype", str, "float32", "newton_schulz on several ranks: the dtype matrix pieces travel in on sharded "
    "engines. 'float32' is exact for float32 weights (ZeRO's master weights; a float64 model's pieces are rounded to it); 'bfloat16' halves the bytes.", one_of, lambda: tuple(COMM_DTYPES))
# Every field of BADMConfig, in its order.
CONFIG_SETTINGS: dict[str, Setting] = {s.name: s for s in (
    SIGMA, RHO, MODE, SUB_BATCHES, SUB_BATCH_WEIGHTS, NONFINITE, PRECONDITIONER, ELEMENTWISE_PRECONDITIONER,
    SOLVE_SETTINGS, ELEMENTWISE_SIGMA, ELEMENTWISE_RHO, NS_SPLIT, SOLVE_OVERRIDES, NS_DTYPE, NS_BUCKET_NUMEL,
    NS_COMM_DTYPE)}


@dataclass
class BADMConfig:
    """BADM options for ``BADMTrainer`` / ``create_badm_optimizer``: each field's default, check and help is its
    :class:`~hf_badm.optim.settings.Setting` (``CONFIG_SETTINGS``), the ones BADM also takes shared with ``BADM(...)``.

    How ``TrainingArguments.learning_rate`` relates to the paper's penalties: BADM's step size is
    ``1/sigma``, so ``sigma`` defaults to ``1 / learning_rate``; ``rho`` defaults to the local solve's measured
    ``rho/sigma`` times sigma (:func:`hf_badm.optim.settings.default_rho`; 9, momentum ``beta = rho / (rho + sigma) =
    0.9``, for the paper's BADM). The Trainer's LR schedule (warmup, decay)
    scales both penalties as ``sigma_t = sigma / f_t``, ``rho_t = rho / f_t``. Weight decay is the
    Trainer's ``weight_decay`` (decoupled; biases and norm weights excluded).
    """

    sigma: Optional[float] = SIGMA.field()
    rho: Optional[float] = RHO.field()
    mode: str = MODE.field()
    sub_batches_per_micro_batch: int = SUB_BATCHES.field()
    sub_batch_weights: str = SUB_BATCH_WEIGHTS.field()
    nonfinite: str = NONFINITE.field()
    preconditioner: str = PRECONDITIONER.field()
    elementwise_preconditioner: str = ELEMENTWISE_PRECONDITIONER.field()
    solve_settings: str = SOLVE_SETTINGS.field()
    elementwise_sigma: Optional[float] = ELEMENTWISE_SIGMA.field()
    elementwise_rho: Optional[float] = ELEMENTWISE_RHO.field()
    ns_split: str = NS_SPLIT.field()
    solve_overrides: str = SOLVE_OVERRIDES.field()
    ns_dtype: str = NS_DTYPE.field()
    ns_bucket_numel: int = NS_BUCKET_NUMEL.field()
    ns_comm_dtype: str = NS_COMM_DTYPE.field()

    def __post_init__(self) -> None:
        for setting in CONFIG_SETTINGS.values():
            try:
                setting.check(getattr(self, setting.name))
            except ValueError as e:
                raise ValueError(f"BADMConfig.{e}") from None

    def settings(self) -> dict[str, Any]:
        """``solve_settings`` parsed: each value read as its setting's default is typed (number, integer, name)."""
        return _parse_solve_settings(self.solve_settings)

    def optimizer_kwargs(self, learning_rate: float) -> dict[str, Any]:
        """BADM constructor arguments: sigma resolved against the Trainer's learning rate; rho, where not given, is
        BADM's to default (from sigma and the local solve)."""
        sigma = self.sigma
        if sigma is None:
            if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
                raise ValueError(f"learning_rate must be > 0 to derive BADM's sigma = 1/learning_rate, got {learning_rate!r}")
            sigma = 1.0 / learning_rate
            warning = LOCAL_SOLVES[self.preconditioner].lr_warning(learning_rate)
            if warning is not None:
                warnings.warn(warning, stacklevel=3)
        settings = self.settings()
        later = {k: v for k, v in settings.items() if k not in KEYWORD_SETTINGS}
        kwargs = {name: getattr(self, name) for name in OPTIMIZER_SETTINGS}
        kwargs.update(sigma=float(sigma), **{k: v for k, v in settings.items() if k in KEYWORD_SETTINGS})
        return {**kwargs, "solve_settings": later} if later else kwargs

    def engine_refusal(self, *, deepspeed: bool, fsdp: bool, fp16: bool) -> str | None:
        """Why this mode cannot run with these engines (per_sub_batch needs whole, un-reduced, unscaled sub-batch
        gradients), or None: the one rule the Trainer mixin and the CLI's checks refuse by."""
        if self.mode != "per_sub_batch":
            return None
        if deepspeed:
            return ("per_sub_batch mode absorbs each sub-batch's own gradient, but DeepSpeed (every ZeRO stage) reduces "
                    "gradients and steps the optimizer inside its engine: use mode='fused' (--mode fused) with "
                    "DeepSpeed, or per_sub_batch under plain data parallelism (DDP)")
        if fsdp:
            return ("per_sub_batch mode needs whole, un-reduced sub-batch gradients, but FSDP reduce-scatters and shards "
                    "them: use mode='fused' (--mode fused) with FSDP, or per_sub_batch under DDP")
        if fp16:
            return ("per_sub_batch mode absorbs gradients as they are, and fp16 loss scaling would leave them scaled: "
                    "use bf16, or mode='fused' (--mode fused) with fp16")
        return None

    def parallel_kwargs(self) -> dict[str, Any]:
        """Settings of the Newton-Schulz orthogonaliser on several ranks (``hf_badm.parallel.prepare_for_ranks``)."""
        return {"bucket_numel": self.ns_bucket_numel, "comm_dtype": self.ns_comm_dtype}

    def group_overrides(self) -> dict[str, Any]:
        """Param-group settings of the tensors Newton-Schulz does not orthogonalise (rho, where not given, is BADM's to
        default from their sigma and solve)."""
        kind = self.elementwise_preconditioner
        sigma = self.elementwise_sigma if self.elementwise_sigma is not None else LOCAL_SOLVES[kind].elementwise_sigma
        rho = {} if self.elementwise_rho is None else {"rho": float(self.elementwise_rho)}
        return {"preconditioner": kind, "sigma": float(sigma), **rho}


def _parse_solve_settings(text: str) -> dict[str, Any]:
    """``solve_settings`` text as ``{name: value}``, each value typed and checked as its setting says."""
    known, out = solve_settings(), {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or key not in known:
            raise ValueError(f"takes key=value pairs of {sorted(known)}, got {item!r}")
        out[key] = _typed(value, known[key].type, key)
        known[key].check(out[key])
    return out


def _typed(text: str, kind: type, key: str) -> Any:
    """``text`` as a value of type ``kind`` (a name, an integer or a number)."""
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{key} takes a {kind.__name__}, got {text!r}") from None
