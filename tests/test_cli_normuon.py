"""`hf-badm compare` runs the NorMuon peer (normuon: NorMuon + AdamW, hf_badm.peers) beside BADM's normuon solve."""

from __future__ import annotations

import json

from test_cli import FAST, cli


def test_compare_runs_normuon_and_badm_normuon(tmp_path):
    done = cli("compare", "recipes/pretrain/tiny-gpt.yaml", "--optimizers", "normuon,badm-normuon", *FAST,
               "--output_dir", str(tmp_path / "cmp"))
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| normuon | 0.03 |" in table and "| badm-normuon | 0.03 |" in table
    runs = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert runs["normuon"]["optimizer"] == "normuon" and runs["badm-normuon"]["recipe"]["badm"]["preconditioner"] == "normuon"
    assert all(r["eval_loss"] > 0 for r in runs.values())
