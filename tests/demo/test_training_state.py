"""The resumable training state: tensors and plain values only, read back with
``weights_only=True``; a state file holding code is refused with one line and never unpickled;
the state is looked for only in the folder named for the run (absolute), never relative to the
working directory."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from explorer.demo.training import ResumableRun, StateFileError, TrainSettings, default_work_dir


class WritesMarker:
    """Unpickling this writes ``marker``: what a planted state file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code from a state file ran"))


def _settings(tmp_path: Path, **kw) -> TrainSettings:
    return TrainSettings(out_dir=tmp_path / "out", work_dir=tmp_path / "work", **kw)


def _model_and_optimizer():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def test_state_round_trips_through_weights_only(tmp_path):
    model, opt = _model_and_optimizer()
    run = ResumableRun(_settings(tmp_path), "m", total_steps=10)
    run.step = 4
    run.log(loss=0.5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    run.save(model, opt)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    torch.load(run.path, weights_only=True)  # nothing in it needs more than weights_only

    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    again = ResumableRun(_settings(tmp_path), "m", total_steps=10)
    assert again.restore(model2, opt2)
    assert again.step == 4 and again.history == run.history
    assert torch.equal(model2.weight, model.weight)
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_state_file_with_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran.txt"
    run = ResumableRun(_settings(tmp_path), "m", total_steps=10)
    torch.save({"model": WritesMarker(marker), "step": 1, "seconds": 0.0}, run.path)
    model, opt = _model_and_optimizer()
    with pytest.raises(StateFileError) as err:
        run.restore(model, opt)
    message = str(err.value)
    assert message == (f"{run.path} holds code or objects that are not plain tensors; refused (only weights are "
                       "loaded): start over with --fresh")
    assert not marker.exists()


def test_state_is_kept_in_the_named_folder_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = ResumableRun(TrainSettings(out_dir=Path("out"), work_dir=Path("work")), "m", total_steps=1)
    assert run.path == tmp_path / "work" / "m" / "state.pt" and run.path.is_absolute()
    monkeypatch.setenv("EXPLORER_CACHE_DIR", str(tmp_path / "cache"))
    first = default_work_dir(tmp_path / "models")
    monkeypatch.chdir(tmp_path / "work")
    assert default_work_dir(tmp_path / "models") == first  # the same for the same output, wherever it runs
    assert first.is_absolute() and first.is_relative_to(tmp_path / "cache")
    assert default_work_dir(tmp_path / "other") != first


def _train(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "explorer.demo.train", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_train_command_resumes_and_refuses_a_planted_state(tmp_path):
    env = {**os.environ, "EXPLORER_CACHE_DIR": str(tmp_path / "cache")}
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    # a state planted where the old default looked (relative to the working directory) is never read
    marker = tmp_path / "ran.txt"
    planted = cwd / "build" / "demo-training" / "tok" / "state.pt"
    planted.parent.mkdir(parents=True)
    torch.save({"model": WritesMarker(marker), "step": 1, "seconds": 0.0}, planted)
    out = tmp_path / "models"
    base = ["--only", "tok", "--out", str(out), "--threads", "1"]
    done = _train(base + ["--max-steps", "2"], cwd, env)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    (saved,) = list((tmp_path / "cache" / "demo-training").glob("*/tok/state.pt"))
    assert torch.load(saved, weights_only=True)["step"] == 2
    # run again with a larger budget: it continues from step 2
    done = _train(base + ["--max-steps", "3"], cwd, env)
    assert done.returncode == 0, done.stderr
    assert torch.load(saved, weights_only=True)["step"] == 3
    assert "resumed at step 2" in done.stderr
    # a state file with code in the named work folder: one line, exit 1, nothing ran
    named = tmp_path / "work"
    (named / "tok").mkdir(parents=True)
    torch.save({"model": WritesMarker(marker), "step": 1, "seconds": 0.0}, named / "tok" / "state.pt")
    done = _train(base + ["--max-steps", "2", "--work", str(named)], cwd, env)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {named / 'tok' / 'state.pt'} holds code or objects that are not plain tensors; "
                      "refused (only weights are loaded): start over with --fresh"], done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists()
