"""Without network, a model that is neither cached nor local fails at once with one line naming the
spec forms that load local files; cached models still load; the CLI prints only that line.

"No network" is the reachability helper answering ``False`` and an empty Hugging Face cache
(``HF_HOME``/``HF_HUB_CACHE`` and the hub client's own cache path point at an empty folder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from explorer.backends import network
from explorer.backends.clip import ClipBackend, ModelLoadError
from explorer.backends.specs import ClipSpec, SamSpec, VlmSpec

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "resources" / "samples" / "scene-01.png"
CLIP_LINE = ("could not fetch weights for {}: no network and not in the Hugging Face cache; pass a local checkpoint "
             "(MODEL@/path/to/checkpoint or local-dir:/path)")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache that every reader uses (the environment now and the hub client's
    constant read at import)."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch):
    calls = []

    def unreachable(*args, **kwargs):
        calls.append(args)
        return False

    monkeypatch.setattr(network, "hub_reachable", unreachable)
    monkeypatch.setattr(network, "url_reachable", unreachable)
    return calls


def put_in_cache(cache: Path, repo: str, files: dict[str, Path | bytes | str]) -> Path:
    """Lay ``files`` out as the hub client caches a download of ``repo`` at ``main``."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snap = folder / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copyfile(content, snap / name)
        elif isinstance(content, bytes):
            (snap / name).write_bytes(content)
        else:
            (snap / name).write_text(content)
    return snap


def _fails_fast(load, spec) -> str:
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load(spec)
    assert time.perf_counter() - start < 2.0
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("model, weights, name", [
    ("ViT-B-16", "openai", "ViT-B-16 (openai)"),
    ("ViT-L-14", "laion2b_s32b_b82k", "ViT-L-14 (laion2b_s32b_b82k)"),
    ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None, "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
])
def test_uncached_clip_fails_at_once_with_one_line(offline, model, weights, name):
    import open_clip  # noqa: F401 - imported before the clock starts, as a running program has it

    message = _fails_fast(ClipBackend.load, ClipSpec(model=model, weights=weights, device="cpu"))
    assert message == CLIP_LINE.format(name)
    assert offline, "the reachability helper was asked"


def test_uncached_vlm_hub_id_fails_at_once(offline):
    from explorer.backends.vlm import VlmBackend

    message = _fails_fast(VlmBackend.load, VlmSpec(model="llava-hf/llava-1.5-7b-hf", device="cpu"))
    assert message == ("could not fetch weights for llava-hf/llava-1.5-7b-hf: no network and not in the Hugging Face "
                       "cache; pass a local checkpoint (vlm:/path/to/model-folder)")


def test_official_sam_checkpoint_fails_at_once(offline, tmp_path, monkeypatch):
    from explorer.backends.sam import SamBackend

    monkeypatch.setenv("EXPLORER_CACHE_DIR", str(tmp_path / "explorer-cache"))
    message = _fails_fast(SamBackend.load, SamSpec(model="vit_b", device="cpu"))
    assert message.startswith("could not download the SAM vit_b checkpoint: no network and not in the cache")
    assert message.endswith("pass a local checkpoint (sam:vit_b@/path/to/sam_vit_b_01ec64.pth)")


def test_cached_hub_clip_loads_without_network(offline, hub_cache, tiny_clip_spec):
    from explorer.testing.tiny import tiny_clip_config

    config = {"model_cfg": tiny_clip_config(),
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "shortest"}}
    put_in_cache(hub_cache, "explorer-test/tiny-clip", {"open_clip_config.json": json.dumps(config),
                                                        "open_clip_model.safetensors": Path(tiny_clip_spec.weights)})
    backend = ClipBackend.load(ClipSpec(model="hf-hub:explorer-test/tiny-clip", device="cpu"))
    assert backend.info.n_layers == 3 and backend.info.input_size == (64, 64)


@pytest.mark.filterwarnings("ignore:QuickGELU mismatch")
def test_cached_tag_is_not_refused(offline, hub_cache):
    # a cached (here broken) file for the tag: the loader runs and reports the file, not the network
    put_in_cache(hub_cache, "timm/vit_base_patch16_clip_224.openai", {"open_clip_model.safetensors": b"not weights"})
    with pytest.raises(ModelLoadError) as err:
        ClipBackend.load(ClipSpec(model="ViT-B-16", weights="openai", device="cpu"))
    assert "no network" not in str(err.value)
    assert not offline, "nothing asked the network"


def test_cached_vlm_hub_id_loads_without_network(offline, hub_cache, tmp_path):
    from explorer.backends.vlm import VlmBackend
    from explorer.testing.tiny_vlm import make_tiny_vlm

    spec = make_tiny_vlm(tmp_path / "tiny-vlm", "demo")
    files = {p.name: p for p in Path(spec.model).iterdir() if p.is_file()}
    put_in_cache(hub_cache, "explorer-test/tiny-vlm", files)
    backend = VlmBackend.load(VlmSpec(model="explorer-test/tiny-vlm", device="cpu"))
    assert backend.info.n_layers > 0
    assert not offline


def test_local_sources_never_ask_the_network(offline, tiny_clip_spec):
    from explorer.backends.vlm import is_hub_id

    assert ClipBackend.load(tiny_clip_spec).info.n_layers == 3
    assert not offline
    assert is_hub_id("llava-hf/llava-1.5-7b-hf") and is_hub_id("gpt2")
    assert not is_hub_id("/models/llava") and not is_hub_id("./llava") and not is_hub_id(str(ROOT / "resources"))


def test_reachability_is_bounded_and_remembered(monkeypatch):
    network.forget_reachability()
    start = time.perf_counter()
    assert network.host_reachable("127.0.0.1", 9, timeout=0.5) is False  # nothing listens on the discard port
    assert time.perf_counter() - start < 1.0
    monkeypatch.setattr(network, "_connect", lambda *a: pytest.fail("asked again"))
    assert network.host_reachable("127.0.0.1", 9) is False
    assert network.url_reachable("file:///tmp/x.pth") is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert network.hub_reachable() is False
    network.forget_reachability()


def test_cli_prints_only_the_error_line(offline, tmp_path, capsys):
    from explorer.cli.main import main

    code = main(["run", str(SAMPLE), "--model", "ViT-B-16@openai", "--method", "attention.rollout",
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines() == ["error: " + CLIP_LINE.format("ViT-B-16 (openai)")]


def test_cli_process_prints_one_line_per_failure(tmp_path):
    """A fresh process (no test logging): offline with an empty cache, and a failure inside the
    loader (an unknown tag, which open_clip also logs on the root logger) print one line each."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    env.pop("HF_HUB_VERBOSITY", None)
    env.pop("TRANSFORMERS_VERBOSITY", None)
    script = (
        "import sys\n"
        "from explorer.cli.main import main\n"
        "codes = [main(['run', sys.argv[1], '--model', spec, '--method', 'attention.rollout', '--out', sys.argv[2]])\n"
        "         for spec in ('ViT-B-16@openai', 'ViT-B-16@not-a-tag')]\n"
        "sys.exit(0 if codes == [1, 1] else 3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(SAMPLE), str(tmp_path / "x.png")], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = done.stderr.splitlines()
    assert done.returncode == 0, done.stderr
    assert lines[0] == "error: " + CLIP_LINE.format("ViT-B-16 (openai)")
    assert len(lines) == 2 and lines[1].startswith("error: could not load ViT-B-16 (not-a-tag)"), done.stderr


# ----------------------------------------------------------------------------- the real probe

CLOSED = "http://127.0.0.1:9"  # nothing listens on the discard port: every connection is refused at once


@pytest.fixture
def no_route(hub_cache, tmp_path, monkeypatch):
    """No network as a user without one has it: offline mode *not* set, empty caches, and every
    HTTP(S) connection going through a proxy that refuses it. The reachability probe runs for real
    (nothing of :mod:`explorer.backends.network` is replaced), so a load that went to the network
    anyway would spend the hub client's retries here instead of failing at once."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, CLOSED)
    monkeypatch.setenv("EXPLORER_CACHE_DIR", str(tmp_path / "explorer-cache"))
    network.forget_reachability()
    yield
    network.forget_reachability()


@pytest.mark.parametrize("spec, start", [
    (ClipSpec(model="ViT-B-16", weights="openai", device="cpu"), "could not fetch weights for ViT-B-16 (openai): no network"),
    (VlmSpec(model="someorg/somemodel", device="cpu"), "could not fetch weights for someorg/somemodel: no network"),
    (SamSpec(model="vit_b", device="cpu"), "could not download the SAM vit_b checkpoint: no network"),
], ids=["clip", "vlm", "sam"])
def test_without_network_a_missing_model_fails_within_seconds(no_route, spec, start):
    import open_clip  # noqa: F401 - imported before the clock starts, as a running program has it
    import segment_anything  # noqa: F401
    import transformers  # noqa: F401

    from explorer.backends.registry import load_backend

    assert not network.hub_offline()
    begin = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_backend(spec)
    assert time.perf_counter() - begin < 5.0
    message = str(err.value)
    assert "\n" not in message and message.startswith(start), message
    assert "pass a local checkpoint" in message


def test_cli_process_without_network_prints_one_line_each_within_seconds(tmp_path):
    """A fresh ``token-explorer`` process per the tester's setup (no offline mode, empty caches):
    each of a CLIP tag, a VLM hub id and an official SAM checkpoint fails in seconds with one
    ``error:`` line and nothing else on stderr."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY",
                        "HF_HUB_VERBOSITY", "TRANSFORMERS_VERBOSITY")}
    env.update({"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
                "EXPLORER_CACHE_DIR": str(tmp_path / "cache"), "https_proxy": CLOSED, "HTTPS_PROXY": CLOSED,
                "http_proxy": CLOSED, "HTTP_PROXY": CLOSED})
    script = (
        "import json, sys, time\n"
        "import open_clip, segment_anything, transformers\n"
        "from explorer.cli.main import main\n"
        "out = []\n"
        "for spec in ('ViT-B-16@openai', 'vlm:someorg/somemodel', 'sam:vit_b'):\n"
        "    t = time.perf_counter()\n"
        "    code = main(['run', sys.argv[1], '--model', spec, '--method', 'attention.raw', '--out', sys.argv[2]])\n"
        "    out.append([spec, code, time.perf_counter() - t])\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(SAMPLE), str(tmp_path / "x.png")], env=env,
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    lines = done.stderr.splitlines()
    assert [code for _, code, _ in runs] == [1, 1, 1], done.stderr
    assert all(seconds < 5.0 for _, _, seconds in runs), runs
    assert len(lines) == 3 and all(line.startswith("error: ") and "no network" in line for line in lines), done.stderr
