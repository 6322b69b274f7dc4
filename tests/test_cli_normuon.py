"""`hf-badm compare` runs each peer of hf_badm.peers beside the BADM solve it is the peer of: NorMuon + AdamW beside
BADM's normuon, Muon + QHAdam beside newton_schulz with normalized elsewhere."""

from __future__ import annotations

import json

from hf_badm.app.learning_rates import COMPARE_LEARNING_RATES
from test_cli import FAST, cli


PAIRS = [("normuon", "normuon"), ("muon_qhadam", "newton_schulz")]  # (peer, the BADM solve it is the peer of)


def test_compare_runs_each_peer_beside_its_badm_solve(tmp_path):
    """One compare run of every pair (one interpreter, one data set-up)."""
    names = [name for peer, solve in PAIRS for name in (peer, f"badm-{solve}")]
    done = cli("compare", "recipes/pretrain/tiny-gpt.yaml", "--optimizers", ",".join(names), *FAST,
               "--output_dir", str(tmp_path / "cmp"))
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    runs = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    for peer, solve in PAIRS:
        ours = f"badm-{solve}"
        assert f"| {peer} | {COMPARE_LEARNING_RATES[peer]:g} |" in table
        assert f"| {ours} | {COMPARE_LEARNING_RATES[ours]:g} |" in table
        assert runs[peer]["optimizer"] == peer and runs[ours]["recipe"]["badm"]["preconditioner"] == solve
    assert len(runs) == len(names) and all(r["eval_loss"] > 0 for r in runs.values())


def test_qhadam_nu_and_adam_beta1_reach_the_muon_qhadam_peer(tmp_path):
    """`hf-badm train --optimizer muon_qhadam` hands qhadam_nu and adam_beta1 to QHAdam on the other tensors (the peer
    of BADM's normalized solve at another rho/sigma); the checkpoint's optimizer state says what ran."""
    import torch

    from test_cli import train_here

    out = tmp_path / "run"
    assert train_here(out, "--optimizer", "muon_qhadam", "--qhadam_nu", "0.75", "--adam_beta1", "0.8", "--max_steps",
                      "1", "--save_steps", "1") == 0
    groups = torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=True)["param_groups"]
    qhadam = [g for g in groups if g["optimizer"] == "qhadam"]
    assert qhadam and all(tuple(g["nus"]) == (0.75, 1.0) and tuple(g["betas"])[0] == 0.8 for g in qhadam)
