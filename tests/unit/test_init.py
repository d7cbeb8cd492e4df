"""`graft init`: a starter run config and an own-loop train.py, from package data, into a new folder."""

from __future__ import annotations

import os
from importlib import resources

import pytest
import yaml

from graft.config import RunConfig, load_config
from graft.launch.cli import main as graft_main
from graft.launch.init_cmd import init_project, starter_config


def test_writes_a_resolved_config_and_the_own_loop_template(tmp_path, capsys):
    folder = tmp_path / "new" / "project"  # created, parents too
    assert graft_main(["init", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["run.yaml", "train.py"]
    # train.py is the template as it is
    template = resources.files("graft.templates").joinpath("own_loop.py").read_text()
    assert (folder / "train.py").read_text() == template
    # run.yaml: every field of every section, resolved, and it reads back to the same run
    text = (folder / "run.yaml").read_text()
    cfg = load_config(folder / "run.yaml")
    assert yaml.safe_load(text) == cfg.to_dict() == starter_config().to_dict() == RunConfig.from_dict(cfg.to_dict()).to_dict()
    assert cfg.model.factory == "graft.models:tiny_vgg" and cfg.data.name == "digits" and cfg.train.epochs <= 3
    assert "# Total epochs of the run" in text  # each field under its doc
    out = capsys.readouterr().out
    assert f"wrote {folder / 'run.yaml'}" in out and f"wrote {folder / 'train.py'}" in out
    assert "graft train --config run.yaml" in out and f"graft resume {cfg.train.out_dir}" in out


def test_refuses_a_folder_with_files_unless_forced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "run.yaml").write_text("old: 1\n")
    with pytest.raises(SystemExit, match=r"not empty \(notes.txt, run.yaml\).*--force"):
        graft_main(["init", str(tmp_path)])
    assert (tmp_path / "run.yaml").read_text() == "old: 1\n"  # nothing written
    written = init_project(tmp_path, force=True)
    assert [p.name for p in written] == ["run.yaml", "train.py"]
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only its own files are touched
    assert load_config(tmp_path / "run.yaml").train.out_dir == starter_config().train.out_dir


def test_default_folder_is_here_and_slurm_is_optional(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert graft_main(["init", "--slurm"]) == 0
    sbatch = tmp_path / "train_multinode.sbatch"
    assert os.access(sbatch, os.X_OK) and "srun" in sbatch.read_text()
    out = capsys.readouterr().out
    assert "cd " not in out and "sbatch --nodes=2 train_multinode.sbatch run.yaml" in out


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(SystemExit, match="not a folder"):
        graft_main(["init", str(tmp_path / "x")])
