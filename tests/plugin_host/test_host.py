"""Plugin discovery through entry points, lazy import, broken plugins, parameters."""

import importlib.metadata as md
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel, Field
from typing import Literal

from explorer.core.jobs import CancelToken, run_sync
from explorer.core.target import Target
from explorer.plugin_host.api import ParamError, param_fields, params_to_strings, parse_params
from explorer.plugin_host.host import PluginError, PluginHost
from explorer.plugin_host.manifest import ManifestError, read_manifest

ROOT = Path(__file__).resolve().parents[2]


def test_every_builtin_plugin_folder_is_an_entry_point():
    folders = {p.parent.name for p in (ROOT / "plugins" / "explorer_plugins").glob("*/manifest.toml")}
    eps = {ep.value.split(":")[0].split(".")[-1] for ep in md.entry_points(group="explorer.plugins")}
    assert folders and folders <= eps
    host = PluginHost()
    assert not [r for r in host.plugins if not r.ok]
    assert {"attention.raw", "attention.rollout", "similarity.maskclip"} <= {m.id for m in host.methods()}


def test_listing_imports_no_plugin_code():
    code = textwrap.dedent(
        """
        import sys
        from explorer.plugin_host.host import PluginHost
        host = PluginHost()
        assert host.methods(), "no methods"
        loaded = sorted(m for m in sys.modules if m.startswith("explorer_plugins."))
        assert not loaded, loaded
        assert "torch" not in sys.modules
        host.load("attention.rollout")
        assert "explorer_plugins.attention_rollout.method" in sys.modules
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _write_dist(site: Path, dist: str, plugins: dict[str, str]) -> None:
    """A minimal installed distribution with entry points (what pip would write)."""
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    eps = "[explorer.plugins]\n" + "".join(f"{name} = {value}\n" for name, value in plugins.items())
    (info / "entry_points.txt").write_text(eps)


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A third-party distribution with a good plugin, a broken manifest, a missing package and a
    plugin whose code raises on import, discovered through the real entry-point mechanism."""
    site = tmp_path / "site"
    good = site / "thirdparty_good"
    good.mkdir(parents=True)
    (good / "__init__.py").write_text("")
    (good / "manifest.toml").write_text(textwrap.dedent(
        """
        name = "thirdparty-good"
        version = "1.2.3"
        [[methods]]
        id = "thirdparty.constant"
        title = "Constant map"
        family = "attention"
        requires = []
        python_name = "thirdparty_good.impl:Constant"
        [[methods]]
        id = "thirdparty.raises"
        title = "Raising map"
        family = "attention"
        python_name = "thirdparty_good.impl:Raises"
        [[methods]]
        id = "thirdparty.oom"
        title = "Greedy map"
        family = "attention"
        python_name = "thirdparty_good.impl:OutOfMemory"
        [[methods]]
        id = "thirdparty.import_error"
        title = "Broken import"
        family = "attention"
        python_name = "thirdparty_good.broken:Nothing"
        """))
    (good / "impl.py").write_text(textwrap.dedent(
        """
        import numpy as np
        from pydantic import BaseModel
        from explorer.core.results import Heatmap
        from explorer.plugin_host.api import Method

        class Constant(Method):
            class Params(BaseModel):
                value: float = 1.0
            def run(self, trace, params, *, target, cancel, backend=None):
                yield from ()
                n = trace.layout.n_image_tokens
                return Heatmap(layout=trace.layout, token_values=params.value * np.arange(n) / n)

        class Raises(Method):
            def run(self, trace, params, *, target, cancel, backend=None):
                raise ZeroDivisionError("plugin bug")
                yield

        class OutOfMemory(Method):
            def run(self, trace, params, *, target, cancel, backend=None):
                raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
                yield
        """))
    (good / "broken.py").write_text("raise ImportError('missing dependency xyz')\n")
    bad = site / "thirdparty_bad"
    bad.mkdir()
    (bad / "__init__.py").write_text("")
    (bad / "manifest.toml").write_text('name = "bad"\n[[methods]]\nid = "Bad Id!"\ntitle = "x"\nfamily = "attention"\npython_name = "a:b"\n')
    _write_dist(site, "thirdparty", {
        "good": "thirdparty_good:manifest.toml",
        "bad": "thirdparty_bad:manifest.toml",
        "missing": "no_such_package_anywhere:manifest.toml",
        "notoml": "thirdparty_good:absent.toml",
    })
    monkeypatch.syspath_prepend(str(site))
    return site


def test_third_party_plugins_and_broken_entries(third_party, tiny_clip, make_image):
    host = PluginHost()
    by_name = {r.name: r for r in host.plugins}
    assert by_name["good"].ok and by_name["good"].distribution == "thirdparty"
    assert "method id" in by_name["bad"].error
    assert "not installed" in by_name["missing"].error
    assert "not found" in by_name["notoml"].error
    assert {"attention.raw", "thirdparty.constant"} <= {m.id for m in host.methods()}
    assert "thirdparty_good.impl" not in sys.modules

    from explorer.core.trace import CaptureSpec

    trace = run_sync(tiny_clip.trace(make_image(64, 64), CaptureSpec()))
    p = host.make_params("thirdparty.constant", {"value": "2.5"})
    hm = run_sync(host.run("thirdparty.constant", trace, p, target=Target(), cancel=CancelToken()))
    n = trace.layout.n_image_tokens
    np.testing.assert_allclose(hm.token_values, 2.5 * np.arange(n) / n, rtol=1e-6)

    with pytest.raises(PluginError, match="Raising map .*ZeroDivisionError: plugin bug"):
        run_sync(host.run("thirdparty.raises", trace, host.make_params("thirdparty.raises"), target=Target()))
    with pytest.raises(PluginError, match="Greedy map ran out of memory"):
        run_sync(host.run("thirdparty.oom", trace, host.make_params("thirdparty.oom"), target=Target(),
                          backend=tiny_clip))
    with pytest.raises(PluginError, match="missing dependency xyz"):
        host.load("thirdparty.import_error")
    assert any("thirdparty.import_error" in name for name, _ in host.errors)
    # the built-in methods keep working after the failures
    run_sync(host.run("attention.rollout", run_sync(tiny_clip.trace(make_image(64, 64), CaptureSpec.everything(3))),
                      host.make_params("attention.rollout"), target=Target()))


def test_manifest_errors_are_one_line(tmp_path):
    p = tmp_path / "manifest.toml"
    p.write_text("name = [unclosed")
    with pytest.raises(ManifestError, match="not valid TOML"):
        read_manifest(p)
    p.write_text('name = "x"\n[[methods]]\nid = "a.b"\ntitle = "t"\nfamily = "colour"\npython_name = "m:C"\n')
    with pytest.raises(ManifestError, match="methods.0.family"):
        read_manifest(p)


class _Params(BaseModel):
    layer: int = Field(-1, json_schema_extra={"role": "layer"})
    ratio: float = Field(0.5, ge=0.0, le=1.0, description="keep ratio")
    mode: Literal["mean", "max"] = "mean"
    smooth: bool = False
    names: list[str] = Field(default_factory=lambda: ["a", "b"])
    limit: int | None = None


def test_params_round_trip_and_errors():
    fields = {f.name: f for f in param_fields(_Params)}
    assert fields["ratio"].kind == "float" and fields["ratio"].minimum == 0.0 and fields["ratio"].maximum == 1.0
    assert fields["mode"].choices == ("mean", "max") and fields["layer"].role == "layer"
    assert fields["limit"].optional and fields["names"].kind == "list"
    p = parse_params(_Params, {"layer": "3", "ratio": "0.25", "mode": "max", "smooth": "true", "names": "x, y", "limit": "none"})
    assert p == _Params(layer=3, ratio=0.25, mode="max", smooth=True, names=["x", "y"], limit=None)
    assert parse_params(_Params, params_to_strings(p)) == p
    with pytest.raises(ParamError, match="unknown parameter"):
        parse_params(_Params, {"colour": "red"})
    with pytest.raises(ParamError, match="ratio"):
        parse_params(_Params, {"ratio": "1.5"})


def test_builtin_params_round_trip_through_strings():
    host = PluginHost()
    for m in host.methods():
        model = host.params_model(m.id)
        p = model()
        assert parse_params(model, params_to_strings(p)) == p
