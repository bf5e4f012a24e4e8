"""The architecture registry: every fact about an architecture in its one entry, its options typed and named."""

import ast
import warnings
from pathlib import Path

import pytest

import stainmil
from stainmil.config import ModelConfig, config_from_dict
from stainmil.errors import ConfigError
from stainmil.model.registry import (
    ARCHITECTURES,
    STAIN_IDENTITIES,
    architecture_rows,
    check_model_config,
    options_of,
    options_reference_markdown,
    register_architecture,
)

SRC = Path(stainmil.__file__).parent
# what an architecture can do: said once, in register_architecture(...), read through the registry
FACTS = {"has_patch_attention", "reads_context", "patch_attention", "stain_identities", "stain_specific",
         "needs_registration", "patch_positions", "fused_optimizer"}


def _facts_outside_the_registry() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path == SRC / "model" / "registry.py":
            continue
        where = path.relative_to(SRC)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):  # a class attribute such as has_patch_attention = False
                for item in node.body:
                    targets = item.targets if isinstance(item, ast.Assign) else \
                        [item.target] if isinstance(item, ast.AnnAssign) else []
                    found += [f"{where}:{item.lineno} class attribute {t.id}" for t in targets
                              if isinstance(t, ast.Name) and t.id in FACTS]
            elif isinstance(node, ast.Assign):  # self.has_patch_attention = ...
                found += [f"{where}:{node.lineno} {ast.unparse(t)}" for t in node.targets
                          if isinstance(t, ast.Attribute) and t.attr in FACTS]
            elif isinstance(node, ast.Call) and not ast.unparse(node.func).endswith("register_architecture"):
                found += [f"{where}:{node.lineno} {k.arg}= in {ast.unparse(node.func)}" for k in node.keywords
                          if k.arg in FACTS - {"patch_attention"}]  # (patch_attention= is also an analysis flag)
            elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and path.name != "config.py":
                names = [e.value for e in node.elts if isinstance(e, ast.Constant)]
                if len(set(names) & set(STAIN_IDENTITIES)) >= 3:  # a list of stain identities of its own
                    found.append(f"{where}:{node.lineno} {ast.unparse(node)}")
            elif isinstance(node, ast.Attribute) and node.attr == "baseline":  # the old flat bag of options
                found.append(f"{where}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_architecture_fact_is_declared_outside_its_registry_entry():
    assert _facts_outside_the_registry() == []


def test_the_scan_sees_a_fact_declared_in_a_class(tmp_path, monkeypatch):
    """The guard above is not vacuous: a model file declaring its own capability is caught."""
    fake = tmp_path / "stainmil"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "mine.py").write_text("class Mine:\n    has_patch_attention = False\n"
                                            "IDS = ('none', 'embedding', 'gated')\n")
    monkeypatch.setattr(f"{__name__}.SRC", fake)
    assert len(_facts_outside_the_registry()) == 2


def test_every_entry_is_consistent_and_documented():
    reference = options_reference_markdown()
    rows = {row["name"]: row for row in architecture_rows()}
    assert set(rows) == set(ARCHITECTURES)
    for name, spec in ARCHITECTURES.items():
        assert set(spec.stain_identities) <= set(STAIN_IDENTITIES) and "none" in spec.stain_identities
        if spec.options is not None:
            defaults = options_of(ModelConfig(architecture=name))
            assert isinstance(defaults, spec.options)
            for key in vars(defaults):
                assert f"`model.options.{name}.{key}`" in reference
                assert key in rows[name]["options"]
    assert rows["late_fusion"]["attention"] == "as its base" and rows["transmil"]["attention"] == "no"
    assert "specific" in rows["hierarchical"]["stain identity"] and "specific" not in rows["abmil"]["stain identity"]


def test_options_are_typed_and_a_bad_one_is_named():
    assert options_of(ModelConfig(architecture="transmil", options={"transmil": {"heads": 2}})).heads == 2
    assert options_of(ModelConfig(architecture="abmil")) is None
    cases = [({"transmil": {"heads": "many"}}, "model.options.transmil.heads"),
             ({"transmil": {"head": 2}}, "unknown config key 'model.options.transmil.head'"),
             ({"transmil": {"dropout": 1.5}}, "dropout in \\[0, 1\\)"),
             ({"abmil": {"heads": 2}}, "'abmil' has no options"),
             ({"transmill": {"heads": 2}}, "'transmill' is not an architecture")]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_model_config(ModelConfig(architecture="abmil", options=options))


def test_a_stain_identity_an_architecture_does_not_take_is_refused_with_its_choices():
    check_model_config(ModelConfig(architecture="hierarchical", stain_identity="specific"))
    with pytest.raises(ConfigError, match=r"abmil takes|choose one of \['none', 'embedding', 'gated'\]"):
        check_model_config(ModelConfig(architecture="abmil", stain_identity="attention"))
    with pytest.raises(ValueError, match="not model.stain_identity choices"):
        register_architecture("x", reference="", stain_identities=("none", "by_colour"))


def test_old_baseline_keys_are_read_as_options_with_one_warning():
    old = {"model": {"architecture": "mustang", "baseline": {"graph_layers": 2, "transmil_heads": 4},
                     "options": {"biox_cpath": {"layers": 3}}}}
    with pytest.warns(FutureWarning, match="model.options") as caught:
        config = config_from_dict(old)
    assert len(caught) == 1
    assert options_of(config.model).layers == 2 and options_of(config.model, "transmil").heads == 4
    assert options_of(config.model, "biox_cpath").layers == 2  # the old spelling wins (a --set of it on a loaded
    # config, whose options hold every value, must take effect)
    loaded = config_from_dict({"model": {"options": {"transmil": {"heads": 8}}}})
    with pytest.warns(FutureWarning):
        assert options_of(loaded.with_overrides({"model.baseline.transmil_heads": 4}).model, "transmil").heads == 4
    with warnings.catch_warnings():  # the new spelling alone: no warning
        warnings.simplefilter("error")
        assert options_of(config_from_dict({"model": {"options": {"mustang": {"k": 3}}}}).model, "mustang").k == 3
    with pytest.raises(ConfigError, match="model.baseline.graph_depth"):
        config_from_dict({"model": {"baseline": {"graph_depth": 2}}})
