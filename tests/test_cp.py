"""The context-parallel setup shared by the plugin and the callback: cp_size resolution."""

import pytest

from hf_ring_attention.cp import ENV_CP_SIZE, ContextParallelSetup, resolve_cp_size


def test_cp_size_argument_wins_over_environment_which_wins_over_world_size(monkeypatch):
    monkeypatch.delenv(ENV_CP_SIZE, raising=False)
    assert resolve_cp_size(None, 8) == 8
    monkeypatch.setenv(ENV_CP_SIZE, "4")
    assert resolve_cp_size(None, 8) == 4
    assert resolve_cp_size(2, 8) == 2
    monkeypatch.setenv(ENV_CP_SIZE, "")
    assert resolve_cp_size(None, 8) == 8  # an empty variable is unset


@pytest.mark.parametrize("value, source, message", [
    (3, "cp_size", r"cp_size=3 must be a positive divisor of the number of processes \(8\); with 8 processes choose one of \[1, 2, 4, 8\]"),
    (0, "cp_size", r"cp_size=0 must be a positive divisor"),
    ("x", "cp_size", r"cp_size='x' is not an integer"),
    (True, "cp_size", r"cp_size=True is not an integer"),
])
def test_bad_cp_size_names_the_value_and_the_choices(monkeypatch, value, source, message):
    monkeypatch.delenv(ENV_CP_SIZE, raising=False)
    with pytest.raises(ValueError, match=message):
        resolve_cp_size(value, 8)


@pytest.mark.parametrize("value, message", [
    ("3", rf"{ENV_CP_SIZE}=3 must be a positive divisor of the number of processes \(8\)"),
    ("two", rf"{ENV_CP_SIZE}='two' is not an integer"),
])
def test_bad_environment_variable_is_named_as_the_source(monkeypatch, value, message):
    monkeypatch.setenv(ENV_CP_SIZE, value)
    with pytest.raises(ValueError, match=message):
        resolve_cp_size(None, 8)


def test_setup_refuses_unknown_layout_and_a_check_count_instead_of_a_switch():
    with pytest.raises(ValueError, match="layout='diagonal' is not supported"):
        ContextParallelSetup(layout="diagonal")
    # check_batches was a number of batches; it is now on (every batch) or off
    with pytest.raises(TypeError, match="check_batches must be True .* or False, got 2"):
        ContextParallelSetup(check_batches=2)
    assert ContextParallelSetup().check_batches is True
