"""Benchmark the quantized-weight kernels; prints the device, the method and a markdown table.

GPU (when CUDA is available and --cpu-only is not given):
- copy bandwidth: `dst.copy_(src)` of a 1 GiB buffer (bytes read + written per second): the reference;
- dequantize (Triton): GB/s of bytes read (packed indices, group ids, codebooks) + written (fp16 weight),
  and its % of the copy bandwidth;
- fused dequant-GEMV (Triton) at batch 1 vs fp16 `F.linear` (cuBLAS): time per call, the speed-up, and the
  fused kernel's bytes read (packed, group ids, x) + written (y) per second as % of the copy bandwidth;
  also dequantize + F.linear, and batch 16.
  Default shapes 4096x4096 and 8192x8192 at 2, 3 and 4 bits, 64 codebook groups given as a group id per row
  (the layout `codebook_kernel_args` produces). Each timing replays a CUDA graph over enough copies of the
  operands to overflow L2 (so bytes come from HBM), median of --repeats replays.
  --sweep also times alternative tile configurations and lookups and reports the fastest.
CPU (always, or alone with --cpu-only): the torch path (`dequantize_torch`, the table-driven decode) and the
reference, and `quantized_linear` on CPU (dequantize + F.linear) vs F.linear with a cached dense weight,
on small shapes; best of --repeats.

    python tools/bench_kernels.py                 # GPU + CPU when there is a GPU, else CPU only
    python tools/bench_kernels.py --cpu-only
    python tools/bench_kernels.py --sweep --shapes 4096x4096 --bits 2
    python tools/bench_kernels.py --cpu-only --threads 1   # the CPU figures of docs/BENCHMARKS.md "Kernels"

Inputs: none (random weights and indices). Seeds: torch, numpy and random are seeded with 0 before anything
is made; the quantized operands come from their own seeded generators. The report starts with the command,
torch, the device and the thread count.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.kernels.reference import dequantize_ref, packed_cols  # noqa: E402
from compress.kernels.torch_dequant import dequantize_torch  # noqa: E402

Row = dict[str, str]  # speed-up: vs fp16 F.linear (GPU) or the cached dense fp32 F.linear (CPU), same batch
L2_OVERFLOW_BYTES = 256 * 2 ** 20  # operands cycled per timing: well past an H100/H200's 50-60 MB L2


def random_quantized(rows: int, cols: int, bits: int, num_groups: int, device: str, seed: int = 0) -> dict:
    """Random packed indices, fp16 codebooks and a group id per row, on `device` (packed directly: no unpack)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    packed = torch.randint(0, 256, (rows, packed_cols(cols, bits)), generator=gen, device=device,
                           dtype=torch.uint8)
    # random bytes are valid packed rows: bits past `cols` in a plane's last byte are never decoded
    codebooks = torch.randn(num_groups, 1 << bits, generator=gen, device=device).half()
    groups = torch.randint(0, num_groups, (rows,), generator=gen, device=device, dtype=torch.int32)
    return {"packed": packed, "codebooks": codebooks, "bits": bits, "cols": cols, "groups": groups}


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ----------------------------------------------------------------------------------------------------- GPU


def gpu_time(make_call: Callable[[int], Callable[[], object]], copies: int, repeats: int) -> float:
    """Seconds per call: a CUDA graph calls make_call(i)() for each copy i; median over `repeats` replays."""
    calls = [make_call(i) for i in range(copies)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles, autotunes cuBLAS) outside the graph
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / copies)
    return statistics.median(times)


def copies_for(bytes_per_copy: int) -> int:
    return max(2, min(256, -(-L2_OVERFLOW_BYTES // max(bytes_per_copy, 1))))


def copy_bandwidth(repeats: int) -> float:
    """Bytes read + written per second by dst.copy_(src) of 1 GiB."""
    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = gpu_time(lambda i: (lambda: dst.copy_(src)), 1, repeats)
    del src, dst
    return 2 * 2 ** 30 / seconds


SWEEP_LINEAR = [{"block_r": r, "block_c": c, "num_warps": w, "stages": s}
                for r, c in ((4, 512), (8, 512), (16, 512), (4, 1024), (8, 1024), (16, 256), (32, 256))
                for w in (4, 8) for s in (2, 3, 4)]
SWEEP_DEQUANT = [{"block_r": r, "block_c": c, "num_warps": w, "stages": s}
                 for r, c in ((2, 1024), (4, 512), (4, 1024), (8, 256), (8, 512), (16, 256))
                 for w in (4, 8) for s in (1, 3)]


def row(shape: str, bits: str, method: str, seconds: float | None, moved: int | None = None,
        copy_bw: float | None = None, weights: int | None = None, speedup: str = "-") -> Row:
    """A table row: time, bytes moved per second (and % of the copy bandwidth), weights per second."""
    unit = (1e6, "us") if seconds is not None and seconds < 1e-3 else (1e3, "ms")
    return {"shape": shape, "bits": bits, "method": method,
            "time": f"{seconds * unit[0]:.1f} {unit[1]}" if seconds else "-",
            "GB/s": f"{moved / seconds / 1e9:.1f}" if moved and seconds else "-",
            "% of copy": f"{100 * moved / seconds / copy_bw:.0f}" if moved and seconds and copy_bw else "-",
            "Gweights/s": f"{weights / seconds / 1e9:.3g}" if weights and seconds else "-", "speed-up": speedup}


def bench_gpu(shapes: list[tuple[int, int]], bits_list: list[int], groups: int, repeats: int, sweep: bool) -> list[Row]:
    from compress.kernels.triton_common import LOOKUPS
    from compress.kernels.triton_dequant import dequantize_triton
    from compress.kernels.triton_gemv import quantized_linear_triton

    copy_bw = copy_bandwidth(repeats)
    out_rows = [row("1 GiB", "-", "copy_ (the reference bandwidth)", 2 * 2 ** 30 / copy_bw, 2 * 2 ** 30, copy_bw)]
    print(f"measured copy bandwidth: {copy_bw / 1e9:.0f} GB/s", flush=True)
    for rows, cols in shapes:
        label, n_weights = f"{rows}x{cols}", rows * cols
        dense_bytes = n_weights * 2
        n_dense = copies_for(dense_bytes)
        weights = [torch.randn(rows, cols, device="cuda", dtype=torch.float16) for _ in range(n_dense)]
        x1 = torch.randn(1, cols, device="cuda", dtype=torch.float16)
        x16 = torch.randn(16, cols, device="cuda", dtype=torch.float16)
        t_fp16 = gpu_time(lambda i: (lambda: F.linear(x1, weights[i])), n_dense, repeats)
        t_fp16_16 = gpu_time(lambda i: (lambda: F.linear(x16, weights[i])), n_dense, repeats)
        out_rows.append(row(label, "16", "F.linear fp16 (cuBLAS), batch 1", t_fp16, dense_bytes, copy_bw, n_weights,
                            "1.00x"))
        out_rows.append(row(label, "16", "F.linear fp16 (cuBLAS), batch 16", t_fp16_16, dense_bytes, copy_bw,
                            n_weights, "1.00x"))
        del weights
        for bits in bits_list:
            qs = [random_quantized(rows, cols, bits, groups, "cuda", seed=i)
                  for i in range(copies_for(rows * packed_cols(cols, bits)))]
            n = len(qs)
            q_bytes = nbytes(qs[0]["packed"], qs[0]["groups"], qs[0]["codebooks"])
            out = torch.empty(rows, cols, device="cuda", dtype=torch.float16)

            def dequant(cfg: dict) -> float:
                return gpu_time(lambda i: (lambda: dequantize_triton(**qs[i], out=out, **cfg)), n, repeats)

            def fused(x: torch.Tensor, cfg: dict) -> float:
                return gpu_time(lambda i: (lambda: quantized_linear_triton(x, **qs[i], **cfg)), n, repeats)

            t_dq = dequant({})
            dq_bytes = q_bytes + dense_bytes
            out_rows.append(row(label, str(bits), "dequantize (Triton) -> fp16", t_dq, dq_bytes, copy_bw, n_weights))
            lin_bytes = q_bytes + nbytes(x1) + rows * 2
            t_f = fused(x1, {})
            out_rows.append(row(label, str(bits), "fused GEMV (Triton), batch 1", t_f, lin_bytes, copy_bw, n_weights,
                                f"{t_fp16 / t_f:.2f}x"))
            t_f16 = fused(x16, {})
            out_rows.append(row(label, str(bits), "fused GEMM (Triton), batch 16", t_f16,
                                q_bytes + nbytes(x16) + 16 * rows * 2, copy_bw, n_weights, f"{t_fp16_16 / t_f16:.2f}x"))
            t_dl = gpu_time(lambda i: (lambda: F.linear(x1, dequantize_triton(**qs[i], out=out))), n, repeats)
            out_rows.append(row(label, str(bits), "dequantize + F.linear, batch 1", t_dl,
                                speedup=f"{t_fp16 / t_dl:.2f}x"))
            print(f"{label} {bits} bits: dequantize {t_dq * 1e6:.1f} us, fused {t_f * 1e6:.1f} us "
                  f"(fp16 {t_fp16 * 1e6:.1f} us)", flush=True)
            if sweep:
                out_rows += sweep_rows(label, bits, dequant, fused, x1, (t_dq, dq_bytes), (t_f, lin_bytes),
                                       copy_bw, t_fp16, n_weights, list(LOOKUPS))
            del qs, out
        torch.cuda.empty_cache()
    return out_rows


def sweep_rows(label: str, bits: int, dequant: Callable, fused: Callable, x1: torch.Tensor,
               dq: tuple[float, int], lin: tuple[float, int], copy_bw: float, t_fp16: float, n_weights: int,
               lookups: list[str]) -> list[Row]:
    """Fastest of SWEEP_* x every lookup valid at `bits` (configurations that fail to compile are named, skipped)."""
    valid = [lk for lk in lookups if not (lk == "select" and bits > 3) and not (lk == "gather" and bits < 3)]
    best = {"dequantize": (dq[0], "defaults"), "fused": (lin[0], "defaults")}
    for lookup in valid:
        for kind, configs in (("dequantize", SWEEP_DEQUANT), ("fused", SWEEP_LINEAR)):
            for cfg in configs:
                cfg = {**cfg, "lookup": lookup}
                try:
                    t = dequant(cfg) if kind == "dequantize" else fused(x1, cfg)
                except Exception as exc:  # noqa: BLE001 - a configuration that does not compile is reported
                    print(f"  {kind} {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}", flush=True)
                    continue
                if t < best[kind][0]:
                    best[kind] = (t, ", ".join(f"{k}={v}" for k, v in cfg.items()))
    t, cfg = best["dequantize"]
    out = [row(label, str(bits), f"dequantize, best of sweep ({cfg})", t, dq[1], copy_bw, n_weights)]
    t, cfg = best["fused"]
    out.append(row(label, str(bits), f"fused GEMV batch 1, best of sweep ({cfg})", t, lin[1], copy_bw, n_weights,
                   f"{t_fp16 / t:.2f}x"))
    return out


# ----------------------------------------------------------------------------------------------------- CPU


def cpu_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_cpu(shapes: list[tuple[int, int]], bits_list: list[int], groups: int, repeats: int) -> list[Row]:
    out_rows: list[Row] = []
    for rows, cols in shapes:
        label, n_weights = f"{rows}x{cols}", rows * cols
        dense = torch.randn(rows, cols)
        x = torch.randn(1, cols)
        t_dense = cpu_time(lambda: F.linear(x, dense), repeats)
        out_rows.append(row(label, "32", "F.linear fp32, cached dense weight, batch 1", t_dense, n_weights * 4,
                            weights=n_weights, speedup="1.00x"))
        for bits in bits_list:
            q = random_quantized(rows, cols, bits, groups, "cpu")
            io_bytes = nbytes(q["packed"], q["groups"], q["codebooks"]) + n_weights * 2
            for name, fn in (("dequantize_torch (the CPU path) -> fp16", dequantize_torch),
                             ("dequantize_ref (reference) -> fp16", dequantize_ref)):
                t = cpu_time(lambda fn=fn: fn(**q, dtype=torch.float16), repeats)
                out_rows.append(row(label, str(bits), name, t, io_bytes, weights=n_weights))
            t = cpu_time(lambda: F.linear(x, dequantize_torch(**q, dtype=torch.float32)), repeats)
            out_rows.append(row(label, str(bits), "dequantize_torch + F.linear fp32, batch 1 (uncached)", t,
                                weights=n_weights, speedup=f"{t_dense / t:.2f}x"))
    return out_rows


# ----------------------------------------------------------------------------------------------------- main


def table(rows: list[Row]) -> str:
    head = ["shape", "bits", "method", "time", "GB/s", "% of copy", "Gweights/s", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]
    return "\n".join(lines)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        rows, cols = item.lower().split("x")
        out.append((int(rows), int(cols)))
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU part even when CUDA is available")
    parser.add_argument("--shapes", default="4096x4096,8192x8192", help="GPU shapes, rows x cols")
    parser.add_argument("--cpu-shapes", default="1024x1024,2048x2048", help="CPU shapes, rows x cols")
    parser.add_argument("--bits", default="2,3,4", help="bit widths")
    parser.add_argument("--groups", type=int, default=64, help="codebook groups (a group id per row)")
    parser.add_argument("--repeats", type=int, default=20, help="GPU: median of; CPU: best of (CPU uses 1/4)")
    parser.add_argument("--sweep", action="store_true", help="GPU: also time alternative tiles and lookups")
    parser.add_argument("--threads", type=int, help="CPU: torch threads (default: torch's choice; 1 is steadier "
                        "on a shared machine, where spinning OpenMP threads make timings erratic)")
    parser.add_argument("--out", type=Path, help="also write the table(s) here")
    args = parser.parse_args(argv)
    from accelerate.utils import set_seed

    set_seed(0)  # the dense operands (torch.randn) too
    bits_list = [int(b) for b in args.bits.split(",")]
    report = [f"command: python tools/bench_kernels.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
              f"torch {torch.__version__}, seed 0"]
    on_gpu = torch.cuda.is_available() and not args.cpu_only
    if on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "0")
        import triton

        props = torch.cuda.get_device_properties(0)
        report.append(f"device: {props.name} ({props.total_memory / 2 ** 30:.0f} GiB, {props.multi_processor_count} "
                      f"SMs), triton {triton.__version__}")
        report.append("method: CUDA-graph replay over enough operand copies to overflow L2; median of "
                      f"{args.repeats}; {args.groups} codebook groups (group id per row), fp16 x and weight")
        print("\n".join(report), flush=True)
        gpu_rows = bench_gpu(parse_shapes(args.shapes), bits_list, args.groups, args.repeats, args.sweep)
        report += ["", "GPU", "", table(gpu_rows)]
    else:
        report.append("no CUDA device (or --cpu-only): GPU part skipped")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    report.append("")
    report.append(f"CPU: {cpu_name()}, {threads} torch threads; torch path; best of {max(3, args.repeats // 4)}")
    cpu_rows = bench_cpu(parse_shapes(args.cpu_shapes), bits_list, args.groups, max(3, args.repeats // 4))
    report += ["", table(cpu_rows)]
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
