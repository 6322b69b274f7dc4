"""BADMConfig: the BADM settings of a Trainer run, usable with HfArgumentParser and YAML recipes."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from hf_badm.optim.badm import MODES, NONFINITE, PRECONDITIONERS
from hf_badm.optim.defaults import default_rho
from hf_badm.optim.local_solve import LOCAL_SOLVES, check_settings, elementwise_solves, setting_defaults
from hf_badm.optim.solves.newton_schulz import NS_DTYPES
from hf_badm.parallel.orthogonalise import COMM_DTYPES, DEFAULT_BUCKET_NUMEL, check_parallel_settings
from hf_badm.roles import SPLITS, parse_overrides

WEIGHTINGS = ("items", "uniform")
ELEMENTWISE = elementwise_solves()  # the built-in solves offered for the tensors an orthogonalising solve leaves


@dataclass
class BADMConfig:
    """BADM options for ``BADMTrainer`` / ``create_badm_optimizer``.

    How ``TrainingArguments.learning_rate`` relates to the paper's penalties: BADM's step size is
    ``1/sigma``, so ``sigma`` defaults to ``1 / learning_rate``; ``rho`` defaults to ``9 * sigma``
    (momentum ``beta = rho / (rho + sigma) = 0.9``; per preconditioner, ``hf_badm.optim.defaults``). The Trainer's LR schedule (warmup, decay)
    scales both penalties as ``sigma_t = sigma / f_t``, ``rho_t = rho / f_t``. Weight decay is the
    Trainer's ``weight_decay`` (decoupled; biases and norm weights excluded).
    """

    sigma: Optional[float] = field(
        default=None,
        metadata={"help": "BADM penalty sigma > 0; the step size is 1/sigma. Default: 1 / learning_rate."},
    )
    rho: Optional[float] = field(
        default=None,
        metadata={"help": "BADM proximal coefficient rho > 0; momentum beta = rho/(rho+sigma). Default: 9 * sigma (beta 0.9) "
                          "for the paper's BADM and normalized, sigma for newton_schulz, 6000 * sigma for second_moment."},
    )
    mode: str = field(
        default="fused",
        metadata={"help": "'fused': one buffer, consumes the accumulated/reduced gradient (exact for steady "
                          "weights). 'per_sub_batch': literal per-slot duals, one slot per sub-batch.",
                  "choices": list(MODES)},
    )
    sub_batches_per_micro_batch: int = field(
        default=1,
        metadata={"help": "Split each micro-batch into this many sub-batches (per_sub_batch mode); "
                          "S = gradient_accumulation_steps * this * world size."},
    )
    sub_batch_weights: str = field(
        default="items",
        metadata={"help": "Sub-batch weights alpha_s: 'items' = share of loss items (label tokens for causal "
                          "LMs, as the Trainer's num_items_in_batch); 'uniform' = equal (the paper).",
                  "choices": list(WEIGHTINGS)},
    )
    nonfinite: str = field(
        default="skip",
        metadata={"help": "On a NaN/Inf gradient: 'skip' the step (or sub-batch) with a warning, or 'raise'.",
                  "choices": list(NONFINITE)},
    )
    preconditioner: str = field(
        default="none",
        metadata={"help": "Local-solve preconditioner: 'none' (the paper's BADM), 'second_moment' (SISA-like, "
                          "D = sigma + rho (sqrt(v) + eps)), 'newton_schulz' (NSISA-like: orthogonalised momentum on "
                          "hidden weight matrices, elementwise_preconditioner elsewhere; fused at rho = sigma, its "
                          "default, it is Muon on the matrices), 'normalized' (QHAdam-like: the "
                          "gradient divided by its RMS sqrt(v) replaces it in the local solve; Adam-scale learning "
                          "rates).", "choices": list(PRECONDITIONERS)},
    )
    elementwise_preconditioner: str = field(
        default="normalized",
        metadata={"help": "newton_schulz: the preconditioner of the parameters that are not hidden weight matrices "
                          "(embeddings, LM head, norms, biases). 'normalized' (QHAdam-like) won the sweeps at both "
                          "sizes; 'adam' at its default rho = sigma is AdamW, what the Muon peer gives them.",
                  "choices": list(ELEMENTWISE)},
    )
    solve_settings: str = field(
        default="",
        metadata={"help": "Settings of the local solves, comma-separated key=value (each solve's file lists its own, "
                          "e.g. ns_coefficients=polar_express,ns_lr_scale=match_rms_adamw,beta2=0.99); every param "
                          "group takes them."},
    )
    elementwise_sigma: Optional[float] = field(
        default=None,
        metadata={"help": "newton_schulz: sigma of the parameters that are not hidden weight matrices (embeddings, "
                          "LM head, norms, biases). Default: 10 (lr 0.1) for normalized and adam, 0.1 for second_moment "
                          "(measured, docs/preconditioners.md)."},
    )
    elementwise_rho: Optional[float] = field(
        default=None,
        metadata={"help": "newton_schulz: rho of those parameters. Default: 9 * elementwise_sigma (beta 0.9) for normalized, "
                          "elementwise_sigma for adam, "
                          "600 for second_moment (sigma << rho sqrt(v) works)."},
    )
    ns_split: str = field(
        default="parts",
        metadata={"help": "newton_schulz: how a fused projection (GPT-2's c_attn, Phi-3's qkv_proj and gate_up_proj, "
                          "GPT-NeoX's query_key_value, fused expert gate_up_proj...) is orthogonalised. 'parts': each "
                          "part (Q, K, V; gate, up) on its own, as separate layers would be; 'heads': attention parts "
                          "per head; 'none': the whole weight as one matrix.", "choices": list(SPLITS)},
    )
    solve_overrides: str = field(
        default="",
        metadata={"help": "newton_schulz: route tensors by name, ';'-separated regex=action (the regex searched in each "
                          "parameter name; the last match wins): 'matrix' (orthogonalise, with ns_split), 'whole', "
                          "'parts', 'heads' (orthogonalise so split) or 'elementwise'. A pattern that matches no "
                          "trainable parameter stops the run at start-up. E.g. 'router|\\.gate\\.=elementwise'."},
    )
    ns_dtype: str = field(
        default="auto",
        metadata={"help": "newton_schulz: the dtype of the Newton-Schulz iterations. 'auto': bfloat16 on CUDA (as "
                          "torch.optim.Muon), float32 elsewhere.", "choices": list(NS_DTYPES)},
    )
    ns_bucket_numel: int = field(
        default=DEFAULT_BUCKET_NUMEL,
        metadata={"help": "newton_schulz on sharded engines (ZeRO, FSDP2): the most matrix elements one exchange of "
                          "matrix pieces holds at once (default as DeepSpeed's reduce bucket, 5e8)."},
    )
    ns_comm_dtype: str = field(
        default="float32",
        metadata={"help": "newton_schulz on several ranks: the dtype matrix pieces travel in on sharded engines. "
                          "'float32' is exact; 'bfloat16' halves the bytes.", "choices": list(COMM_DTYPES)},
    )

    def __post_init__(self) -> None:
        for name in ("sigma", "rho", "elementwise_sigma", "elementwise_rho"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"BADMConfig.{name} must be a finite number > 0 (or None), got {value!r}")
        for name, allowed in (("mode", MODES), ("sub_batch_weights", WEIGHTINGS), ("nonfinite", NONFINITE),
                              ("preconditioner", tuple(LOCAL_SOLVES)),
                              ("elementwise_preconditioner", elementwise_solves()),
                              ("ns_dtype", tuple(NS_DTYPES)), ("ns_split", SPLITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"BADMConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check_parallel_settings(self.ns_bucket_numel, self.ns_comm_dtype, prefix="BADMConfig.ns_")
        try:
            parse_overrides(self.solve_overrides)
        except ValueError as e:
            raise ValueError(f"BADMConfig.{e}") from None
        k = self.sub_batches_per_micro_batch
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"BADMConfig.sub_batches_per_micro_batch must be an integer >= 1, got {k!r}")
        try:
            check_settings(self.settings())
        except ValueError as e:
            raise ValueError(f"BADMConfig.solve_settings: {e}") from None

    def settings(self) -> dict[str, Any]:
        """``solve_settings`` parsed: each value read as its setting's default is typed (number, integer, name)."""
        known, out = setting_defaults(), {}
        for item in (s.strip() for s in self.solve_settings.split(",")):
            if not item:
                continue
            key, eq, text = (part.strip() for part in item.partition("="))
            if not eq or key not in known:
                raise ValueError(f"BADMConfig.solve_settings takes key=value pairs of {sorted(known)}, got {item!r}")
            out[key] = _typed(text, known[key], key)
        return out

    def optimizer_kwargs(self, learning_rate: float) -> dict[str, Any]:
        """BADM constructor arguments: sigma/rho resolved against the Trainer's learning rate."""
        sigma = self.sigma
        if sigma is None:
            if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
                raise ValueError(f"learning_rate must be > 0 to derive BADM's sigma = 1/learning_rate, got {learning_rate!r}")
            sigma = 1.0 / learning_rate
            warning = LOCAL_SOLVES[self.preconditioner].lr_warning(learning_rate)
            if warning is not None:
                warnings.warn(warning, stacklevel=3)
        rho = self.rho if self.rho is not None else default_rho(self.preconditioner, sigma)
        return {"sigma": float(sigma), "rho": float(rho), "mode": self.mode, "nonfinite": self.nonfinite,
                "preconditioner": self.preconditioner, "ns_dtype": self.ns_dtype, **self.settings()}

    def parallel_kwargs(self) -> dict[str, Any]:
        """Settings of the Newton-Schulz orthogonaliser on several ranks (``hf_badm.parallel.prepare_for_ranks``)."""
        return {"bucket_numel": self.ns_bucket_numel, "comm_dtype": self.ns_comm_dtype}

    def group_overrides(self) -> dict[str, Any]:
        """Param-group settings of the tensors Newton-Schulz does not orthogonalise."""
        kind = self.elementwise_preconditioner
        sigma = self.elementwise_sigma if self.elementwise_sigma is not None else LOCAL_SOLVES[kind].elementwise_sigma
        rho = self.elementwise_rho if self.elementwise_rho is not None else default_rho(kind, sigma)
        return {"preconditioner": kind, "sigma": float(sigma), "rho": float(rho)}


def _typed(text: str, default: Any, key: str) -> Any:
    """``text`` as a value of ``default``'s type."""
    if isinstance(default, str):
        return text
    try:
        return int(text) if isinstance(default, int) else float(text)
    except ValueError:
        raise ValueError(f"BADMConfig.solve_settings: {key} takes a {type(default).__name__}, got {text!r}") from None
