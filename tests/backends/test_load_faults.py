"""A model whose files are damaged, refused or of another architecture fails with one line that
names the file and the reason, and no code from the files runs: damaged safetensors and pickled
code in a VLM folder or a CLIP checkpoint, a CLIP checkpoint of another width or depth, and a VLM
that needs its repository's own code (refused by type before anything of it is imported).

Every model is a tiny real one, saved and loaded through the libraries' own loaders.
"""

from __future__ import annotations

import os
import pickle
import runpy
import shutil
from pathlib import Path

import pytest
import torch

from explorer.backends.clip import ClipBackend
from explorer.backends.errors import ModelLoadError, RemoteCodeRequired
from explorer.backends.specs import VlmSpec

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "resources" / "samples" / "scene-01.png"
REFUSED = "holds code or objects that are not plain tensors; refused (only weights are loaded)"


class WritesMarker:
    """Unpickling this runs ``Path(marker).write_text(...)``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code from a checkpoint ran"))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory) -> Path:
    from explorer.testing.tiny_vlm import make_tiny_vlm

    return Path(make_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), "llava-crop").model)


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


# --------------------------------------------------------------------------- VLM weights


def test_vlm_with_damaged_safetensors_names_the_file(vlm_folder, tmp_path):
    from explorer.backends.vlm import VlmBackend

    folder = _copy(vlm_folder, tmp_path / "damaged")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError) as err:
        VlmBackend.load(VlmSpec(model=str(folder), device="cpu"))
    message = _one_line(err)
    assert message.startswith(f"vlm:{folder}: model.safetensors is damaged (")
    assert "Traceback" not in message


def test_vlm_with_pickled_code_is_refused_and_nothing_runs(vlm_folder, tmp_path):
    from explorer.backends.vlm import VlmBackend

    folder = _copy(vlm_folder, tmp_path / "malicious")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran.txt"
    torch.save({"model.embed.weight": WritesMarker(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as err:
        VlmBackend.load(VlmSpec(model=str(folder), device="cpu"))
    assert _one_line(err) == f"vlm:{folder}: pytorch_model.bin {REFUSED}"
    assert not marker.exists()


def test_cli_prints_one_line_for_a_damaged_vlm(vlm_folder, tmp_path, capsys):
    from explorer.cli.main import main

    folder = _copy(vlm_folder, tmp_path / "damaged")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code = main(["run", str(SAMPLE), "--model", f"vlm:{folder}", "--method", "attention.raw",
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith(f"error: vlm:{folder}: model.safetensors is damaged ("), err


# --------------------------------------------------------------------------- VLM own code


@pytest.fixture
def remote_code(tmp_path):
    from explorer.testing.tiny_vlm import make_remote_code_vlm

    marker = tmp_path / "imported.txt"
    spec = make_remote_code_vlm(tmp_path / "remote", marker)
    return spec, marker


def test_the_fixture_code_would_write_the_marker(remote_code, tmp_path):
    spec, marker = remote_code
    other = tmp_path / "other.txt"
    text = (Path(spec.model) / "configuration_x.py").read_text().replace(repr(str(marker)), repr(str(other)))
    (tmp_path / "probe_configuration.py").write_text(text)
    runpy.run_path(str(tmp_path / "probe_configuration.py"))  # what importing the module would do
    assert other.exists() and not marker.exists()


def test_remote_code_is_refused_by_type_before_any_of_it_runs(remote_code):
    from explorer.backends.vlm import VlmBackend

    spec, marker = remote_code
    with pytest.raises(RemoteCodeRequired) as err:
        VlmBackend.load(spec)
    assert isinstance(err.value, ModelLoadError) and isinstance(err.value, ValueError)
    assert err.value.spec == spec.canonical() == f"vlm:{spec.model}?device=cpu"
    assert err.value.modules == ("configuration_x.py", "modeling_x.py")
    assert _one_line(err).endswith("Allow it only for a repository you trust: add &trust_remote_code=true to the "
                                   f"spec (vlm:{spec.model}?device=cpu&trust_remote_code=true)")
    assert not marker.exists()
    again = pickle.loads(pickle.dumps(err.value))  # crosses process boundaries intact
    assert type(again) is RemoteCodeRequired and again.spec == err.value.spec and str(again) == str(err.value)


def test_a_native_model_with_an_auto_map_needs_no_consent(vlm_folder, tmp_path):
    """transformers uses its own classes for a model type it knows, code or no code in the folder."""
    import json

    from explorer.backends.vlm import VlmBackend, remote_code_modules

    folder = _copy(vlm_folder, tmp_path / "native")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    assert remote_code_modules({"config.json": config}) == []
    assert VlmBackend.load(VlmSpec(model=str(folder), device="cpu")).info.n_layers == 1


def test_cli_says_how_to_allow_the_code_in_one_line(remote_code, tmp_path, capsys):
    from explorer.cli.main import main

    spec, marker = remote_code
    code = main(["run", str(SAMPLE), "--model", f"vlm:{spec.model}", "--method", "attention.raw",
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.splitlines()
    assert code != 0 and len(err) == 1, err
    assert err[0].startswith(f"error: vlm:{spec.model} runs its repository's own Python code")
    assert err[0].endswith("nothing of it ran. Allow it only for a repository you trust: add ?trust_remote_code=true "
                           "to the spec")
    assert not marker.exists()


# --------------------------------------------------------------------------- CLIP checkpoints


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three tiny CLIPs: the architecture under test, one 1.5x wider, one a block shallower."""
    from explorer.testing.tiny import make_tiny_clip

    base = tmp_path_factory.mktemp("clips")
    return (make_tiny_clip(base / "a", name="fault-a"),
            make_tiny_clip(base / "wide", name="fault-wide", width=96, text_width=48),
            make_tiny_clip(base / "shallow", name="fault-shallow", layers=2, checkpoint_format="pt"))


def test_clip_checkpoint_of_another_width_names_both_shapes(clips):
    a, wide, _ = clips
    with pytest.raises(ModelLoadError) as err:
        ClipBackend.load(a.model_copy(update={"weights": wide.weights}))
    assert _one_line(err).startswith(
        f"fault-a@{wide.weights} does not fit fault-a: positional_embedding is (16, 48) in the file, "
        f"the model has (16, 32) (")
    assert "AssertionError" not in str(err.value)


def test_clip_checkpoint_of_another_depth_names_the_missing_tensors(clips):
    a, _, shallow = clips
    with pytest.raises(ModelLoadError) as err:
        ClipBackend.load(a.model_copy(update={"weights": shallow.weights}))
    assert _one_line(err).startswith(f"fault-a@{shallow.weights} does not fit fault-a: the file lacks 12 tensors "
                                     "of the model (visual.transformer.resblocks.2.")


def test_damaged_and_pickled_clip_checkpoints(clips, tmp_path):
    a = clips[0]
    damaged = tmp_path / "damaged.safetensors"
    data = Path(a.weights).read_bytes()
    damaged.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError) as err:
        ClipBackend.load(a.model_copy(update={"weights": str(damaged)}))
    assert f"{damaged} is damaged (" in _one_line(err)

    marker = tmp_path / "ran.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"logit_scale": WritesMarker(marker)}}, evil)
    with pytest.raises(ModelLoadError) as err:
        ClipBackend.load(a.model_copy(update={"weights": str(evil)}))
    assert _one_line(err).endswith(f"{evil} {REFUSED}")
    assert not marker.exists()


def test_matching_checkpoint_still_loads(clips):
    from explorer.backends.clip import checkpoint_mismatch

    a = clips[0]
    assert checkpoint_mismatch("fault-a", a.weights) is None
    assert ClipBackend.load(a).info.n_layers == 3
    assert os.path.exists(a.weights)
