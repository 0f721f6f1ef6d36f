"""Session fixture: the tiny source checkpoints of `sources.py`, built once."""

import pytest
import torch

from conversion.sources import CLASSES, DENSE_SOURCES, MOE_SOURCES, Source, build_model, save_source


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[str, Source]:
    root = tmp_path_factory.mktemp("sources")
    built = {}
    for seed, (name, (model_type, kwargs, layout, dtype, shard)) in enumerate(MOE_SOURCES.items()):
        model = build_model(model_type, seed, **kwargs)
        save_source(model, root / name, layout, dtype, shard)
        expected = root / f"{name}.expected-export"
        model.to(torch.bfloat16 if dtype == "bf16" else torch.float32).save_pretrained(expected)
        built[name] = Source(name, root / name, CLASSES[model_type][1], model_type, dtype, expected)
    for seed, (name, (model_type, kwargs, dtype, shard)) in enumerate(DENSE_SOURCES.items(), start=100):
        model = build_model(model_type, seed, **kwargs)
        save_source(model, root / name, "original", dtype, shard)
        built[name] = Source(name, root / name, CLASSES[model_type][1], model_type, dtype)
    return built
