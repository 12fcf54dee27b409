"""Issue 17, item 1: each worker measures what a request costs its model (memory and time per step, as a function of
width, height and images) when the model loads, knows the memory it may use, and refuses up front (413) a request
that cannot fit, naming the largest size that does. Pure ``bento.budget`` decisions, then through HTTP."""

from __future__ import annotations

import math
from typing import Any, Iterator

import pytest
from serve_support import Champion, promote, wait_for
from test_serve import TINY, _client, _env, champ  # noqa: F401 - the shared fixtures (used by name)

from bento.budget import MIB, SAFETY, Budget, CostModel, TooLarge, budget_for, fit


def _samples(a: float, b: float, sizes: tuple[int, ...] = (256, 512)) -> list[dict[str, float]]:
    out = []
    for side in sizes:
        t = (side // 8) ** 2
        out.append({"width": side, "height": side, "tokens": t, "bytes": a * t + b * t * t,
                    "seconds_per_step": 1e-4 * t})
    return out


def test_fit_recovers_a_quadratic_cost_and_never_a_negative_one() -> None:
    model = fit(_samples(1000.0, 50.0))
    assert model.a == pytest.approx(1000.0) and model.b == pytest.approx(50.0)
    assert model.sa == pytest.approx(1e-4) and model.sb == pytest.approx(0.0, abs=1e-12)
    # 768 px is 2.25x the pixels of 512 and, by the square term, about 5x the memory: a linear guess would say 2.25x
    assert model.bytes_for(768, 768, 1) / model.bytes_for(512, 512, 1) > 4.5
    assert model.bytes_for(512, 512, 3) == pytest.approx(3 * model.bytes_for(512, 512, 1))
    shrinking = fit([{"tokens": 100, "bytes": 1e6, "seconds_per_step": 0.1},
                     {"tokens": 400, "bytes": 2e6, "seconds_per_step": 0.1}])  # noise: bigger cost less per token
    assert shrinking.a >= 0 and shrinking.b >= 0 and shrinking.bytes_for(1024, 1024, 1) > 0


def test_a_request_that_does_not_fit_names_the_largest_size_and_images_that_do() -> None:
    model = fit(_samples(1000.0, 50.0))
    resident = 1000 * MIB
    room = model.bytes_for(512, 512, 1) * 1.01
    budget = Budget(resident + room, "SDLOOP_MEMORY_MB", model)
    sides = (64, 2048, 64)
    budget.check(512, 512, 1, resident, sides)  # fits
    with pytest.raises(TooLarge) as e:
        budget.check(1024, 1024, 1, resident, sides)
    assert "the largest that fits now: 512x512" in str(e.value) and "1024x1024 x 1 image(s)" in str(e.value)
    with pytest.raises(TooLarge) as e:  # the aspect is kept
        budget.check(1024, 512, 1, resident, sides)
    w, h = map(int, str(e.value).split("the largest that fits now: ")[1].split()[0].split("x"))
    # the next height on the grid does not fit
    assert w == 2 * h and model.bytes_for(w, h, 1) <= room < model.bytes_for(w + 128, h + 64, 1)
    with pytest.raises(TooLarge) as e:  # fewer images at the asked size fit too
        budget.check(256, 256, 16, resident, sides)
    most = int(str(e.value).split(", or ")[1].split()[0])
    assert model.bytes_for(256, 256, most) <= room < model.bytes_for(256, 256, most + 1)
    with pytest.raises(TooLarge, match="nothing fits now"):  # the worker already holds its whole budget
        budget.check(512, 512, 1, resident + room, sides)
    Budget(resident, "no model measured yet").check(4096, 4096, 64, resident, sides)  # never refused by guess


def test_the_default_budget_is_a_share_of_the_host_per_worker() -> None:
    limit, source = budget_for(0, 0.5, 4)
    import os

    assert 0 < limit <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 8 + 1
    assert "0.5" in source and "4 worker" in source
    assert budget_for(3000, 0.5, 4) == (3000 * MIB, "SDLOOP_MEMORY_MB")


@pytest.fixture()
def promoted(champ: Champion) -> Champion:  # noqa: F811
    from sdloop.champion import current_champion_tag

    if current_champion_tag() is None:
        promote(champ, champ.tags[0])
    return champ


def _serve() -> Any:
    c = _client()
    c.__enter__()
    wait_for(lambda: c.get("/readyz").status_code == 200)
    return c


def test_the_worker_measures_its_model_and_refuses_what_cannot_fit_with_413(
        promoted: Champion, monkeypatch: pytest.MonkeyPatch) -> None:
    c = _serve()
    try:
        info = c.get("/info").json()
    finally:
        c.__exit__(None, None, None)
    budget = info["budget"]
    assert budget["source"].startswith("SDLOOP_MEMORY_SHARE") and budget["memory_limit_mib"] > 0
    samples = budget["cost_model"]["samples"]
    assert [(s["width"], s["height"]) for s in samples][:2] == [(32, 32), (64, 64)]  # half, whole native side
    assert all(s["bytes"] >= 0 and s["seconds_per_step"] > 0 for s in samples)
    model = CostModel(*(budget["cost_model"][k] for k in ("a", "b", "sa", "sb")))
    native_need = model.bytes_for(64, 64, 1)
    # a budget with room for about 4 native images above what the worker holds: 256x256 x 4 cannot fit
    limit_mib = math.ceil((budget["resident_mib"] * MIB + 4 * native_need) / MIB) + 64
    monkeypatch.setenv("SDLOOP_MEMORY_MB", str(limit_mib))
    monkeypatch.setenv("SDLOOP_MAX_IMAGES", "4")
    c = _serve()
    try:
        info = c.get("/info").json()["budget"]
        assert info["source"] == "SDLOOP_MEMORY_MB" and info["memory_limit_mib"] == limit_mib
        model = CostModel(*(info["cost_model"][k] for k in ("a", "b", "sa", "sb")))
        big = {**TINY, "width": 256, "height": 256, "num_images": 4}
        need = model.bytes_for(256, 256, 4) / MIB
        if need <= limit_mib - info["resident_mib"]:
            pytest.fail(f"the measured model predicts {need:.0f} MiB for 256x256 x 4, which fits the test's budget: "
                        "the test needs a larger request")
        from bento.runtime import STEPS

        steps = STEPS._value.get()
        r = c.post("/txt2img_json", json=big)
        assert r.status_code == 413, r.text
        body = r.json()
        assert body["status"] == "too_large" and "SDLOOP_MEMORY_MB" in body["error"]
        assert STEPS._value.get() == steps, "refused before any step"
        hint = body["error"].split("the largest that fits now: ")[1].split(",")[0]
        w, h = map(int, hint.split()[0].split("x"))
        assert w == h and w < 256 and w % 8 == 0
        r = c.post("/txt2img_json", json={**big, "width": w, "height": h})  # the size it named is served
        assert r.status_code == 200, r.text
        assert c.post("/txt2img_json", json=TINY).status_code == 200
        from bento.runtime import ERRORS

        assert ERRORS.labels(endpoint="txt2img_json", reason="too_large")._value.get() >= 1
    finally:
        c.__exit__(None, None, None)


def test_a_size_outside_the_models_limits_is_still_a_400_not_a_413(promoted: Champion) -> None:
    c = _serve()
    try:
        r = c.post("/txt2img_json", json={**TINY, "width": 1024, "height": 1024})
        assert r.status_code == 400 and r.json()["status"] == "invalid", r.text
    finally:
        c.__exit__(None, None, None)


def test_the_budget_settings_are_checked_in_one_line() -> None:
    from bento.config import ServeConfig
    from sdloop.configfile import ConfigError

    for env, value in (("SDLOOP_MEMORY_MB", "-1"), ("SDLOOP_MEMORY_SHARE", "0"), ("SDLOOP_MEMORY_SHARE", "1.5"),
                       ("SDLOOP_MMAP_THRESHOLD_KIB", "-4"), ("SDLOOP_MEMORY_MB", "lots")):
        with pytest.raises(ConfigError) as e:
            ServeConfig.from_env({env: value})
        assert str(e.value).startswith(f"{env}=") and "\n" not in str(e.value)
    cfg = ServeConfig.from_env({"SDLOOP_MEMORY_MB": "2048", "SDLOOP_MMAP_THRESHOLD_KIB": "0"})
    assert (cfg.memory_mb, cfg.mmap_threshold_kib, cfg.memory_share) == (2048, 0, 0.8)
