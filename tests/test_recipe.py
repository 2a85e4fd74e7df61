"""Recipe schema v1: accepted and rejected cases."""

from __future__ import annotations

import pytest

import inc_bridge as ib
from inc_bridge.formats import FP8Format, Target
from inc_bridge.recipe import Backend, Form, Granularity, Op, ScaleMethod


def test_default_recipe_is_the_documented_one():
    r = ib.Recipe()
    q = r.quantization
    assert (q.format, q.target) == (FP8Format.E4M3, Target.CPU)
    assert (q.weight.granularity, q.weight.scale_method) == (Granularity.PER_TENSOR, ScaleMethod.MAXABS_ARBITRARY)
    assert (q.activation.granularity, q.activation.scale_method) == (Granularity.PER_TENSOR, ScaleMethod.MAXABS_ARBITRARY)
    assert q.ops == (Op.LINEAR, Op.CONV2D) and q.include == () and q.exclude == ()
    assert (r.form, r.backend, r.version) == (Form.SUBCLASS, Backend.AUTO, 1)
    assert ib.default_recipe() == r


def test_yaml_round_trip(tmp_path):
    r = ib.Recipe.model_validate({
        "quantization": {"format": "E5M2", "target": "gaudi2", "weight": {"granularity": "per_channel"},
                         "ops": ["linear"], "include": ["re:encoder\\..*"], "exclude": ["pooler.dense"]},
        "form": "module",
    })
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml())
    assert ib.load_recipe(path) == r
    assert ib.load_recipe(str(path)) == r


def test_design_md_example_loads(tmp_path):
    text = """
version: 1
quantization:
  format: e4m3
  target: cpu
  weight:     {granularity: per_tensor, scale_method: maxabs_arbitrary}
  activation: {granularity: per_tensor, scale_method: maxabs_arbitrary}
  ops: [linear, conv2d]
  include: []
  exclude: []
form: subclass
backend: auto
"""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert ib.load_recipe(path) == ib.Recipe()


@pytest.mark.parametrize(
    "data,match",
    [
        ({"quantization": {"weight": {"granularty": "per_tensor"}}},
         r"quantization\.weight\.granularty: unknown key 'granularty'; valid keys here: granularity, scale_method"),
        ({"tunning": {}}, r"unknown key 'tunning'; valid keys here: version, quantization, form, backend, model, "
                          r"calibration, evaluation, tuning, report, locked"),
        ({"quantization": {"format": "e3m4"}}, r"quantization\.format: 'e3m4' is not valid; .*'e4m3' or 'e5m2'"),
        ({"quantization": {"target": "tpu"}}, r"quantization\.target: 'tpu' is not valid"),
        ({"quantization": {"weight": {"scale_method": "maxabs_hw"}}}, r"quantization\.weight\.scale_method: 'maxabs_hw' is not valid"),
        ({"quantization": {"activation": {"granularity": "per_channel"}}}, r"activation granularity must be per_tensor"),
        ({"quantization": {"ops": ["linear", "lstm"]}}, r"quantization\.ops\.1: 'lstm' is not valid"),
        ({"quantization": {"ops": []}}, r"ops must name at least one op"),
        ({"quantization": {"include": ["re:("]}}, r"invalid regular expression"),
        ({"quantization": {"exclude": [""]}}, r"non-empty string"),
        ({"quantization": {"weight": {"scale_method": "unit_scale"}}}, r"unit_scale must be used for both"),
        ({"form": "graph"}, r"form: 'graph' is not valid"),
        ({"backend": "tpu"}, r"backend: 'tpu' is not valid"),
        ({"version": 2}, r"version: 2 is not valid"),
        ({"quantization": "e4m3"}, r"quantization: "),
    ],
)
def test_rejected(data, match):
    with pytest.raises(ib.RecipeError, match=match):
        ib.Recipe.model_validate(data)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ib.RecipeError, match="cannot read recipe"):
        ib.load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("quantization: [unclosed")
    with pytest.raises(ib.RecipeError, match="bad.yaml: not valid YAML"):
        ib.load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ib.RecipeError, match="a recipe is a mapping"):
        ib.load_recipe(listy)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("quantization:\n  formt: e4m3\n")
    with pytest.raises(ib.RecipeError, match=r"unknown.yaml: invalid recipe:\n  quantization\.formt: unknown key"):
        ib.load_recipe(unknown)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("form: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ib.RecipeError, match="not valid YAML"):
        ib.load_recipe(evil)


def test_recipe_is_immutable():
    r = ib.Recipe()
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        r.form = Form.MODULE  # type: ignore[misc]
