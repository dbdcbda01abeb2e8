"""The frozen head's chunked log-probabilities: float32, under bf16 autocast, and its workspace."""

from __future__ import annotations

import threading

import torch

from tinkerkit.engines.local.kernels.logprobs import FrozenHeadLogprobs, logits_workspace


def head_case():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=generator, requires_grad=True)
    weight = torch.randn(50, 8, generator=generator)
    targets = torch.randint(0, 50, (10,), generator=generator)
    return hidden, weight, targets


def test_float32_head_equals_log_softmax_in_values_and_gradients():
    hidden, weight, targets = head_case()
    grad = torch.linspace(-1, 1, 10)
    logprobs = FrozenHeadLogprobs.apply(hidden, weight, None, targets, 3)  # chunks 3, 3, 3, 1
    (actual,) = torch.autograd.grad(logprobs, hidden, grad)
    expected_logprobs = (hidden @ weight.t()).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    (expected,) = torch.autograd.grad(expected_logprobs, hidden, grad)
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_head_under_autocast_multiplies_in_bf16_and_normalizes_in_float32():
    hidden, weight, targets = head_case()
    grad = torch.linspace(-1, 1, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs = FrozenHeadLogprobs.apply(hidden, weight, None, targets, 4)
    (actual,) = torch.autograd.grad(logprobs, hidden, grad)
    # By hand: bf16 products (bf16 logits), float32 log-softmax; the gradient row
    # J = weight[target] - softmax @ weight with the softmax and weight in bf16
    logits = (hidden.detach().bfloat16() @ weight.bfloat16().t()).float()
    expected_logprobs = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    jacobian = weight[targets] - (logits.softmax(-1).bfloat16() @ weight.bfloat16()).float()
    assert logprobs.dtype == actual.dtype == torch.float32
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(actual, grad[:, None] * jacobian, rtol=1e-2, atol=1e-2)
    full = FrozenHeadLogprobs.apply(hidden, weight, None, targets, 4)
    assert 0 < (logprobs - full).abs().max() < 0.1  # bf16 rounding of the logits, no more


def test_head_under_autocast_pads_rows_without_changing_values():
    # 50 positions are padded to 64 rows for the bf16 products (chunks of 40: 40 rows, then 24
    # rows for 10 positions); 64 positions whose last 14 are zero rows use the same shapes
    # and must give the first 50 log-probabilities and gradients bit for bit.
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 8, generator=generator, requires_grad=True)
    weight = torch.randn(70, 8, generator=generator)
    targets = torch.randint(0, 70, (50,), generator=generator)
    padded = torch.cat([hidden.detach(), torch.zeros(14, 8)]).requires_grad_()
    padded_targets = torch.cat([targets, torch.zeros(14, dtype=torch.int64)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs = FrozenHeadLogprobs.apply(hidden, weight, None, targets, 40)
        padded_logprobs = FrozenHeadLogprobs.apply(padded, weight, None, padded_targets, 40)
    grad = torch.linspace(-1, 1, 50)
    (actual,) = torch.autograd.grad(logprobs, hidden, grad)
    (expected,) = torch.autograd.grad(padded_logprobs, padded, torch.cat([grad, torch.zeros(14)]))
    assert logprobs.shape == (50,) and torch.equal(logprobs, padded_logprobs[:50])
    assert torch.equal(actual, expected[:50])


def in_new_thread(fn):
    """``fn()`` run in a thread of its own (a fresh workspace), its result."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def test_workspace_is_kept_per_thread_and_grows():
    def blocks():
        first = logits_workspace(3, 50, torch.float32, torch.device("cpu"))
        again = logits_workspace(2, 50, torch.float32, torch.device("cpu"))
        bigger = logits_workspace(30, 50, torch.float32, torch.device("cpu"))
        low = logits_workspace(3, 50, torch.bfloat16, torch.device("cpu"))
        return first, again, bigger, low

    first, again, bigger, low = in_new_thread(blocks)
    assert again.shape == (2, 50) and again.data_ptr() == first.data_ptr()  # reused
    assert bigger.shape == (30, 50) and bigger.data_ptr() != first.data_ptr()  # grown
    assert low.dtype == torch.bfloat16  # one block per dtype
    other = in_new_thread(lambda: logits_workspace(30, 50, torch.float32, torch.device("cpu")))
    assert other.data_ptr() != bigger.data_ptr()  # another thread has its own block
