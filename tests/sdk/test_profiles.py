import pytest

from edgeopt.sdk.errors import ConfigError
from edgeopt.sdk.profile import builtin_profile_paths, load_profile, load_profile_file


def test_shipped_profiles_validate():
    names = set(builtin_profile_paths())
    assert {"cpu", "igpu", "npu", "gpu", "arm"} <= names
    for name in names:
        p = load_profile(name)
        assert p.name == name
    assert load_profile("npu").requires_static_shapes
    assert not load_profile("cpu").requires_static_shapes


def test_unknown_profile_suggests_nearest():
    with pytest.raises(ConfigError) as err:
        load_profile("npuu")
    assert err.value.one_line() == "unknown profile 'npuu' (did you mean 'npu'?)"


def test_unknown_key_names_file_key_and_value(tmp_path):
    src = builtin_profile_paths()["cpu"].read_text()
    bad = tmp_path / "mine.toml"
    bad.write_text(src.replace('[shapes]\npolicy = "dynamic-allowed"', '[shapes]\npolicy = "dynamic-allowed"\npolcy = 3'))
    with pytest.raises(ConfigError) as err:
        load_profile_file(bad)
    msg = err.value.one_line()
    assert str(bad) in msg and "shapes.polcy" in msg and "unknown key" in msg and "found 3" in msg


def test_bad_value_names_expected(tmp_path):
    src = builtin_profile_paths()["npu"].read_text()
    bad = tmp_path / "mine.toml"
    bad.write_text(src.replace('mode = "int8"', 'mode = "int4"'))
    with pytest.raises(ConfigError) as err:
        load_profile_file(bad)
    assert "precision.mode" in err.value.message and "'int4'" in err.value.message


def test_cross_field_check(tmp_path):
    src = builtin_profile_paths()["npu"].read_text()
    bad = tmp_path / "mine.toml"
    # the [[runtimes]] device only (the first): [llm] has its own NPU-only keys, refused on a GPU
    bad.write_text(src.replace('device = "NPU"', 'device = "GPU"', 1))
    with pytest.raises(ConfigError, match="does not match target device"):
        load_profile_file(bad)


def test_not_toml(tmp_path):
    bad = tmp_path / "x.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_profile_file(bad)
