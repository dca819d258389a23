"""CoSpaDi's and ROCKET's loops stay on the layer's device, their products in float32 (bf16 for HTP's CG steps where the device multiplies bf16 natively).

Every ATen operation run inside the loops is recorded (a `TorchDispatchMode`); a CPU tensor produced while
compressing a CUDA layer, or a float64 matrix product in the dictionary-learning loop, fails the test. Needs a
CUDA device (skipped without one); the recorder itself is checked on CPU.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparselm.capture import LinearStats
from sparselm.config import CoSpaDiSpec, DictUpdateRule, Init, Ratio, RocketSpec, SparseCoder
from sparselm.methods.cospadi import init_dictionary, learn_dictionary
from sparselm.device import low_precision
from sparselm.methods.rocket import factorize, keep_counts, rocket, rocket_size, whitened_svd
from sparselm.profile import profile_layer

PRODUCTS = {"mm", "bmm", "addmm", "matmul", "baddbmm", "addmv", "mv", "dot"}


class Recorder(TorchDispatchMode):
    """``(op name, output device type, output dtype, input dtypes)`` of every tensor-producing op."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        ins = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.ops.append((name, t.device.type, t.dtype, ins))
        return out


def _layer(device, out=48, inp=32, tokens=256):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(out, 8, generator=g) @ torch.randn(8, inp, generator=g) + 0.3 * torch.randn(out, inp, generator=g)
    X = torch.randn(tokens, inp, generator=g) * torch.linspace(2, 0.2, inp)
    return W.to(device), LinearStats.from_inputs(X.to(device))


def _learn(device):
    W, stats = _layer(device)
    Y = (torch.linalg.cholesky(stats.gram).T @ W.T.double()).float()  # (in, out) whitened, as CoSpaDi sees it
    D0 = init_dictionary(Y, 20, Init.RANDOM_COLUMNS, 0)
    with Recorder() as rec:
        learn_dictionary(Y, D0, 10, iters=2, power_iters=2, tol=None, coder=SparseCoder.HTP,
                         dict_update=DictUpdateRule.MOD)
    return rec.ops


def _rocket(device):
    W, stats = _layer(device)
    svd = whitened_svd(W, stats)
    spec = RocketSpec(target=Ratio(0.3))
    size = rocket_size(0.3, spec.ks, W.shape[1], W.shape[0], spec.store, torch.bfloat16)
    with Recorder() as fac_ops:
        factorize(svd, size.k, *keep_counts(size, W.shape[0], spec), spec.lam)
    with Recorder() as all_ops:
        rocket(W, stats, spec, torch.bfloat16)
        profile_layer(W, stats, [spec], (0.3,), torch.bfloat16, ks_grid=(1.0, 2.0))
    return fac_ops.ops, all_ops.ops


def _products_in_float32(ops):
    return [o for o in ops if o[0] in PRODUCTS and not set(o[3]) <= {torch.float32, torch.bfloat16}]


def test_recorder_sees_the_loops_products_on_cpu():
    ops = _learn("cpu")
    assert any(o[0] in PRODUCTS for o in ops) and {o[1] for o in ops} == {"cpu"}
    assert not _products_in_float32(ops)  # the dictionary-learning loop multiplies in float32 / bf16 only
    # HTP's CG steps: bf16 exactly where this CPU multiplies it natively (device.low_precision), else float32
    native = low_precision(torch.device("cpu")) is torch.bfloat16
    assert any(o[0] in PRODUCTS and torch.bfloat16 in o[3] for o in ops) == native
    fac, _ = _rocket("cpu")
    assert any(o[0] in PRODUCTS for o in fac) and not _products_in_float32(fac)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cospadi_and_rocket_loops_stay_on_the_gpu_in_float32():
    ops = _learn("cuda")
    assert {o[1] for o in ops} == {"cuda"}, sorted({o[0] for o in ops if o[1] != "cuda"})
    assert not _products_in_float32(ops)
    fac, everything = _rocket("cuda")
    assert not _products_in_float32(fac)
    strays = sorted({o[0] for o in everything if o[1] != "cuda"})
    assert not strays, strays
