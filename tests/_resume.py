"""The mid-epoch resume check every task's training loader passes (what Lightning does on ``ckpt_path=last``)."""

from collections.abc import Callable

import torch


def assert_resumes_mid_epoch(make_loader: Callable, images: Callable, epoch: int = 1, stop: int = 2) -> None:
    """A loader built by ``make_loader()`` and stopped after ``stop`` batches of ``epoch`` hands its
    ``state_dict`` to a new one (same run seed, global RNG moved on), which must yield exactly the remaining
    batches of the uninterrupted epoch: same samples, same augmentations. ``images(batch)`` -> a tensor."""
    def batches(loader, count=None):
        loader.sampler.set_epoch(epoch)
        out = []
        for batch in loader:
            out.append(torch.as_tensor(images(batch)).clone())
            if len(out) == count:
                break
        return out

    torch.manual_seed(0)
    expected = batches(make_loader())
    assert len(expected) >= stop + 2, f"need at least {stop + 2} batches, got {len(expected)}"
    torch.manual_seed(0)
    interrupted = make_loader()
    batches(interrupted, stop)
    state = interrupted.state_dict()
    torch.manual_seed(0)  # the run's seed (seed_everything), but the global RNG has moved on
    torch.rand(100)
    resumed = make_loader()
    resumed.load_state_dict(state)
    rest = batches(resumed)
    assert len(rest) == len(expected) - stop
    for got, want in zip(rest, expected[stop:]):
        torch.testing.assert_close(got, want)
    assert not torch.equal(expected[stop], expected[stop + 1])
