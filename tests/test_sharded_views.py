"""Fused projections on the engines' sharded paths, exactly: one 2-rank torchrun (gloo, CPU, float32 inputs and
Newton-Schulz in float64, no Trainer) runs tests/sharded_views_worker.py, which orthogonalises each fused layout
(GPT-2 ``c_attn`` stored transposed, Phi-3 GQA ``qkv_proj`` and ``gate_up_proj``, GPT-NeoX per-head
``query_key_value``, gpt-oss experts' column-interleaved ``gate_up_proj``), a plain and a tall matrix through
:class:`ParallelOrthogonaliser` as DDP, ZeRO-1/2, ZeRO-3 and FSDP2 hand them over. Each rank's share must equal the
1-process result: a part cut across owners wrongly, or a view applied to a piece instead of the whole matrix, shows
up here in seconds, where the Trainer runs of tests/test_distributed.py cover only GPT-2 and gpt-oss, slowly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from procs import free_port, launch_env, run_process_group

WORKER = Path(__file__).parent / "sharded_views_worker.py"
FORMS = ("replicated", "zero12", "zero12 (bucket per matrix)", "zero3", "zero3 (bucket per matrix)", "fsdp2",
         "fsdp2 (bucket per matrix)")
LAYOUTS = ("gpt2 c_attn", "phi3 qkv_proj", "phi3 gate_up_proj", "gpt_neox query_key_value",
           "gpt_oss experts gate_up_proj", "plain", "tall")


def test_sharded_forms_match_one_process(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), str(tmp_path)]
    code, log = run_process_group(cmd, 120, cwd=WORKER.parent, env=launch_env(OMP_NUM_THREADS="1"))
    assert code == 0, f"torchrun failed (exit {code}):\n{log[-6000:]}"
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        missing = [f"{form} {layout}" for form in FORMS for layout in LAYOUTS if f"{form} {layout}" not in result]
        assert not missing, f"rank {rank}: not checked: {missing}"
        wrong = {key: diff for key, diff in result.items() if not diff <= 1e-12}
        assert not wrong, f"rank {rank}: differs from 1 process (max abs): {wrong}"
