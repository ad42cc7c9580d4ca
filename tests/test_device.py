"""--device and the GPU workers' kernel self-check, without a GPU.

The self-check (selfcheck.self_check) needs no Ray: it runs here on the CPU with the torch ops as the kernel under
test and the C kernel as the reference, and with kernels injected that write one wrong byte (or get rounding,
subnormals, NaN or overflow wrong), which it must catch. On Ray, one embedded instance for the module declares
one GPU that is not there (Ray takes num_gpus at its word): with --device auto the worker is a GPU worker
whose CUDA cannot start, which must end the merge with one line naming the node and the GPU; --device cpu on
that cluster must never ask for the GPU. A CPU worker told to self-check with a faulty kernel (both passed
through the actor's constructor: Scheduler(worker_args=...), which the test puts in place of merge.Scheduler)
stands in for a GPU whose kernel writes a wrong byte.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from clusters import embedded_ray

from expo_dist import merge
from expo_dist.cli import main
from expo_dist.errors import ExpoError
from expo_dist.runtime import kernel as kernel_mod
from expo_dist.runtime import selfcheck
from expo_dist.runtime.kernel import Kernel
from expo_dist.runtime.scheduler import Scheduler, placement
from expo_dist.runtime.selfcheck import KernelCheckFailed, check_cases, self_check
from expo_dist.testing.reference import assert_exact

ALPHA = 0.3
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}


# ---- the self-check on its own (no Ray) ----

def flipping_kernel(out_dtype: str, element: int, bit: int = 0):
    """A Kernel (torch ops on the CPU) that flips one bit of one output element of the first case whose
    output is out_dtype, and is right everywhere else."""

    class Flip(Kernel):
        done = False

        def extrapolate_raw(self, a_raw, a_dtype, s_raw, s_dtype, outs_raw, o_dtype, alphas):
            res = super().extrapolate_raw(a_raw, a_dtype, s_raw, s_dtype, outs_raw, o_dtype, alphas)
            if o_dtype == out_dtype and not Flip.done:
                Flip.done = True
                outs_raw[0][element * ITEMSIZE[o_dtype]] ^= 1 << bit
            return res

    return Flip("cpu", use_c=False)


def test_self_check_passes_the_right_kernel_on_a_few_thousand_elements_per_dtype(monkeypatch):
    cases = check_cases()
    per_dtype = {}
    for _name, a_dt, a_raw, _, _, out_dt, _ in cases:
        per_dtype[out_dt] = per_dtype.get(out_dt, 0) + a_raw.size // ITEMSIZE[a_dt]
    assert set(per_dtype) == {"BF16", "F16", "F32", "F64"} and min(per_dtype.values()) >= 3000, per_dtype
    assert {c[6] for c in cases} >= {0.5, 0.5 + 2.0 ** -30}  # ties, and just past them (double rounding)
    rep = self_check("cpu")  # the torch ops against the C kernel (where built)
    assert rep["elements"] == sum(per_dtype.values()) and rep["cases"] == len(cases)
    # no C kernel (Settings.kernel "torch"): the torch ops on the CPU are the reference
    assert self_check("cpu", use_c=False)["reference"] == "torch ops on the CPU"


@pytest.mark.parametrize("out_dtype,element,bit", [("BF16", 0, 0), ("F16", 77, 3), ("F32", 1500, 7),
                                                    ("F64", 123, 1)])
def test_self_check_fires_on_one_wrong_byte(out_dtype, element, bit):
    with pytest.raises(KernelCheckFailed) as e:
        self_check("cpu", kernel=flipping_kernel(out_dtype, element, bit))
    err = e.value
    assert err.out_dtype == out_dtype and err.index == element and err.differ == 1
    assert len(err.got) == len(err.expected) == ITEMSIZE[out_dtype]
    assert err.got[0] ^ err.expected[0] == 1 << bit and err.got[1:] == err.expected[1:]
    msg = str(err)
    assert "\n" not in msg and f"element {element} " in msg and out_dtype in msg and "1 of " in msg


def test_self_check_fires_on_a_wrong_count_of_nonfinite_values():
    class Miscount(Kernel):
        def extrapolate_raw(self, *args):
            bad_out, bad_in = super().extrapolate_raw(*args)
            return bad_out + 1, bad_in

    with pytest.raises(KernelCheckFailed, match="non-finite outputs"):
        self_check("cpu", kernel=Miscount("cpu", use_c=False))


class DoubleRounding(Kernel):  # float64 -> float32 -> bf16/f16: what torch's own .to() does
    def round_into(self, r, out, scratch):
        out.copy_(r if out.dtype == torch.float64 else r.to(torch.float32))


class FlushToZero(Kernel):  # subnormal outputs flushed to zero (fast-math GPU code)
    def round_into(self, r, out, scratch):
        super().round_into(r, out, scratch)
        out.masked_fill_((out.abs() < torch.finfo(out.dtype).tiny) & (out != 0), 0.0)


class RawNaN(Kernel):  # NaNs written with whatever sign and payload the arithmetic gave
    def extrapolate(self, a, s, alpha, out):
        x = a.double()
        y = x + (x - s.double()) * alpha
        self.round_into(y, out, scratch=torch.empty_like(y))
        return int((~torch.isfinite(out)).sum())


class Saturating(Kernel):  # overflow clamped to the largest finite value instead of inf
    def round_into(self, r, out, scratch):
        super().round_into(r, out, scratch)
        if out.dtype != torch.float64:
            out.masked_fill_(torch.isinf(out) & ~torch.isinf(r), torch.finfo(out.dtype).max)


class Float32Math(Kernel):  # a + alpha (a - s) in float32
    def extrapolate(self, a, s, alpha, out):
        x = a.float()
        out.copy_(x + (x - s.float()) * alpha)
        out.masked_fill_(torch.isnan(out), float("nan"))
        return int((~torch.isfinite(out)).sum())


@pytest.mark.parametrize("cls", [DoubleRounding, FlushToZero, RawNaN, Saturating, Float32Math],
                         ids=lambda c: c.__name__)
def test_self_check_catches_kernels_that_round_wrong(cls):
    with pytest.raises(KernelCheckFailed):
        self_check("cpu", kernel=cls("cpu", use_c=False))


def test_self_check_ties_cases_alone_catch_double_rounding():
    """The ties cases (a, s in the output dtype, one ulp apart, alpha 0.5 + 2^-30: what a merge computes)
    catch double rounding by themselves, without the float64-input rounding cases."""
    ties = [c for c in check_cases() if c[0].endswith("ties") and c[6] == 0.5 + 2.0 ** -30 and c[5] != "F32"]
    assert len(ties) == 2
    for case in ties:
        with pytest.raises(KernelCheckFailed) as e:
            self_check("cpu", kernel=DoubleRounding("cpu", use_c=False), cases=[case])
        assert e.value.differ > 100


# ---- --device: where workers go ----

def test_placement():
    gpu_cluster = {"CPU": 64.0, "GPU": 8.0}
    assert placement("auto", gpu_cluster, None) == ("cuda", 8, {"num_gpus": 1, "num_cpus": 0})
    assert placement("cuda", gpu_cluster, 3) == ("cuda", 3, {"num_gpus": 1, "num_cpus": 0})
    assert placement("cpu", gpu_cluster, None) == ("cpu", 64, {"num_cpus": 1})  # never a GPU
    assert placement("cpu", gpu_cluster, 100) == ("cpu", 100, {"num_cpus": 0})
    assert placement("auto", {"CPU": 4.0}, None) == ("cpu", 4, {"num_cpus": 1})
    with pytest.raises(ExpoError) as e:
        placement("cuda", {"CPU": 4.0}, None)
    msg = str(e.value)
    assert "\n" not in msg and "no GPU" in msg and "--device cpu" in msg and "auto" in msg
    with pytest.raises(ExpoError, match="auto, cuda or cpu"):
        placement("gpu", gpu_cluster, None)


def test_failure_line_names_node_and_gpu(monkeypatch):
    import ray

    from expo_dist.runtime import worker

    monkeypatch.setattr(worker.socket, "gethostname", lambda: "gpu-node-7")
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.7")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [5])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA H200")
    with pytest.raises(KernelCheckFailed) as e:
        self_check("cpu", kernel=flipping_kernel("BF16", 9))
    line = worker.device_failure(e.value, "cuda:0", "running the kernel self-check")
    assert line.startswith("GPU 5 (NVIDIA H200) on node gpu-node-7 (10.0.0.7) failed the kernel self-check: BF16")
    assert "element 9 " in line and line.count("--device cpu") == 1 and "\n" not in line
    line = worker.device_failure(RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA "
                                              "kernel errors might be asynchronously reported"), "cuda:0", "task 3")
    assert "\n" not in line and "GPU 5 (NVIDIA H200) on node gpu-node-7 (10.0.0.7)" in line
    assert "(task 3): RuntimeError: CUDA error: an illegal memory access" in line and "--device cpu" in line


# ---- on Ray: a cluster that says it has a GPU ----

@pytest.fixture(scope="module")
def fake_gpu_ray():
    """One embedded Ray for the module with one GPU that is not there."""
    with embedded_ray(num_cpus=2, num_gpus=1) as ray:
        yield ray


@pytest.fixture(scope="module")
def pair(pair_factory):
    return pair_factory(hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                        vocab_size=512, sft_shard_bytes=200_000, aligned_shard_bytes=150_000, seed=4)


def merge_argv(pair, out) -> list[str]:
    return ["merge", "--sft", str(pair[0]), "--aligned", str(pair[1]), "--alpha", str(ALPHA), "--out", str(out),
            "-q", "--max-task-bytes", "1MiB", "--max-shard-size", "300KB"]


def use_scheduler(monkeypatch, **kw):
    """merge.run's Scheduler, with these keyword arguments (device, worker_args) put in."""
    def scheduler(*args, **kwargs):
        return Scheduler(*args, **{**kwargs, **kw})

    monkeypatch.setattr(merge, "Scheduler", scheduler)


def one_error_line(capfd) -> str:
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("expo-dist: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def looks_complete(out) -> bool:
    return any((out / f).exists() for f in ("model.safetensors.index.json", "model.safetensors",
                                            "expo_manifest.json"))


def test_auto_on_a_gpu_that_cannot_start_fails_with_one_line(fake_gpu_ray, pair, tmp_path, capfd):
    """--device auto on a cluster with a GPU: the worker is a GPU worker, and its CUDA cannot start here."""
    out = tmp_path / "out"
    assert main(merge_argv(pair, out)) == 1
    line = one_error_line(capfd)
    node = f"node {socket.gethostname()} ({fake_gpu_ray.util.get_node_ip_address()})"
    assert line.startswith(f"expo-dist: error: GPU 0 (name unknown) on {node} cannot run the merge kernel "
                           "(starting CUDA): "), line
    assert line.endswith("; rerun with --device cpu (the CPU kernel writes the exact bytes, more slowly)")
    assert not looks_complete(out)


def test_cpu_on_a_gpu_cluster_never_asks_for_the_gpu(fake_gpu_ray, pair, tmp_path):
    out = tmp_path / "out"
    assert main(merge_argv(pair, out) + ["--device", "cpu"]) == 0
    manifest = json.loads((out / "expo_manifest.json").read_text())
    assert [w["device"] for w in manifest["workers"]] == ["cpu", "cpu"]  # one per CPU; the GPU left alone
    assert not any("self_check" in w for w in manifest["workers"])  # (the C kernel is the reference itself)
    assert manifest["settings"]["device"] == "cpu"
    assert_exact(str(out), str(pair[0]), str(pair[1]), ALPHA, tie=False)


def test_cuda_without_a_gpu_is_one_line(fake_gpu_ray, pair, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(fake_gpu_ray, "cluster_resources", lambda: {"CPU": 2.0})  # this one has no GPU
    out = tmp_path / "out"
    assert main(merge_argv(pair, out) + ["--device", "cuda"]) == 2
    line = one_error_line(capfd)
    assert line == ("expo-dist: error: --device cuda: the Ray cluster has no GPU; use --device cpu (or auto, which "
                    "uses GPUs where there are any) to merge on the CPUs")
    assert not looks_complete(out)


def test_a_worker_whose_self_check_fails_stops_the_merge_with_one_line(fake_gpu_ray, pair, tmp_path, capfd,
                                                                      monkeypatch):
    """The faulty kernel goes to the workers through their constructor (MergeWorker(kernel=...)), pickled by
    value (a class defined in a function); self_check=True makes CPU workers run the check a GPU worker runs."""
    def faulty(device):
        class OneWrongByte(kernel_mod.Kernel):
            def extrapolate_raw(self, a_raw, a_dtype, s_raw, s_dtype, outs_raw, out_dtype, alphas):
                res = super().extrapolate_raw(a_raw, a_dtype, s_raw, s_dtype, outs_raw, out_dtype, alphas)
                if out_dtype == "F16":
                    outs_raw[0][42 * 2 + 1] ^= 0x80  # the sign of element 42
                return res

        return OneWrongByte(device, use_c=False)

    use_scheduler(monkeypatch, device="cpu", worker_args={"self_check": True, "kernel": faulty})
    out = tmp_path / "out"
    assert main(merge_argv(pair, out)) == 1
    line = one_error_line(capfd)
    node = f"node {socket.gethostname()} ({fake_gpu_ray.util.get_node_ip_address()})"
    assert line.startswith(f"expo-dist: error: CPU on {node} failed the kernel self-check: F16 rounding "
                           "(F64, F64 -> F16, alpha 0.0): element 42 "), line
    assert not looks_complete(out)
    # the same kernel without the fault passes its check, merges, and says so in the manifest
    use_scheduler(monkeypatch, device="cpu",
                  worker_args={"self_check": True, "kernel": lambda d: Kernel(d, use_c=False)})
    out = tmp_path / "out2"
    assert main(merge_argv(pair, out)) == 0
    workers = json.loads((out / "expo_manifest.json").read_text())["workers"]
    assert workers and all(w["self_check"]["elements"] > 10_000 for w in workers)
    assert_exact(str(out), str(pair[0]), str(pair[1]), ALPHA, tie=False)


def test_kernel_check_bytes_helpers_round_trip():
    """The cases' bit patterns are what they claim: midpoints between neighbours, NaNs that are NaN."""
    rng = np.random.default_rng(0)
    for dt in ("BF16", "F16", "F32"):
        p = selfcheck._patterns(dt, rng, 500)
        v = selfcheck._values(p, dt)
        assert np.isfinite(v).all() and (v != 0).all()
        nans = selfcheck._values(np.array(selfcheck._nan_patterns(dt), dtype=selfcheck._FMT[dt][2]), dt)
        assert np.isnan(nans).all()
