"""Config keys: an unknown key names the closest valid one and where they are all listed; --list-config lists
every key with its default, type and meaning."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest
from typer.testing import CliRunner

from cancermoe.cli.train import app as train_app
from cancermoe.config import CancerMoEConfig, config_listing, describe_keys, load_config, unknown_keys_problem
from cancermoe.errors import InputError
from server.cli import cli as server_cli
from server.config import FederationConfig, resolve_configs


@pytest.mark.bad_input
def test_a_misspelt_set_key_names_the_closest_key_and_the_listing() -> None:
    with pytest.raises(InputError) as caught:
        load_config(None, ["tokns=3"])
    assert str(caught.value) == ("--set: unknown config key 'tokns' (did you mean 'tokens'?); "
                                 "list them all with --list-config")


@pytest.mark.bad_input
def test_unknown_keys_without_a_close_one_still_say_how_to_list_them() -> None:
    assert unknown_keys_problem(["colour", "tokenz"], ["tokens", "lr"]) == (
        "unknown config keys 'colour', 'tokenz' (did you mean 'tokens'?); list them all with --list-config")


@pytest.mark.bad_input
def test_a_toml_file_key_is_named_with_the_file(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("batchsize = 8\n")
    with pytest.raises(InputError, match=r"c\.toml: unknown config key 'batchsize' \(did you mean 'batch_size'\?\)"):
        load_config(path)


@pytest.mark.bad_input
def test_the_server_suggests_federation_and_model_keys_alike() -> None:
    with pytest.raises(InputError) as caught:
        resolve_configs(None, ["local-epoch=2", "tokns=3"], {"rounds": 1, "min_sites": 1})
    assert str(caught.value) == ("--set: unknown config keys 'local_epoch' (did you mean 'local_epochs'?), "
                                 "'tokns' (did you mean 'tokens'?); list them all with --list-config")
    model, federation = resolve_configs(None, ["local-epochs=2", "tokens=3"], {"rounds": 1, "min_sites": 1})
    assert (federation.local_epochs, model.tokens) == (2, 3)


def test_every_key_is_described_with_its_default_and_comment() -> None:
    keys = {k.name: k for k in describe_keys(CancerMoEConfig)}
    assert list(keys) == [f.name for f in dataclasses.fields(CancerMoEConfig)]
    assert keys["tokens"].default == 3072 and keys["tokens"].kind == "int"
    assert keys["tokens"].comment == "N: WSI tokens per patient per step"
    assert keys["genomics_by_cancer"].comment.startswith("ours: each cancer's genes get token positions")
    assert keys["d_model"].comment == ""  # a section ruler above a field is not its comment
    federation = {k.name: k for k in describe_keys(FederationConfig)}
    assert federation["dp_clipping_norm"].comment.startswith("Central differential privacy")


def test_the_listing_reads_back_as_the_defaults() -> None:
    """One key a line, written as in a TOML file: the listing itself is a valid --config file of the defaults."""
    lines = config_listing(describe_keys(CancerMoEConfig))
    assert len(lines) == len(dataclasses.fields(CancerMoEConfig))
    assert tomllib.loads("\n".join(lines)) == CancerMoEConfig().to_dict()


@pytest.mark.parametrize(("app", "first_section"), [(train_app, "feature_dim = 1024"),
                                                    (server_cli, "# federation (cmoe-server only)")])
def test_list_config_needs_no_other_argument_and_exits_0(app, first_section) -> None:
    result = CliRunner().invoke(app, ["--list-config"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(first_section)
    assert any(line.startswith("tokens = 3072 ") and "# int: N: WSI tokens" in line for line in lines)
    assert any(line.startswith("validation_fraction = 0.0 ") for line in lines)
