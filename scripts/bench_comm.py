"""Collectives and bytes per optimizer step under DDP and DeepSpeed ZeRO-2, AdamW vs BADM (docs/benchmarks.md,
"Communication per step"): every gloo/nccl event torch.profiler sees, on 2 CPU ranks:
``torchrun --standalone --nproc_per_node 2 scripts/bench_comm.py`` (``--report``: the section from comm.json)."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from hf_badm import BADMConfig, BADMTrainer  # noqa: E402

SECTION = "## Communication per step"
ZERO2 = bc.ROOT / "recipes" / "launch" / "zero2.json"
ITEM_BYTES = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "long int": 8, "int": 4, "bool": 1}
MODES = {  # key -> (table row, optimizer, DeepSpeed config)
    "adamw-ddp": ("DDP + AdamW", "adamw", None),
    "fused-ddp": ("BADM fused, DDP", "fused", None),
    "per-sub-batch-ddp": ("BADM per_sub_batch, DDP (no_sync)", "per_sub_batch", None),
    "adamw-zero2": ("DeepSpeed ZeRO-2 + AdamW", "adamw", ZERO2),
    "fused-zero2": ("BADM fused, DeepSpeed ZeRO-2", "fused", ZERO2),
}


class ProfileSteps(TrainerCallback):
    """Profiles optimizer steps skip+1 .. skip+steps and exports their trace."""

    def __init__(self, skip: int, steps: int, trace: Path) -> None:
        schedule = torch.profiler.schedule(wait=skip, warmup=0, active=steps, repeat=1)
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                           schedule=schedule, on_trace_ready=lambda p: p.export_chrome_trace(str(trace)))

    def on_train_begin(self, args, state, control, **kwargs):
        self.prof.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.prof.step()

    def on_train_end(self, args, state, control, **kwargs):
        self.prof.stop()


def collectives(trace: Path) -> list[tuple[str, int]]:
    """(collective, payload bytes) of every backend-level collective in a chrome trace."""
    out = []
    for event in json.loads(trace.read_text())["traceEvents"]:
        backend, _, kind = event.get("name", "").partition(":")
        if backend in ("gloo", "nccl") and kind:
            args = event.get("args", {})
            out.append((kind, sum(math.prod(dims) * ITEM_BYTES.get(dtype, 4)
                                  for dtype, dims in zip(args.get("Input type", []), args.get("Input Dims", [])))))
    return out


def run_mode(optimizer: str, deepspeed: Path | None, out: Path, skip: int, steps: int) -> tuple[list[tuple[str, int]], int]:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=128, n_layer=4, n_head=4, n_positions=64,
                                       tie_word_embeddings=False))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (256, 64), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], max_steps=skip + steps,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=10_000,
                             save_strategy="no", disable_tqdm=True, learning_rate=0.3 if optimizer != "adamw" else 1e-3,
                             lr_scheduler_type="constant", max_grad_norm=1.0, seed=0, dataloader_num_workers=0,
                             deepspeed=str(deepspeed) if deepspeed else None)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / f"trace{dist.get_rank() if dist.is_initialized() else 0}.json"
    callbacks = [ProfileSteps(skip, steps, trace)]
    if optimizer == "adamw":
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    else:
        trainer = BADMTrainer(model=model, args=args, train_dataset=data, callbacks=callbacks,
                              badm_config=BADMConfig(mode=optimizer))
    trainer.train()
    if deepspeed:  # DeepSpeed leaves process-wide state behind
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        unset_hf_deepspeed_config()
        AcceleratorState._reset_state(True)
    params = sum(p.numel() for p in model.parameters())
    return collectives(trace), params


def section(data: dict) -> str:
    """The section's generated part (its prose lives in the docs) from the result file."""
    steps, param_bytes = data["steps"], 4 * data["params"]
    rows = []
    for name, calls in data["modes"].items():
        total, kinds = sum(b for _, b in calls) / steps, Counter(k for k, _ in calls)
        rows.append([name, f"{len(calls) / steps:g}", f"{sum(b >= 1024 for _, b in calls) / steps:g}",
                     f"{total / 2**20:.3f}", f"{total / param_bytes:.3f}",
                     ", ".join(f"{k} {v / steps:g}" for k, v in sorted(kinds.items()))])
    return (bc.stamp(data["machine"], data["command"]) + "- every call: [`results/comm.json`](results/comm.json)\n\n"
            + "\n".join(bc.md_table(["mode", "collectives / step", "of them ≥ 1 KiB", "payload MiB / step / rank",
                                     "payload / parameter bytes", "by kind (calls / step)"], "lrrrrl", rows)) + "\n\n"
            "Reading the rows: DDP's large all-reduces are its gradient buckets, its small one the used-parameter map "
            "of `find_unused_parameters` (the Trainer's default without gradient checkpointing); BADM fused adds "
            "nothing to DDP. Per-sub-batch reduces no gradients (`no_sync` on every micro-step) and sends one flat "
            "all-reduce of its aggregate buffers plus the weight sum. DeepSpeed ZeRO-2 (gloo) reduces gradients at "
            "every micro-step, in per-partition pieces, and all-gathers the updated partitions after the step; "
            "BADM's update runs on the local partition and adds nothing to AdamW's traffic.\n")


def main() -> None:
    parser = bc.parser(__doc__)
    parser.add_argument("--skip", type=int, default=2, help="optimizer steps before the profiled ones")
    parser.add_argument("--steps", type=int, default=4, help="profiled optimizer steps")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    bc.add_output_args(parser, bc.RESULTS / "comm.json")
    parser.add_argument("--report", action="store_true", help="rebuild the section from the result JSON (runs nothing)")
    a = parser.parse_args()
    bc.quiet()
    if a.report:
        data = json.loads(a.results.read_text())
    else:
        modes, params = {}, 0
        with tempfile.TemporaryDirectory() as tmp:
            for key in [m.strip() for m in a.modes.split(",") if m.strip()]:
                name, optimizer, deepspeed = MODES[key]
                modes[name], params = run_mode(optimizer, deepspeed, Path(tmp) / key, a.skip, a.steps)
        if (dist.get_rank() if dist.is_initialized() else 0) != 0:
            return
        args = [x for i, x in enumerate(sys.argv[1:]) if "--docs" not in sys.argv[i:i + 2]]  # where it is written: no
        command = " ".join(["torchrun --standalone --nproc_per_node 2 scripts/bench_comm.py", *args])  # part of it
        data = {"machine": bc.machine(), "command": command, "world": dist.get_world_size() if dist.is_initialized()
                else 1, "params": params, "steps": a.steps, "skip": a.skip, "modes": modes}
        if not a.no_write:
            bc.write_json(a.results, data)
    bc.publish(a, SECTION, f"{SECTION}\n\n{section(data)}")


if __name__ == "__main__":
    main()
