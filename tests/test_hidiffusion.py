"""HiDiffusion (RAU-Net + MSW-MSA): tensor-level properties (spec shared/reference/hidiffusion.md
§8.1) and the node's hook objects driven with plain tensors and dicts shaped like ComfyUI's.
No ComfyUI needed; the model-level checks live in tests/tiny_unet_hidiffusion_check.py."""
import importlib.util
import itertools
import math
import pathlib
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_pack():
    name = "infdit_pack_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


PACK = _load_pack()
node = sys.modules[PACK.__name__ + ".nodes.hidiffusion"]
hd = node.hd


# --------------------------------------------------------------------------------------------
# Independent references


def multihead(q, k, v, heads, mask=None):
    """Plain multi-head attention on B x N x (heads*d); mask is a boolean N x N 'may attend'."""
    b, n, c = q.shape
    split = [t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v)]
    scores = split[0] @ split[1].transpose(-1, -2) / math.sqrt(c // heads)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ split[2]).transpose(1, 2).reshape(b, -1, c)


def masked_window_reference(q, k, v, heads, height, width, shift, grid=(2, 2)):
    """Full attention where a token only sees tokens of its own window on the rolled grid."""
    wh, ww = -(-height // grid[0]), -(-width // grid[1])
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    # Token (r, c) sits at ((r - s_h) mod H, (c - s_w) mod W) after rolling by -shift.
    window = ((rows - shift[0]) % height // wh) * grid[1] + (cols - shift[1]) % width // ww
    return multihead(q, k, v, heads, mask=window[:, None] == window[None, :])


def attend(heads):
    return lambda q, k, v: multihead(q, k, v, heads)


def discrete_sigmas():
    """SD/SDXL training sigmas (scaled-linear betas 0.00085..0.012 over 1000 steps), ascending."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alphas = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - alphas) / alphas)


def _sigma_at_timestep(table, t):
    return float(np.exp(np.interp(t, np.arange(len(table)), np.log(table))))


def _beta_ppf(p, a=0.6):
    """Inverse CDF of Beta(a, a) by numeric integration; x = sin^2(phi) removes the end singularities."""
    phi = np.linspace(0.0, np.pi / 2, 200001)
    density = (np.sin(phi) * np.cos(phi)) ** (2 * a - 1)
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2)])
    return np.sin(np.interp(p, cdf / cdf[-1], phi)) ** 2


def scheduler_sigmas(name, n):
    """A sample_sigmas tensor (n steps, final value included) shaped like each core scheduler's."""
    table = discrete_sigmas()
    lo, hi = float(table[0]), float(table[-1])
    if name in ("normal", "sgm_uniform"):
        ts = np.linspace(999, 0, n + 1)[:-1] if name == "sgm_uniform" else np.linspace(999, 0, n)
        sig = [_sigma_at_timestep(table, t) for t in ts]
    elif name == "simple":
        stride = len(table) / n
        sig = [float(table[-(1 + int(i * stride))]) for i in range(n)]
    elif name == "ddim_uniform":
        sig = [float(table[t]) for t in range(1, 1000, max(1, 1000 // n))][::-1][:n]
    elif name == "karras":
        ramp = np.linspace(0, 1, n)
        sig = list((hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7)
    elif name == "exponential":
        sig = list(np.exp(np.linspace(math.log(hi), math.log(lo), n)))
    elif name == "beta":
        ts = np.rint(_beta_ppf(1 - np.linspace(0, 1, n, endpoint=False)) * 999).astype(int)
        sig = [float(table[t]) for t in dict.fromkeys(ts)]  # repeated timesteps collapse
    elif name == "linear_quadratic":
        half = n // 2
        linear = [0.025 * i / max(half, 1) for i in range(half)]
        quadratic = list(0.025 + 0.975 * np.linspace(0.0, 1.0, n - half + 1)[1:] ** 2)
        sig = [hi * (1.0 - x) for x in linear + quadratic][:n]
    elif name == "kl_optimal":
        sig = list(np.tan(np.linspace(math.atan(hi), math.atan(lo), n)))
    else:
        raise KeyError(name)
    return torch.tensor(sig + [0.0], dtype=torch.float32)


SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta",
              "linear_quadratic", "kl_optimal")


def official_sets(name, n):
    """Active step sets written out from the official thresholds (spec §4.3)."""
    t = lambda r: int(n * r)  # noqa: E731 - the official expression, on purpose
    steps = range(n)
    rad, pool = {
        "sd_2x": (lambda i: i < t(0.4), lambda i: False),
        "sd_4x": (lambda i: i < t(0.7), lambda i: i < t(0.3)),
        "sdxl_2x_aggressive": (lambda i: i < t(8 / 50), lambda i: t(8 / 50) <= i < t(0.4)),
        "sdxl_2x": (lambda i: False, lambda i: i < t(0.4)),
        "sdxl_4x": (lambda i: i < t(0.3), lambda i: i < t(0.7)),
    }[name]
    return {i for i in steps if rad(i)}, {i for i in steps if pool(i)}


# --------------------------------------------------------------------------------------------
# 8.1.1 - 8.1.6 MSW-MSA


@pytest.mark.parametrize("height,width", [(h, w) for h in range(1, 8) for w in range(1, 8)] + [(33, 17), (64, 64), (17, 40)])
def test_partition_merge_is_identity_for_any_size_and_shift(height, width):
    x = torch.randn(2, height * width, 3)
    shifts = {(0, 0), (height - 1, 1), (1, width - 1), (height + 2, -3)}
    shifts |= {hd.shift_for(height, width, k) for k in range(4)}
    for shift in shifts:
        parts = hd.window_partition(x, height, width, shift)
        assert sum(p.shape[0] for p, _ in parts) == 2 * len(list(itertools.chain(*(s for _, s in parts))))
        assert torch.equal(hd.window_merge(parts, 2, height, width, shift), x)


def test_uneven_grid_gives_up_to_four_window_shapes():
    parts = hd.window_partition(torch.randn(1, 7 * 5, 2), 7, 5, (0, 0))
    assert sorted(p.shape[1] for p, _ in parts) == [3 * 2, 4 * 2, 3 * 3, 4 * 3]  # rows 4 + 3, columns 3 + 2
    parts = hd.window_partition(torch.randn(1, 8 * 6, 2), 8, 6, (2, 1))
    assert [p.shape for p, _ in parts] == [torch.Size([4, 12, 2])]  # even grid: one batched group


@pytest.mark.parametrize("height,width", [(1, 1), (1, 6), (5, 7), (8, 8), (9, 4), (33, 17)])
def test_one_window_grid_equals_full_attention_for_any_shift(height, width):
    q, k, v = (torch.randn(2, height * width, 8, dtype=torch.float64) for _ in range(3))
    full = multihead(q, k, v, 2)
    for shift in [(0, 0), (height // 3, width // 2), (height - 1, 1)]:
        out = hd.windowed_attention(q, k, v, height, width, shift, attend(2), grid=(1, 1))
        torch.testing.assert_close(out, full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("height,width", [(1, 6), (6, 1), (2, 2), (5, 7), (8, 8), (9, 4), (33, 17), (16, 10)])
def test_windowed_attention_equals_masked_full_attention(height, width):
    q, k, v = (torch.randn(2, height * width, 8, dtype=torch.float64) for _ in range(3))
    for kdraw in range(4):
        shift = hd.shift_for(height, width, kdraw)
        out = hd.windowed_attention(q, k, v, height, width, shift, attend(2))
        ref = masked_window_reference(q, k, v, 2, height, width, shift)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # A shift that does not come from the table (wrap-around in both axes) is still exact.
    out = hd.windowed_attention(q, k, v, height, width, (height - 1, width - 1), attend(2))
    torch.testing.assert_close(out, masked_window_reference(q, k, v, 2, height, width, (height - 1, width - 1)), rtol=0, atol=1e-12)


def test_perturbing_one_window_changes_only_that_window():
    height, width, shift = 7, 10, (2, 3)
    q, k, v = (torch.randn(1, height * width, 4, dtype=torch.float64) for _ in range(3))
    base = hd.windowed_attention(q, k, v, height, width, shift, attend(1))
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    # Bottom-right window of the rolled grid (rows 4..6, cols 5..9 after rolling).
    inside = ((rows - shift[0]) % height >= 4) & ((cols - shift[1]) % width >= 5)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[0, inside] += torch.randn(int(inside.sum()), 4, dtype=torch.float64)
    out = hd.windowed_attention(q2, k2, v2, height, width, shift, attend(1))
    assert torch.equal(out[0, ~inside], base[0, ~inside])
    assert (out[0, inside] - base[0, inside]).abs().amax(-1).min() > 0


@pytest.mark.parametrize("side,window,shifts", [(128, 64, [0, 16, 32, 48]), (64, 32, [0, 8, 16, 24]), (33, 17, [0, 4, 8, 12])])
def test_shift_table(side, window, shifts):
    assert hd.window_size(side, side) == (window, window)
    assert [hd.shift_for(side, side, k) for k in range(4)] == [(s, s) for s in shifts]
    assert hd.shift_for(side, 5, 3) == (shifts[3], 0)  # axes are independent (5 -> window 3 -> no shift)


def test_shift_draws_are_deterministic_cover_all_shifts_and_leave_global_rng_alone():
    state = torch.get_rng_state()
    draws = [hd.shift_index(0, step, ("input", 4), 1) for step in range(200)]
    assert torch.equal(torch.get_rng_state(), state)
    assert draws == [hd.shift_index(0, step, ("input", 4), 1) for step in range(200)]
    assert set(draws) == {0, 1, 2, 3}
    assert max(np.bincount(draws)) < 80  # roughly uniform
    # Different blocks, block indices and seeds draw independently.
    others = [[hd.shift_index(s, step, b, i) for step in range(200)]
              for s, b, i in [(0, ("input", 4), 0), (0, ("output", 4), 1), (1, ("input", 4), 1)]]
    assert all(o != draws for o in others)


# --------------------------------------------------------------------------------------------
# 8.1.7 - 8.1.8 RAU-Net operators


def test_rad_subsample_turns_the_downsample_into_the_dilated_stride4_conv():
    weight, bias = torch.randn(3, 2, 3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    for height in range(1, 71):
        width = [1, 2, 5, 8, 13, 40][height % 6]
        x = torch.randn(1, 2, height, width, dtype=torch.float64)
        official = F.conv2d(x, weight, bias, stride=4, padding=2, dilation=2)
        ours = F.conv2d(hd.rad_subsample(x), weight, bias, stride=2, padding=1)
        assert ours.shape[-2:] == (math.ceil(height / 4), math.ceil(width / 4))
        torch.testing.assert_close(ours, official, rtol=0, atol=1e-12)


def test_pool_is_ceil_mode_mean_of_existing_cells_and_unpool_restores_exact_size():
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    pooled = hd.pool(x)
    assert pooled.shape[-2:] == (3, 4)
    for i, j in itertools.product(range(3), range(4)):
        torch.testing.assert_close(pooled[:, :, i, j], x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((-2, -1)))
    for height, width in [(1, 1), (17, 23), (64, 64), (65, 129), (8, 200)]:
        y = torch.randn(1, 2, height, width)
        assert hd.pool(y).shape[-2:] == (math.ceil(height / 2), math.ceil(width / 2))
        assert hd.unpool(hd.pool(y), (height, width)).shape == y.shape


# --------------------------------------------------------------------------------------------
# 8.1.9 - 8.1.10 schedule and presets


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_step_resolver_matches_official_step_sets_for_every_scheduler(scheduler):
    for n in range(1, 61):
        sigmas = scheduler_sigmas(scheduler, n)
        executed = len(sigmas) - 1
        resolved = [hd.resolve_step(sigmas, sigmas[i]) for i in range(executed)]
        assert resolved == [(i, executed) for i in range(executed)], (scheduler, n)
        for name, schedule in hd.SCHEDULES.items():
            phases = [schedule.phases_at_step(*pos) for pos in resolved]
            rad, pool = official_sets(name, executed)
            assert {i for i, p in enumerate(phases) if p.rad} == rad, (scheduler, n, name)
            assert {i for i, p in enumerate(phases) if p.pool} == pool, (scheduler, n, name)


def test_intermediate_and_corrector_evaluations_map_to_their_steps():
    sigmas = scheduler_sigmas("karras", 10)
    for i in range(9):
        midpoint = math.sqrt(float(sigmas[i]) * float(sigmas[i + 1]))  # dpm_2 / dpmpp_sde half step
        assert hd.resolve_step(sigmas, midpoint) == (i, 10)
        assert hd.resolve_step(sigmas, sigmas[i + 1]) == (i + 1, 10)  # Heun's corrector: next step
    assert hd.resolve_step(sigmas, 0.0) == (9, 10)
    assert hd.resolve_step(sigmas, float(sigmas[0]) * 2) == (0, 10)
    # Per-batch sigmas (cond and uncond) and denoise < 1 (a truncated schedule) resolve the same way.
    assert hd.resolve_step(sigmas[4:], hd.current_sigma(sigmas[5].repeat(2))) == (1, 6)


def test_resolver_refuses_missing_or_non_monotone_schedules():
    assert hd.resolve_step(None, 1.0) is None
    assert hd.resolve_step(torch.tensor([1.0]), 1.0) is None
    assert hd.resolve_step(torch.tensor([14.6, 2.0, 5.0, 0.0]), 2.0) is None  # restart sampling


def test_official_thresholds_and_float_quirk():
    assert hd.step_threshold(90, 0.7) == 62  # 90 * 0.7 == 62.999..., kept as the official code has it
    walk = {20: ({0, 1, 2}, set(range(3, 8))), 25: (set(range(4)), set(range(4, 10))),
            30: (set(range(4)), set(range(4, 12))), 50: (set(range(8)), set(range(8, 20)))}
    schedule = hd.SCHEDULES["sdxl_2x_aggressive"]
    for n, (rad, pool) in walk.items():
        phases = [schedule.phases_at_step(i, n) for i in range(n)]
        assert ({i for i, p in enumerate(phases) if p.rad}, {i for i, p in enumerate(phases) if p.pool}) == (rad, pool)
    phases = [hd.SCHEDULES["sdxl_4x"].phases_at_step(i, 50) for i in range(50)]
    assert {i for i, p in enumerate(phases) if p.rad} == set(range(15))
    assert {i for i, p in enumerate(phases) if p.pool} == set(range(35))


@pytest.mark.parametrize("arch,h,w,preset,aggressive,expected", [
    ("sdxl", 256, 256, "official", True, "sdxl_2x_aggressive"),
    ("sdxl", 511, 2000, "official", True, "sdxl_2x_aggressive"),
    ("sdxl", 512, 512, "official", True, "sdxl_4x"),
    ("sdxl", 512, 1024, "official", True, "sdxl_4x"),
    ("sdxl", 1024, 511, "official", True, "sdxl_2x_aggressive"),
    ("sdxl", 64, 64, "official", True, "sdxl_2x_aggressive"),  # official applies it below native too
    ("sdxl", 256, 256, "official", False, "sdxl_2x"),
    ("sdxl", 161, 100, "conservative", True, "sdxl_2x"),
    ("sdxl", 160, 160, "conservative", True, None),
    ("sdxl", 512, 512, "conservative", True, "sdxl_4x"),
    ("sd", 255, 400, "official", True, "sd_2x"),
    ("sd", 256, 256, "official", True, "sd_4x"),
    ("sd", 80, 80, "conservative", True, None),
    ("sd", 81, 40, "conservative", True, "sd_2x"),
])
def test_preset_table(arch, h, w, preset, aggressive, expected):
    native = hd.NATIVE_LATENT[arch]
    schedule = hd.select_schedule(arch, h, w, native, preset, aggressive)
    assert (schedule.name if schedule else None) == expected


def test_preset_uses_native_size_and_rejects_unknown_values():
    assert hd.select_schedule("sdxl", 64, 64, 16).name == "sdxl_4x"  # 4 x native 16
    assert hd.select_schedule("sd", 383, 400, 96).name == "sd_2x"  # SD 2.x 768-v
    with pytest.raises(ValueError):
        hd.select_schedule("sdxl", 64, 64, 128, "fast")
    with pytest.raises(ValueError):
        hd.select_schedule("flux", 64, 64, 128)


def test_percent_fallback_follows_the_sigma_boundaries():
    sigma_at = {r: 10.0 * (1 - r) for r in hd.schedule_ratios()}  # a linear stand-in for percent_to_sigma
    sigma_at[0.0] = 1e9
    schedule = hd.SCHEDULES["sdxl_2x_aggressive"]
    assert schedule.phases_at_sigma(9.0, sigma_at) == hd.Phases(rad=True)
    assert schedule.phases_at_sigma(7.0, sigma_at) == hd.Phases(pool=True)
    assert schedule.phases_at_sigma(6.0, sigma_at) == hd.Phases()


# --------------------------------------------------------------------------------------------
# Hooks, driven like ComfyUI drives them


def transformer_options(block, latent_hw, step, n_steps=20, batch=2, with_schedule=True):
    sigmas = scheduler_sigmas("karras", n_steps)
    options = {
        "block": block,
        "original_shape": [batch, 4, *latent_hw],
        "sigmas": sigmas[step].repeat(batch),
        "cond_or_uncond": [0, 1][:batch],
    }
    if with_schedule:
        options["sample_sigmas"] = sigmas
    return options


def sdxl_hooks(native=128, preset="official", sigma_at=None):
    settings = dict(layout=node.LAYOUTS["sdxl"], native=native, preset=preset, sigma_at=sigma_at)
    return node.PoolPatch(**settings), node.RadPatch(**settings), node.UnpoolPatch(**settings)


def test_block_hooks_act_only_at_their_block_and_inside_their_phase():
    pool, rad, unpool = sdxl_hooks()
    h = torch.randn(2, 8, 128, 96)
    # SDXL 2048-class latent, 20 steps, aggressive: RAD steps 0-2, pool steps 3-7.
    assert rad(h, transformer_options(("input", 5), (256, 192), 0)).shape[-2:] == (64, 48)
    assert rad(h, transformer_options(("input", 5), (256, 192), 3)) is h
    assert rad(h, transformer_options(("input", 4), (256, 192), 0)) is h
    assert pool(h, transformer_options(("input", 4), (256, 192), 3)).shape[-2:] == (64, 48)
    assert pool(h, transformer_options(("input", 4), (256, 192), 2)) is h
    assert pool(h, transformer_options(("input", 4), (256, 192), 8)) is h
    assert pool(h, transformer_options(("input", 1), (256, 192), 3)) is h
    small, skip = torch.randn(2, 8, 33, 17), torch.randn(2, 4, 65, 33)
    out, hsp = unpool(small, skip, transformer_options(("output", 5), (256, 192), 5))
    assert out.shape[-2:] == (65, 33) and hsp is skip
    assert unpool(small, skip, transformer_options(("output", 4), (256, 192), 5))[0] is small
    same = torch.randn(2, 8, 65, 33)
    assert unpool(same, skip, transformer_options(("output", 5), (256, 192), 5))[0] is same


def test_block_hooks_fall_back_to_sigma_timing_without_sample_sigmas():
    sigmas = scheduler_sigmas("karras", 20)
    sigma_at = {r: float(sigmas[int(20 * r)]) if r < 1 else 0.0 for r in hd.schedule_ratios()}
    sigma_at[0.0] = 1e9
    pool, rad, _ = sdxl_hooks(sigma_at=sigma_at)
    h = torch.randn(1, 2, 128, 128)
    assert rad(h, transformer_options(("input", 5), (256, 256), 0, with_schedule=False)) is not h
    assert pool(h, transformer_options(("input", 4), (256, 256), 3, with_schedule=False)) is not h
    assert pool(h, transformer_options(("input", 4), (256, 256), 8, with_schedule=False)) is h
    no_fallback, _, _ = sdxl_hooks()
    assert no_fallback(h, transformer_options(("input", 4), (256, 256), 3, with_schedule=False)) is h


def skeleton_sdxl_unet(x, pool, rad, unpool, options, record):
    """ComfyUI's UNet loop (hook order, skip handling, Upsample to the next skip's size) with the
    SDXL block layout and parameter-free blocks; records the h size leaving every block."""
    down = lambda h: F.conv2d(h, torch.ones(1, 1, 3, 3) / 9, stride=2, padding=1)  # noqa: E731
    skips, h = [], x
    for idx in range(9):
        options["block"] = ("input", idx)
        h = down(h) if idx in (3, 6) else h
        h = pool(h, options)
        skips.append(h)
        h = rad(h, options)
        record[("input", idx)] = tuple(h.shape[-2:])
    for idx in range(9):
        options["block"] = ("output", idx)
        h, hsp = unpool(h, skips.pop(), options)
        h = torch.cat([h, hsp], 1).mean(1, keepdim=True)
        record[("output", idx, "in")] = tuple(h.shape[-2:])
        if idx in (2, 5):
            h = F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest")
        record[("output", idx)] = tuple(h.shape[-2:])
    return h


@pytest.mark.parametrize("step,expected", [
    (0, {("input", 3): (128, 128), ("input", 5): (64, 64), ("input", 6): (32, 32), ("output", 2): (128, 128),
         ("output", 5, "in"): (128, 128), ("output", 5): (256, 256)}),
    (3, {("input", 4): (64, 64), ("input", 6): (32, 32), ("output", 2): (64, 64), ("output", 4): (64, 64),
         ("output", 5, "in"): (128, 128), ("output", 5): (256, 256)}),
    (10, {("input", 4): (128, 128), ("input", 6): (64, 64), ("output", 2): (128, 128)}),
])
def test_sdxl_2048_walk_through(step, expected):
    record = {}
    x = torch.randn(1, 1, 256, 256)
    out = skeleton_sdxl_unet(x, *sdxl_hooks(), transformer_options(None, (256, 256), step), record)
    assert out.shape == x.shape
    assert {key: record[key] for key in expected} == expected


@pytest.mark.parametrize("latent", [(17, 23), (24, 40), (31, 65), (33, 33), (64, 64), (65, 129), (8, 200), (1, 1)])
def test_forced_phases_are_shape_safe_at_odd_latents(latent):
    x = torch.randn(1, 1, *latent)
    for phases in (hd.Phases(rad=True), hd.Phases(pool=True), hd.Phases(rad=True, pool=True)):
        hooks = sdxl_hooks()
        for hook in hooks:
            hook.phases = lambda options, phases=phases: phases
        out = skeleton_sdxl_unet(x, *hooks, transformer_options(None, latent, 0), {})
        assert out.shape == x.shape and torch.isfinite(out).all()


def attn_options(block, block_index, hw, step, n_heads=2, batch=2, cond_or_uncond=(0, 1)):
    options = transformer_options(block, (hw[0] * 2, hw[1] * 2), step, batch=batch)
    options.update(activations_shape=[batch, 16, *hw], block_index=block_index, n_heads=n_heads,
                   dim_head=8, attn_precision=None, cond_or_uncond=list(cond_or_uncond))
    return options


def test_window_attention_hook_matches_reference_and_is_deterministic():
    hook = node.WindowAttention(attention=lambda q, k, v, extra: multihead(q, k, v, extra["n_heads"]))
    height, width = 9, 14
    q, k, v = (torch.randn(2, height * width, 16, dtype=torch.float64) for _ in range(3))
    state = torch.get_rng_state()
    for block, index, step in [(("input", 4), 0, 0), (("output", 5), 1, 7), (("input", 5), 1, 19)]:
        options = attn_options(block, index, (height, width), step)
        out = hook(q, k, v, options)
        shift = hd.shift_for(height, width, hd.shift_index(0, step, block, index))
        torch.testing.assert_close(out, masked_window_reference(q, k, v, 2, height, width, shift), rtol=0, atol=1e-12)
        assert torch.equal(hook(q, k, v, options), out)
    assert torch.equal(torch.get_rng_state(), state)


def test_window_attention_cond_and_uncond_in_separate_calls_equal_batched():
    hook = node.WindowAttention(attention=lambda q, k, v, extra: multihead(q, k, v, extra["n_heads"]))
    height, width = 12, 7
    q, k, v = (torch.randn(2, height * width, 16) for _ in range(3))
    for step in range(6):
        batched = hook(q, k, v, attn_options(("output", 3), 1, (height, width), step))
        cond = hook(q[:1], k[:1], v[:1], attn_options(("output", 3), 1, (height, width), step, batch=1, cond_or_uncond=(0,)))
        uncond = hook(q[1:], k[1:], v[1:], attn_options(("output", 3), 1, (height, width), step, batch=1, cond_or_uncond=(1,)))
        torch.testing.assert_close(torch.cat([cond, uncond]), batched, rtol=1e-6, atol=1e-6)


def test_window_attention_hook_with_one_window_is_plain_attention():
    hook = node.WindowAttention(attention=lambda q, k, v, extra: multihead(q, k, v, extra["n_heads"]), grid=(1, 1))
    q, k, v = (torch.randn(2, 5 * 11, 16, dtype=torch.float64) for _ in range(3))
    out = hook(q, k, v, attn_options(("input", 4), 0, (5, 11), 3))
    torch.testing.assert_close(out, multihead(q, k, v, 2), rtol=0, atol=1e-12)


def test_window_attention_hook_needs_activations_shape():
    hook = node.WindowAttention(attention=lambda q, k, v, extra: q)
    options = attn_options(("input", 4), 0, (4, 4), 0)
    del options["activations_shape"]
    with pytest.raises(RuntimeError, match="activations_shape"):
        hook(*(torch.randn(1, 16, 4) for _ in range(3)), options)


# --------------------------------------------------------------------------------------------
# Node surface


def test_reapplying_replaces_our_hooks_and_keeps_foreign_ones():
    foreign = lambda h, options: h  # noqa: E731
    pool, rad, unpool = sdxl_hooks()
    attention = node.WindowAttention()
    options = {"transformer_options": {
        "patches": {"input_block_patch": [foreign, pool], "input_block_patch_after_skip": [rad],
                    "output_block_patch": [unpool]},
        "patches_replace": {"attn1": {("input", 4, 0): attention, ("middle", 0, 0): foreign}},
    }}
    node._strip_own_patches(options)
    assert options["transformer_options"]["patches"] == {
        "input_block_patch": [foreign], "input_block_patch_after_skip": [], "output_block_patch": []}
    assert options["transformer_options"]["patches_replace"]["attn1"] == {("middle", 0, 0): foreign}


def test_node_is_registered_with_tooltips():
    assert PACK.NODE_CLASS_MAPPINGS["InfDiTHiDiffusion"] is node.InfDiTHiDiffusion
    assert PACK.NODE_DISPLAY_NAME_MAPPINGS["InfDiTHiDiffusion"] == "Inf-DiT HiDiffusion Model Patch"
    assert node.InfDiTHiDiffusion.CATEGORY == "image/upscaling/Inf-DiT"
    inputs = node.InfDiTHiDiffusion.INPUT_TYPES()["required"]
    assert list(inputs) == ["model", "raunet", "msw_msa", "preset", "native_latent_size"]
    assert all(spec[1].get("tooltip") for spec in inputs.values())
