"""Image-parallel sampling: 2, 3 and 4 CPU ranks over gloo (loopback only) give the single-process pixels."""
import os

import pytest
import torch
import torch.distributed as dist

from conftest import condition, random_inputs, spawn_ranks
from infdit_core import BlockSweepDenoiser, load_model, pipeline, sample, upscale
from infdit_core.pipeline import Resume, strip_of
from infdit_core.strips import Block, StripSchedule, split
from infdit_core.uniba import KVCache, neighbour_slots

CASES = {  # name: (batch, block rows, block cols, block batch of rank r: block_batch + r)
    "odd_partial_strip": (1, 3, 5, 0),  # 5 columns over 2 or 3 ranks: uneven strips
    "tall": (1, 5, 2, 0),  # strips cut the 2 columns; the 3rd rank of 3 stays idle
    "wide": (1, 2, 4, 0),  # swept column by column: strips cut the rows
    "batch2": (2, 2, 3, 0),
    "mixed_block_batch": (1, 3, 4, 1),  # ranks run 1, 2, 3 blocks per network call
}
STEPS = 2


def case_inputs(name):
    batch, rows, cols, _ = CASES[name]
    return condition(batch, rows, cols, seed=sum(map(ord, name)))


def _rank_main(rank, world, port, model_path, out_dir, resume_dir=None):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = load_model(model_path)
        if resume_dir is not None:  # continue the single-process job checkpointed there
            progress = []
            result = sample(model, **case_inputs("odd_partial_strip"), steps=RESUME_STEPS, seed=11, block_batch=1,
                            resume=Resume(resume_dir, interval=0), callback=lambda *a: progress.append(a[:3]))
            if rank == 0:
                torch.save({"x": result, "first_progress": torch.tensor(progress[0])},
                           os.path.join(out_dir, "resumed.pt"))
            return
        for n, (name, (_, _, _, block_batch)) in enumerate(CASES.items()):
            inputs = case_inputs(name)
            if n % 2:  # every other case hands each rank only its strip of the concat canvas
                inputs["concat_lr"] = strip_of(inputs["concat_lr"], model.config.block_size)
            # Each rank picks its own block batch; the pixels must not depend on it.
            result = sample(model, **inputs, steps=STEPS, seed=11, block_batch=1 + block_batch * rank)
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"{name}.pt"))
            else:
                assert result is None
        inputs = case_inputs("odd_partial_strip")
        inputs["concat_lr"] = strip_of(inputs["concat_lr"], model.config.block_size)
        with pytest.raises(ValueError, match=r"resume needs Resume\.key \(job_key of the whole canvas\)"):
            sample(model, **inputs, steps=STEPS, resume=Resume(out_dir))  # no rank could key the job alone
        # 8x runs a 4x pass, then a 2x pass that every rank starts from rank 0's 4x result.
        handed = []
        original = pipeline.sample

        def recording_sample(*args, **kwargs):
            handed.append((tuple(kwargs["concat_lr"].shape), tuple(kwargs["lr"].shape)))
            return original(*args, **kwargs)

        pipeline.sample = recording_sample
        try:
            result = upscale(model, chain_image(), scale=8.0, **CHAIN)
        finally:
            pipeline.sample = original
        # upscale keeps only this rank's strip of each pass's concat canvas (the whole one is freed).
        s = model.config.block_size
        assert len(handed) == 2  # the 4x pass and the 2x pass
        for concat, (B, _, h, w) in handed:
            strip = StripSchedule(B, 4 * h // s, 4 * w // s, world, rank).crop(torch.empty(B, 3, 4 * h, 4 * w), s)
            assert concat == tuple(strip.shape)
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "chain.pt"))
        else:
            assert result is None
    finally:
        dist.destroy_process_group()


CHAIN = dict(clip_vector=torch.zeros(1, 768), steps=STEPS, seed=2, block_batch=1)


def chain_image():
    return torch.rand(1, 3, 11, 13, generator=torch.Generator().manual_seed(5))  # 8x: 88 x 104, 3 x 4 blocks


@pytest.fixture(scope="module")
def reference(golden_dir):
    model = load_model(golden_dir / "tiny_model.safetensors")
    results = {name: sample(model, **case_inputs(name), steps=STEPS, seed=11, block_batch=1) for name in CASES}
    results["chain"] = upscale(model, chain_image(), scale=8.0, **CHAIN)
    return results


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_reproduce_the_single_process_sample(golden_dir, reference, tmp_path, world):
    spawn_ranks(_rank_main, world, str(golden_dir / "tiny_model.safetensors"), str(tmp_path))
    for name in [*CASES, "chain"]:
        got = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        want = reference[name]
        assert got.shape == want.shape
        if name == "chain" or CASES[name][3] == 0:
            # One block per call everywhere: the same arithmetic, so the same bits.
            assert torch.equal(got, want), name
        else:
            # Other block batches change float summation order inside the network calls; the
            # 2-step schedule amplifies that (its Heun correction divides by sigma = 0.002).
            assert ((got - want).norm() / want.norm()).item() <= 1e-5, name


def test_strips_are_balanced_and_cover_the_grid():
    assert split(5, 2) == [range(0, 3), range(3, 5)]
    assert split(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    assert split(2, 3) == [range(0, 1), range(1, 2), range(2, 2)]
    for batch, rows, cols, world in [(1, 3, 5, 2), (2, 6, 3, 4), (1, 2, 7, 3), (1, 4, 4, 1)]:
        ranks = [StripSchedule(batch, rows, cols, world, r) for r in range(world)]
        blocks = [block for schedule in ranks for block in schedule.order]
        assert sorted(blocks) == sorted(set(blocks)) and len(blocks) == batch * rows * cols
        for r, schedule in enumerate(ranks):
            # What a rank reads from its neighbour is exactly what that neighbour sends.
            assert schedule.incoming == (ranks[r - 1].outgoing if r else [])
            owned = set(schedule.order)
            outside = {s for block in schedule.order for s in neighbour_slots(block)} - owned
            assert outside == set(schedule.incoming)


def test_a_rank_takes_the_whole_concat_canvas_or_just_its_strip(golden_dir):
    model = load_model(golden_dir / "tiny_model.safetensors")
    inputs = random_inputs(1, 3, 5)  # 96 x 160, swept column by column: rank 0 of 2 has block rows 0, 1
    schedule = StripSchedule(1, 3, 5, 2, 0)
    whole = inputs["concat_lr"]
    strip = schedule.crop(whole, 32).clone()
    condition_ = dict(lr=inputs["lr"], clip_vector=inputs["clip_vector"], schedule=schedule)
    from_whole = BlockSweepDenoiser(model, concat_lr=whole, **condition_)
    from_strip = BlockSweepDenoiser(model, concat_lr=strip, **condition_)
    assert torch.equal(from_whole.canvas.concat_lr, strip)
    assert from_strip.canvas.concat_lr.data_ptr() == strip.data_ptr()  # used as it is, not copied
    x = schedule.crop(inputs["x"], 32)
    assert torch.equal(from_whole(x, 1.5), from_strip(x, 1.5))
    with pytest.raises(ValueError, match=r"concat_lr \(1, 3, 96, 96\) is neither the whole canvas "
                                         r"\(1, 3, 96, 160\) \(4 x lr\) nor this rank's strip of it \(1, 3, 64, 160\)"):
        BlockSweepDenoiser(model, concat_lr=whole[..., :96], **condition_)


def test_edge_blocks_are_sent_as_copies_of_their_pool_slots(golden_dir):
    """The K/V packed for the next rank hold what the cache keeps for the strip's next line, in
    memory of their own: the pool slot is written again once its last reader is done, which may be
    before the next rank has received it."""
    model = load_model(golden_dir / "tiny_model.safetensors")
    inputs = random_inputs(1, 3, 5)
    schedule = StripSchedule(1, 3, 5, 2, 0)  # lines are block columns; rank 0 has rows 0 and 1, row 1 goes to rank 1

    class Recording:
        cache, kept, sent = None, 0, []

        def begin_sweep(self):
            pass

        def receive(self, cache, blocks):
            self.cache = cache

        def send(self, packed):
            pool = self.cache.pool
            for block, kv in packed:
                self.sent.append(block)
                assert len(kv) == model.config.num_layers  # one tensor per layer
                cfg = model.config
                assert all(t.shape == (2, cfg.num_heads, cfg.block_tokens ** 2, cfg.head_dim) and t.is_contiguous()
                           for t in kv)
                assert all(t.untyped_storage().data_ptr() != pool.untyped_storage().data_ptr() for t in kv)
                slot = self.cache.held.get(block)
                if slot is not None:
                    S = self.cache.capacity
                    assert all(torch.equal(kv[layer], pool[layer * S + slot]) for layer in range(len(kv)))
                    self.kept += 1

    exchange = Recording()
    denoiser = BlockSweepDenoiser(model, lr=inputs["lr"], concat_lr=inputs["concat_lr"],
                                  clip_vector=inputs["clip_vector"], schedule=schedule, exchange=exchange)
    denoiser(schedule.crop(inputs["x"], 32), 1.5)
    assert exchange.sent == schedule.outgoing
    assert exchange.kept == 4  # lines 0 to 3; the last line's edge block is read by no later line


def test_received_blocks_arrive_layer_by_layer_into_the_pool(golden_dir, monkeypatch):
    """A block from the previous rank is waited for only when a layer first reads it (so later
    layers arrive while earlier ones compute), copied into that layer's pool slot, and its buffer
    is not kept: the pool is the only copy, and the readers see exactly what was sent."""
    model = load_model(golden_dir / "tiny_model.safetensors")
    cfg = model.config
    inputs = random_inputs(1, 3, 5)
    schedule = StripSchedule(1, 3, 5, 2, 1)  # lines are block columns; this rank has row 2 and reads row 1
    events, storages, sent = [], {}, {}

    class Supplying:
        def __init__(self):
            self.supplied = set()

        def begin_sweep(self):
            self.supplied.clear()

        def receive(self, cache, blocks):
            for source in sorted({s for block in blocks for s in neighbour_slots(block)} & set(schedule.incoming)):
                if source not in self.supplied:
                    self.supplied.add(source)
                    cache.put(source, [self.arrival(source, layer) for layer in range(cfg.num_layers)])

        def arrival(self, source, layer):
            def arrive():
                events.append(("arrive", source, layer))
                kv = torch.randn(2, cfg.num_heads, cfg.block_tokens ** 2, cfg.head_dim)
                storages[source, layer] = kv.untyped_storage()._weak_ref()
                sent[source, layer] = kv.clone()
                return kv
            return arrive

        def send(self, packed):
            pass

    gather = KVCache.gather

    def logged(cache, layer, k, v):
        events.append(("gather", cache.blocks[0], layer))
        keys, values = gather(cache, layer, k, v)
        alive = {key for key, ref in storages.items() if not torch.UntypedStorage._expired(ref)}
        events.append(("alive", cache.blocks[0], layer, alive))
        # Block (2, j) reads (1, j) as its top neighbour (slot 3).
        (block,) = cache.blocks
        top = Block(0, 1, block.j)
        assert torch.equal(keys[0, :, 3], sent[top, layer][0]) and torch.equal(values[0, :, 3], sent[top, layer][1])
        return keys, values

    monkeypatch.setattr(KVCache, "gather", logged)
    denoiser = BlockSweepDenoiser(model, lr=inputs["lr"], concat_lr=inputs["concat_lr"],
                                  clip_vector=inputs["clip_vector"], schedule=schedule, exchange=Supplying())
    denoiser(schedule.crop(inputs["x"], 32), 1.5)
    # Block (2, j) reads (1, j) as its top and (2, j + 1) reads it as its top-left neighbour.
    for j in range(5):
        source, first = Block(0, 1, j), Block(0, 2, j)
        for layer in range(cfg.num_layers):
            arrived = events.index(("arrive", source, layer))
            assert events[arrived - 1] == ("gather", first, layer)  # waited for inside that layer's gather
            alive = next(e[3] for e in events if e[:3] == ("alive", first, layer))
            assert (source, layer) not in alive  # copied into the pool, the buffer released
            if layer + 1 < cfg.num_layers:
                assert ("arrive", source, layer + 1) not in events[:arrived]  # later layers arrive later
    assert not denoiser.last_cache.arriving and not denoiser.last_cache.held


RESUME_STEPS = 4


def test_a_single_process_job_resumes_on_two_ranks(golden_dir, tmp_path):
    """Checkpoints hold regions of the canvas, so a job may continue on another number of ranks:
    each rank restores its strip from the one-process file, all ranks agree on the step, and the
    result is the uninterrupted single-process result, bit for bit."""
    model = load_model(golden_dir / "tiny_model.safetensors")
    inputs = case_inputs("odd_partial_strip")
    uninterrupted = sample(model, **inputs, steps=RESUME_STEPS, seed=11, block_batch=1)

    class Stop(Exception):
        pass

    def stop_at_step_two(step, *_):
        if step == 2:
            raise Stop

    resume_dir = tmp_path / "resume"
    with pytest.raises(Stop):
        sample(model, **inputs, steps=RESUME_STEPS, seed=11, block_batch=1, callback=stop_at_step_two,
               resume=Resume(str(resume_dir), interval=0))
    assert len(os.listdir(resume_dir)) > 0
    spawn_ranks(_rank_main, 2, str(golden_dir / "tiny_model.safetensors"), str(tmp_path), str(resume_dir))
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert torch.equal(resumed["x"], uninterrupted)
    step, _, blocks_done = resumed["first_progress"].tolist()
    # Steps 0 and 1 were checkpointed (2 network calls each over 15 blocks): the ranks start at step 2,
    # and the progress counts the 4 calls already done.
    assert step == 2 and blocks_done == 2 * 2 * 15
    assert os.listdir(resume_dir) == []  # the finished job removed every checkpoint


# --- every sampler over strips -------------------------------------------------------------------

SAMPLER_STEPS = 5
STRIP_SAMPLERS = ["dpmpp_2m", "unipc", "dpmpp_2m_forecast", "dpmpp_2m_forecast_end"]


def _samplers_rank_main(rank, world, port, model_path, out_dir, resume_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = load_model(model_path)
        inputs = case_inputs("odd_partial_strip")
        results = {name: sample(model, **inputs, steps=SAMPLER_STEPS, sampler=name, seed=11, block_batch=1)
                   for name in STRIP_SAMPLERS}
        # ...and the single-process UniPC job interrupted in step 3, continued here with its history.
        results["unipc resumed"] = sample(model, **inputs, steps=SAMPLER_STEPS, sampler="unipc", seed=11,
                                          block_batch=1, resume=Resume(resume_dir, interval=0))
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "samplers.pt"))
    finally:
        dist.destroy_process_group()


def test_every_sampler_over_two_ranks_is_the_single_process_run(golden_dir, tmp_path):
    """Multistep history and forecast estimates are canvases: each rank keeps its strip of them,
    and checkpoints of them restore on another number of ranks."""
    model = load_model(golden_dir / "tiny_model.safetensors")
    inputs = case_inputs("odd_partial_strip")
    reference = {name: sample(model, **inputs, steps=SAMPLER_STEPS, sampler=name, seed=11, block_batch=1)
                 for name in STRIP_SAMPLERS}

    class Stop(Exception):
        pass

    def stop_at_step_three(step, *_):
        if step == 3:
            raise Stop

    resume_dir = tmp_path / "resume"
    with pytest.raises(Stop):
        sample(model, **inputs, steps=SAMPLER_STEPS, sampler="unipc", seed=11, block_batch=1,
               callback=stop_at_step_three, resume=Resume(str(resume_dir), interval=0))
    spawn_ranks(_samplers_rank_main, 2, str(golden_dir / "tiny_model.safetensors"), str(tmp_path), str(resume_dir))
    got = torch.load(tmp_path / "samplers.pt", weights_only=True)
    for name in STRIP_SAMPLERS:
        assert torch.equal(got[name], reference[name]), name
    assert torch.equal(got["unipc resumed"], reference["unipc"])
    assert os.listdir(resume_dir) == []
