"""Request settings: merge with the server default, validation, transport."""

from __future__ import annotations

import pytest

from vllm_promprune.settings import PruneSettings, parse_settings


def test_no_settings_means_no_pruning() -> None:
    assert parse_settings(None).keep is None
    assert parse_settings({}).keep is None
    assert not parse_settings(None).prunes(576)


def test_request_keys_override_server_default_key_by_key() -> None:
    default = {"keep": 64, "mu": 0.5}
    merged = parse_settings({"tau": 0.05}, default)
    assert (merged.keep, merged.options["mu"], merged.options["tau"]) == (64, 0.5, 0.05)
    assert parse_settings({"keep": 16}, default).keep == 16
    assert parse_settings({"keep": None}, default).keep is None  # a request can opt out


def test_switching_method_drops_the_default_methods_options() -> None:
    default = {"keep": 64, "method": "promprune", "mu": 0.5, "order": "selection"}
    switched = parse_settings({"method": "fps"}, default)
    assert (switched.keep, switched.method, switched.order, switched.options) == (64, "fps", "selection", {})
    same = parse_settings({"method": "promprune", "tau": 0.1}, default)
    assert (same.options["mu"], same.options["tau"]) == (0.5, 0.1)
    with pytest.raises(ValueError, match="promprune.mu"):
        parse_settings({"method": "fps", "mu": 0.5}, default)  # the request's own options still count


def test_family_option_defaults_apply_only_when_unset() -> None:
    assert parse_settings({"keep": 8}, option_defaults={"mu": 0.5744}).options["mu"] == 0.5744
    assert parse_settings({"keep": 8, "mu": 0.3}, option_defaults={"mu": 0.5744}).options["mu"] == 0.3
    # uniform has no mu: the family default is not forced on it
    assert parse_settings({"keep": 8, "method": "uniform"}, option_defaults={"mu": 0.5}).options == {}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"keep": 0}, "promprune.keep"),
        ({"keep": -1}, "promprune.keep"),
        ({"keep": 1.5}, "promprune.keep"),
        ({"keep": "64"}, "promprune.keep"),
        ({"keep": True}, "promprune.keep"),
        ({"keep": 8, "method": "magic"}, "promprune.method"),
        ({"keep": 8, "order": "random"}, "promprune.order"),
        ({"keep": 8, "mu": "high"}, "mu"),
        ({"keep": 8, "tau": 0}, "tau"),
        ({"keep": 8, "kr_min": 0.9, "kr_max": 0.1}, "kr_min"),
        ({"keep": 8, "bogus": 1}, "bogus"),
        ({"keep": 8, "method": "uniform", "mu": 0.4}, "mu"),
    ],
)
def test_bad_settings_name_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse_settings(raw)


def test_settings_must_be_an_object() -> None:
    with pytest.raises(ValueError, match="must be an object"):
        parse_settings(64)  # type: ignore[arg-type]


def test_tensor_round_trip_and_counts() -> None:
    settings = parse_settings({"keep": 64, "order": "selection", "mu": 0.3})
    assert PruneSettings.model_validate_json(bytes(settings.to_tensor().tolist())) == settings
    assert settings.kept_tokens(576) == 64
    assert settings.kept_tokens(40) == 40 and not settings.prunes(40)


def test_budget_lists_give_each_image_its_own_budget() -> None:
    from vllm_promprune.settings import parse_image_settings

    settings = parse_image_settings({"keep": [8, 64], "method": "fps"}, 2, default={"keep": 32})
    assert [(s.keep, s.method) for s in settings] == [(8, "fps"), (64, "fps")]
    assert [s.ratio for s in parse_image_settings({"ratio": [0.5, 0.25]}, 2)] == [0.5, 0.25]
    assert [s.keep for s in parse_image_settings(None, 3, default={"keep": 16})] == [16, 16, 16]


def test_budget_list_errors_name_the_field_and_the_image() -> None:
    from vllm_promprune.settings import parse_image_settings

    with pytest.raises(ValueError, match=r"promprune\.keep: a list needs one value per image.*got 1 values for 2"):
        parse_image_settings({"keep": [8]}, 2)
    with pytest.raises(ValueError, match=r"^image 1: .*promprune\.keep"):
        parse_image_settings({"keep": [8, 0]}, 2)
    with pytest.raises(ValueError, match=r"promprune\.method"):
        parse_image_settings({"keep": [8, 9], "method": [1]}, 2)


def test_select_images_cuts_lists_to_the_missing_images() -> None:
    from vllm_promprune.settings import select_images

    raw = {"keep": [8, 16, 32], "method": "fps", "ratio": None}
    assert select_images(raw, [0, 2]) == {"keep": [8, 32], "method": "fps", "ratio": None}


def test_request_budget_replaces_the_default_budget_of_either_kind() -> None:
    assert parse_settings({"ratio": 0.25}, {"keep": 64}).keep is None
    assert parse_settings({"ratio": 0.25}, {"keep": 64}).ratio == 0.25
    assert parse_settings({"keep": 8}, {"ratio": 0.5, "mu": 0.3}).ratio is None
    assert parse_settings({"keep": 8}, {"ratio": 0.5, "mu": 0.3}).options["mu"] == 0.3
    with pytest.raises(ValueError, match="either keep or ratio"):
        parse_settings({"keep": 8, "ratio": 0.5})
