"""Seeded draws are made on the generator's device and only then moved."""

import torch

from rectflow.draws import draw_device, rand, randint, randn


def test_a_seeded_draw_is_the_generators_stream_whatever_the_destination():
    for fn, ref in [(rand, torch.rand), (randn, torch.randn)]:
        got = fn(3, 4, generator=torch.Generator().manual_seed(5), device="cpu", dtype=torch.float64)
        torch.testing.assert_close(got, ref(3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64), rtol=0, atol=0)
    got = randint(7, 9, generator=torch.Generator().manual_seed(2), device="cpu")
    assert torch.equal(got, torch.randint(7, (9,), generator=torch.Generator().manual_seed(2))) and got.dtype == torch.int64
    assert rand(2, generator=torch.Generator(), device="meta").device.type == "meta"  # drawn on the CPU, then moved


def test_without_a_generator_the_draw_is_made_on_draw_on_from_the_global_stream():
    torch.manual_seed(11)
    a = randn(5, draw_on="cpu")
    torch.manual_seed(11)
    assert torch.equal(a, torch.randn(5))
    assert draw_device(None, "cpu") == "cpu" and draw_device(torch.Generator(), "meta") == torch.device("cpu")


def test_randint_with_a_low_bound_is_torch_randint_of_that_range():
    got = randint(6, 50, low=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, torch.randint(1, 6, (50,), generator=torch.Generator().manual_seed(3)))
    assert int(got.min()) >= 1 and int(got.max()) <= 5
