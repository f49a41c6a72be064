"""RoPE buffers in a checkpoint: what the official code computes is accepted at any table size and in
fp32 / fp16 / bf16; a table of the wrong size or convention is refused.

The official tables are built here independently of infdit_core.rope, the way the official code
(EVA's VisionRotaryEmbeddingFast) does it, and loaded inside a checkpoint whose other tensors are
tiny (the loader infers the table size, image_size, from the table's shape).
"""
import gc

import pytest
import torch

from infdit_core import CheckpointError, InfDiT, InfDiTConfig, load_model
from infdit_core.rope import RotaryTable, official_angles, rope_angles

ROPE = "mixins.adaln_layer.rope."


def official_angle_table(size, head_dim, theta=10000.0, pairs="interleaved", halves="row,col", position_scale=1):
    """Angles [size, size, head_dim] in float32, op for op as the official code, or wrong on purpose:
    pairs="half-split" (each half of an axis' channels runs through all frequencies), halves="col,row"
    (column angles in the first half), position_scale (EVA's arange(size) / size * pt, pt = size * scale)."""
    d = head_dim // 2
    freqs = 1 / theta ** (torch.arange(0, d, 2)[: d // 2].float() / d)
    t = torch.arange(size) / size * (size * position_scale)
    f = torch.einsum("t,f->tf", t, freqs)
    f = torch.cat([f, f], dim=-1) if pairs == "half-split" else f.repeat_interleave(2, dim=-1)
    first, second = f[:, None, :].expand(-1, size, -1), f[None, :, :].expand(size, -1, -1)
    if halves == "col,row":
        first, second = second, first
    return torch.cat([first, second], dim=-1)


def official_tables(size, head_dim, **kind):
    """The buffers (freqs_cos, freqs_sin)."""
    angle = official_angle_table(size, head_dim, **kind)
    return angle.cos(), angle.sin()


def tiny_state_dict(head_dim):
    """A one-layer, one-head model's weights (head dim = width), without RoPE buffers."""
    torch.manual_seed(0)
    cfg = InfDiTConfig(num_layers=1, hidden_size=head_dim, num_heads=1, block_size=32, image_size=16, vector_dim=8)
    return {k: v for k, v in InfDiT(cfg).state_dict().items() if not k.startswith(ROPE)}


def with_tables(sd, cos, sin):
    return dict(sd, **{ROPE + "freqs_cos": cos, ROPE + "freqs_sin": sin})


@pytest.fixture(scope="module")
def released():
    """The official fp32 tables at the released size (T = 1024, head dim 80): 2 x 335 MB."""
    cos, sin = official_tables(1024, 80)
    yield {"sd": tiny_state_dict(80), "cos": cos, "sin": sin}
    del cos, sin
    gc.collect()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, "bf16 up-cast to fp32"])
def test_official_released_size_table_loads(released, dtype):
    cos, sin = released["cos"], released["sin"]
    if dtype == "bf16 up-cast to fp32":  # e.g. the bf16 release converted to float32 by another tool
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
    elif dtype != torch.float32:
        cos, sin = cos.to(dtype), sin.to(dtype)
    model = load_model(with_tables(released["sd"], cos, sin))
    assert model.config.rope_size == 1024 and model.config.image_size == 512 and model.config.head_dim == 80
    del model, cos, sin
    gc.collect()


@pytest.mark.parametrize("size,head_dim", [(128, 16), (96, 16), (200, 16), (96, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_official_table_loads_at_any_size(size, head_dim, dtype):
    cos, sin = official_tables(size, head_dim)
    model = load_model(with_tables(tiny_state_dict(head_dim), cos.to(dtype), sin.to(dtype)))
    assert model.config.rope_size == size


WRONG = {"half-split": dict(pairs="half-split"), "row-col-swapped": dict(halves="col,row"),
         "theta-1e3": dict(theta=1000.0), "theta-1e5": dict(theta=100000.0), "positions-rescaled": dict(position_scale=0.5)}


@pytest.mark.parametrize("kind", list(WRONG))
def test_wrong_released_size_table_is_refused(released, kind):
    sd = with_tables(released["sd"], official_angle_table(1024, 80, **WRONG[kind]).cos(), released["sin"])
    with pytest.raises(CheckpointError, match=r"freqs_cos: values differ from the official 2D RoPE table"):
        load_model(sd)
    del sd
    gc.collect()


@pytest.mark.parametrize("kind", list(WRONG))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_wrong_small_table_is_refused(kind, dtype):
    cos, sin = official_tables(128, 16, **WRONG[kind])
    with pytest.raises(CheckpointError, match=r"freqs_sin: values differ from the official 2D RoPE table"):
        load_model(with_tables(tiny_state_dict(16), cos.to(dtype), sin.to(dtype)))


def test_wrong_size_table_is_refused():
    sd = tiny_state_dict(16)
    cos, sin = official_tables(128, 16)
    with pytest.raises(CheckpointError, match=r"freqs_sin: shape \(64, 64, 16\) does not match the model's RoPE "
                                              r"table \(128, 128, 16\)"):
        load_model(with_tables(sd, cos, official_tables(64, 16)[1]))
    with pytest.raises(CheckpointError, match=r"freqs_cos: shape \(128, 128, 32\) does not match the model's RoPE "
                                              r"table \(128, 128, 16\)"):
        load_model(with_tables(sd, official_tables(128, 32)[0], sin))
    with pytest.raises(CheckpointError, match=r"freqs_cos: shape \(128, 64, 16\) does not match"):
        load_model(with_tables(sd, cos[:, :64], sin))


def test_written_tables_are_the_official_ones():
    """What we write when saving a state dict is what the official code computes, op for op."""
    cos, sin = official_tables(96, 80)  # a non-power-of-two size: arange(T) / T * T is not all integers
    tables = RotaryTable(80, 96).tables()
    assert torch.equal(tables["freqs_cos"], cos) and torch.equal(tables["freqs_sin"], sin)


@pytest.mark.parametrize("size,head_dim", [(1024, 80), (96, 80), (128, 16)])
def test_forward_angles_are_the_table_entries(size, head_dim):
    """The forward's angles at (row, col) are the official table's angles there, bit for bit."""
    rows = torch.tensor([0, 1, size // 2 + 1, size - 1])
    cols = torch.arange(size)
    table = official_angles(rows, size, head_dim)
    ours = rope_angles(rows[:, None].expand(-1, size), cols[None].expand(len(rows), -1), head_dim, size)
    assert torch.equal(ours, table)
    # positions wrap modulo the table size
    wrapped = rope_angles(rows[:, None].expand(-1, size) + size, cols[None].expand(len(rows), -1) + 3 * size,
                          head_dim, size)
    assert torch.equal(wrapped, table)
