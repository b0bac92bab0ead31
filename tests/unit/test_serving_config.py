"""Settings, the model catalog and the hardware profiles: validated at start-up, errors name the field."""

from __future__ import annotations

import datetime as dt
from fractions import Fraction

import pytest

from core.settings import SettingsError
from hardware_profiles import load_profiles
from hardware_profiles.loader import ProfileError
from models.catalog import CatalogError, parse_catalog
from serving.app import deployment_options
from serving.config import Settings

TINY = {"id": "org/m", "task": "text-classification", "source": {"path": "m"}}


def test_default_catalog_and_profiles_validate():
    catalog, profiles = Settings.load({}, env={}).validated()
    assert [m.id for m in catalog.models] == [
        "local/tiny-flux",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "sentence-transformers/all-MiniLM-L6-v2",
        "local/tiny-sentiment",
    ]
    assert {"cpu-basic", "nvidia-h100", "nvidia-a10g", "nvidia-l4", "nvidia-t4", "nvidia-b200"} <= set(
        profiles.names()
    )


def test_profile_prices_are_exact_and_dated():
    profiles = load_profiles()
    h100 = profiles.get("nvidia-h100")
    assert h100.price_at(dt.date(2026, 1, 1)).usd_per_second_exact == Fraction(45, 36000)  # 4.50 $/h
    assert h100.ray_actor_options() == {"num_cpus": 23, "num_gpus": 1, "accelerator_type": "H100"}
    cpu = profiles.get("cpu-basic")
    assert "num_gpus" not in cpu.ray_actor_options() and "accelerator_type" not in cpu.ray_actor_options()
    with pytest.raises(LookupError, match="no price in force"):
        cpu.price_at(dt.date(2000, 1, 1))


def test_cpu_replicas_and_the_router_keep_off_the_profiles_gpu_nodes():
    settings = Settings.load({}, env={})
    profiles = settings.profile_catalog()
    types = profiles.gpu_types()
    assert {"H100", "L4", "A10G", "T4"} <= set(types)
    off = {"ray.io/accelerator-type": f"!in({','.join(types)})"}
    # By default a preference: one GPU machine that runs everything must still place them.
    cpu = settings.actor_options(profiles, "cpu-basic")
    assert cpu == {"num_cpus": 1, "label_selector": off, "fallback_strategy": [{"label_selector": {}}]}
    router = settings.actor_options(profiles, None)
    assert router == {
        "num_cpus": settings.ingress_num_cpus,
        **{k: cpu[k] for k in ("label_selector", "fallback_strategy")},
    }
    # A GPU profile's replicas go where their GPU is, with no selector.
    assert settings.actor_options(profiles, "nvidia-l4") == {
        "num_cpus": 8,
        "num_gpus": 1,
        "accelerator_type": "L4",
    }
    strict = Settings.load({"cpu_replicas_on_gpu_nodes": "never"}, env={})
    assert strict.actor_options(profiles, "cpu-basic") == {"num_cpus": 1, "label_selector": off}
    with pytest.raises(SettingsError, match="cpu_replicas_on_gpu_nodes"):
        Settings.load({"cpu_replicas_on_gpu_nodes": "sometimes"}, env={})


def test_a_catalog_without_gpu_profiles_adds_no_selector():
    profiles = load_profiles(extra=[])
    only_cpu = type(profiles)(profiles={"cpu-basic": profiles.get("cpu-basic")})
    assert only_cpu.gpu_types() == []
    assert only_cpu.ray_actor_options("cpu-basic", strict_cpu_placement=True) == {"num_cpus": 1}


def test_an_inline_profile_with_a_float_price_stays_exact():
    profiles = load_profiles(
        extra=[
            {
                "name": "gpu-x",
                "accelerator": {"type": "L4", "count": 0.5},
                "prices": [{"effective_from": "2026-01-01", "usd_per_hour": 0.1}],
            }
        ]
    )
    assert profiles.get("gpu-x").prices[0].usd_per_second_exact == Fraction(1, 36000)


@pytest.mark.parametrize(
    ("profile", "match"),
    [
        ({"name": "x", "prices": []}, "prices"),
        ({"name": "x", "prices": [{"effective_from": "2026-01-01"}]}, "exactly one of"),
        (
            {
                "name": "x",
                "accelerator": {"count": 1},
                "prices": [{"effective_from": "2026-01-01", "usd_per_hour": 1}],
            },
            "accelerator.type",
        ),
        ({"name": "Bad Name", "prices": [{"effective_from": "2026-01-01", "usd_per_hour": 1}]}, "name"),
        ({"name": "x", "cpus": -1, "prices": [{"effective_from": "2026-01-01", "usd_per_hour": 1}]}, "cpus"),
    ],
)
def test_bad_profiles_name_the_field(profile, match):
    with pytest.raises(ProfileError, match=match):
        load_profiles(extra=[profile])


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({**TINY, "source": {}}, r"models\[org/m\]\.source"),
        ({**TINY, "source": {"path": "a", "repo_id": "b/c"}}, "exactly one of"),
        ({**TINY, "replicas": -1}, r"models\[org/m\]\.replicas"),
        ({**TINY, "dtype": "int3"}, r"models\[org/m\]\.dtype"),
        ({**TINY, "autoscaling": {"min_replicas": 3, "max_replicas": 1}}, "max_replicas"),
        ({**TINY, "limits": {"max_pixels": 0}}, r"limits\.max_pixels"),
        ({**TINY, "colour": "blue"}, r"models\[org/m\]\.colour"),
        ({**TINY, "id": "has spaces"}, r"\.id"),
    ],
)
def test_bad_catalog_entries_name_the_field(entry, match):
    with pytest.raises(CatalogError, match=match):
        parse_catalog([entry])


def test_duplicate_models_and_unknown_profiles_are_refused():
    with pytest.raises(CatalogError, match="listed twice"):
        parse_catalog([TINY, {**TINY, "id": "ORG/M"}])
    with pytest.raises(SettingsError, match=r"models\[org/m\]\.hardware_profile: unknown profile 'gpu-nope'"):
        Settings.load({"models": [{**TINY, "hardware_profile": "gpu-nope"}]}, env={}).validated()


def test_settings_from_environment_and_args():
    env = {
        "HFI_PORT": "9000",
        "HFI_DATABASE_URL": "postgresql+psycopg://u:secret@db/x",
        "HF_TOKEN": "hf_x",
        "HF_HUB_OFFLINE": "1",
    }
    s = Settings.load({"host": "0.0.0.0"}, env=env)
    assert (s.port, s.host, s.offline, s.hf_token) == (9000, "0.0.0.0", True, "hf_x")
    assert s.metering.database_url.endswith("@db/x")
    args = s.replica_args()  # what goes into Serve deployment args: no secrets from the environment
    assert "hf_token" not in args and "database_url" not in args["metering"] and args["host"] == "0.0.0.0"
    with pytest.raises(SettingsError, match="settings: field port"):
        Settings.load({"port": "nope"}, env={})
    with pytest.raises(SettingsError, match="settings: field wat"):
        Settings.load({"wat": 1}, env={})


def test_settings_file(tmp_path):
    f = tmp_path / "hfi.yaml"
    f.write_text("port: 8123\nmodels:\n  - {id: org/m, task: text-classification, source: {path: m}}\n")
    s = Settings.load({}, env={"HFI_CONFIG": str(f)})
    assert s.port == 8123 and [m.id for m in s.catalog().models] == ["org/m"]


def test_deployment_options_from_profile_and_catalog():
    catalog, profiles = Settings.load(
        {
            "models": [
                {**TINY, "hardware_profile": "nvidia-l4", "max_ongoing_requests": 4},
                {
                    **TINY,
                    "id": "org/a",
                    "autoscaling": {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 2},
                },
            ]
        },
        env={},
    ).validated()
    fixed = deployment_options(catalog.models[0], profiles.get("nvidia-l4"))
    assert fixed["ray_actor_options"] == {"num_cpus": 8, "num_gpus": 1, "accelerator_type": "L4"}
    assert (
        fixed["num_replicas"] == 1 and fixed["max_ongoing_requests"] == 4 and fixed["name"] == "model-org--m"
    )
    auto = deployment_options(catalog.models[1], profiles.get("cpu-basic"))
    # min_replicas 0 scales to zero after the default idle timeout (300 s): Serve's window plus its delay.
    assert auto["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 3,
        "target_ongoing_requests": 2,
        "look_back_period_s": 30.0,
        "downscale_to_zero_delay_s": 270.0,
        "metrics_interval_s": 10.0,
    }
    assert "num_replicas" not in auto
