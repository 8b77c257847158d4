"""A bucket's full-size buffers start at different places within a 4 KiB page (compiled/layout.full_buffer)."""
from __future__ import annotations

import torch

import opdsl
from opdsl.compiled import layout


def shifts(opt: opdsl.Optimizer) -> list[int]:
    """Bytes from each full-size buffer's allocation to its first element. Fresh large allocations start
    alike within a page, so these are the buffers' distances within it (reused memory need not)."""
    (bucket,) = opt._buckets
    buffers = [bucket.flat.param, bucket.flat.grad] + [v for v in bucket.state.values() if torch.is_tensor(v) and v.numel() > 1]
    return [t.storage_offset() * t.element_size() for t in buffers]


def adamw_over(numel: int) -> opdsl.Optimizer:
    params = [torch.nn.Parameter(torch.randn(numel // 4)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    return opdsl.Optimizer(params, "adamw", compile=False)


def test_parameters_gradients_and_states_start_a_stagger_apart_within_a_page():
    assert shifts(adamw_over(1 << 12)) == [0, 1024, 2048, 3072]  # parameters, gradients, m, v


def test_the_stagger_off_puts_every_buffer_where_the_allocator_does(monkeypatch):
    monkeypatch.setattr(layout, "STAGGER_BYTES", 0)
    assert shifts(adamw_over(1 << 12)) == [0, 0, 0, 0]


def test_a_staggered_buffer_is_a_plain_flat_tensor_of_its_length():
    buffer = layout.full_buffer(1000, 0.5, 3, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert buffer.shape == (1000,) and buffer.is_contiguous() and buffer.dtype == torch.bfloat16
    assert bool((buffer == 0.5).all())
    assert buffer.storage_offset() * buffer.element_size() == 3 * layout.STAGGER_BYTES % 4096


def test_cleared_state_is_refilled_in_its_staggered_buffer():
    opt = adamw_over(1 << 12)
    opt.step()
    before = shifts(opt)
    opt.state.clear()
    opt.step()
    assert shifts(opt) == before
