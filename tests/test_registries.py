"""The encoder and head registries: open to new names, lazy, and honest about what they import."""

import importlib
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

import pipeline.encoders as encoders
import pipeline.heads as heads
from pipeline.encoders.common import resolve_dtype


def test_listing_names_imports_no_model_code():
    """params validation lists names in every stage; that must not load torch or any family."""
    code = (
        "import sys; from pipeline.encoders import list_encoders; from pipeline.heads import list_heads;"
        "list_encoders(); list_heads();"
        "print(sorted(m for m in sys.modules if m in ('torch', 'timm', 'open_clip', 'transformers')"
        " or m.startswith(('pipeline.heads.', 'pipeline.encoders.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", sorted(set(heads.BUILTIN.values())))
def test_each_head_module_registers_exactly_its_builtin_names(module):
    before = set(heads._REGISTRY)
    importlib.import_module(f"pipeline.heads.{module}")
    mine = {name for name, m in heads.BUILTIN.items() if m == module}
    registered = {n for n, fn in heads._REGISTRY.items() if fn.__module__ == f"pipeline.heads.{module}"}
    assert registered == mine
    assert before <= set(heads._REGISTRY)


@pytest.mark.parametrize("name", encoders.BUILTIN)
def test_each_builtin_encoder_is_a_package_of_its_own(name):
    module = importlib.import_module(f"pipeline.encoders.{name}")
    assert module.__file__.endswith(f"encoders/{name}/__init__.py")
    assert encoders._REGISTRY[name].__module__ == module.__name__


def test_a_registered_name_is_accepted_without_editing_a_list(params):
    @encoders.register_encoder("vit_copy_for_test")
    class Copy(encoders._lookup("vit")):
        pass

    try:
        assert "vit_copy_for_test" in encoders.list_encoders()
        enc = encoders.create_encoder("vit_copy_for_test", params["extract"]["vit"], "demo")
        assert isinstance(enc, Copy) and enc.name == "vit_copy_for_test"
    finally:
        del encoders._REGISTRY["vit_copy_for_test"]


def test_entry_points_add_encoders_and_heads(tmp_path, monkeypatch):
    (tmp_path / "agiqa_plugin_for_test.py").write_text(
        "class Encoder:\n"
        "    def __init__(self, cfg, profile, device, dtype):\n"
        "        self.cfg, self.dtype = cfg, dtype\n"
        "def head(n_outputs, input_shapes, **cfg):\n"
        "    return ('head', n_outputs, input_shapes, cfg)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    enc_group, head_group = encoders.ENTRY_POINTS, heads.ENTRY_POINTS
    plugins = {
        enc_group: [EntryPoint("plug_enc", "agiqa_plugin_for_test:Encoder", enc_group)],
        head_group: [EntryPoint("plug_head", "agiqa_plugin_for_test:head", head_group)],
    }

    def entry_points(group):
        return plugins.get(group, [])

    monkeypatch.setattr(encoders, "entry_points", entry_points)
    monkeypatch.setattr(heads, "entry_points", entry_points)
    monkeypatch.setattr(encoders, "_REGISTRY", dict(encoders._REGISTRY))
    monkeypatch.setattr(heads, "_REGISTRY", dict(heads._REGISTRY))
    assert "plug_enc" in encoders.list_encoders() and "plug_head" in heads.list_heads()
    enc = encoders.create_encoder("plug_enc", {"a": 1}, "paper")
    assert enc.cfg == {"a": 1} and enc.dtype == "bfloat16" and enc.name == "plug_enc"
    assert heads.create_head("plug_head", 2, {"x": (3,)}, k=1) == ("head", 2, {"x": (3,)}, {"k": 1})


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="unknown encoder 'vitt'; known: clip, semantic, vit"):
        encoders.create_encoder("vitt", {}, "demo")
    with pytest.raises(KeyError, match=r"unknown head 'probes'; known: .*probe"):
        heads.create_head("probes", 1, {})
    with pytest.raises(ValueError, match="profile must be one of demo, paper, got 'Paper'"):
        encoders.create_encoder("vit", {}, "Paper")


def test_auto_dtype_depends_on_the_profile_only():
    assert resolve_dtype("auto", "demo") == "float32"
    assert resolve_dtype("auto", "paper") == "bfloat16"
    assert resolve_dtype("float16", "demo") == "float16"
    with pytest.raises(ValueError, match=r"extract\.dtype must be auto or one of"):
        resolve_dtype("fp16", "paper")


@pytest.mark.parametrize("name", ["vit", "clip"])
def test_vit_and_clip_stores_record_a_digest_of_their_weights(name, params):
    cfg = params["extract"][name]
    first = encoders.create_encoder(name, cfg, "demo").provenance()
    reseeded = {**cfg, "demo": {**cfg["demo"], "seed": cfg["demo"]["seed"] + 1}}
    other = encoders.create_encoder(name, reseeded, "demo").provenance()
    assert len(first["weights_sha256"]) == 64
    assert first["weights_sha256"] != other["weights_sha256"]
    assert first["compute_dtype"] == "float32"
