"""Pruning step checkpoints survives being killed half-way (found by bench/chaos_resume.py)."""

from __future__ import annotations

import json

from tunesmith.train import checkpoint


def _step(run, number: int):
    folder = run / f"step-{number:06d}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": number}))
    (folder / checkpoint.MANIFEST).write_text(json.dumps({"files": {}}))
    return folder


def test_a_half_deleted_old_step_folder_is_removed_by_the_next_prune(tmp_path):
    for number in (2, 4, 6):
        _step(tmp_path, number)
    (tmp_path / "step-000002" / checkpoint.MANIFEST).unlink()  # a delete killed half-way
    checkpoint.prune(tmp_path, keep=2)
    assert [p.name for p in checkpoint.step_folders(tmp_path)] == ["step-000004", "step-000006"]


def test_a_delete_killed_after_the_rename_leaves_nothing_behind(tmp_path):
    for number in (2, 4):
        _step(tmp_path, number)
    (tmp_path / "step-000000.deleting").mkdir()  # renamed, then killed before rmtree finished
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000004"]


def test_an_incomplete_newest_folder_is_left_for_resume_to_report(tmp_path):
    for number in (2, 4):
        _step(tmp_path, number)
    (tmp_path / "step-000006").mkdir()  # a save in progress or interrupted: newer than every complete one
    checkpoint.prune(tmp_path, keep=1)
    assert [p.name for p in checkpoint.step_folders(tmp_path)] == ["step-000004", "step-000006"]
