"""Ahead-of-time compilation of the kernels for a CUDA target, without a GPU.

``python -m vflow.kernels._aot [arch] [--quick | --candidates]`` compiles every kernel variant
(fp32 and fp64, every pattern, forward / both backward modes / Newton and bisection inverse,
the tile shapes the launchers use; with ``--candidates`` the coupling kernels at every tile
the tile tuning of ``_tuning.py`` may choose) down to a cubin for ``sm_<arch>`` (default 90)
with Triton's bundled ptxas, and prints one line per kernel with its registers per thread
and spilled bytes (``ptxas -v``); it exits 1 if a kernel spills more than
``SPILL_TOLERANCE_BYTES``. It catches compile errors that
the interpreter does not (type of loop-carried values, layouts, 1-wide tiles) on a machine
without a GPU.
TRITON_INTERPRET must be unset: the interpreter replaces the kernels by Python functions.
"""

from __future__ import annotations

import argparse
import time

from . import _tuning as tuning

_SCALARS = dict(
    B="i32",
    N="i32",
    K="i32",
    H="i32",
    W="i32",
    parity="i32",
    stride_xb="i64",
    stride_pb="i64",
    NUM_NB="i32",
    max_iters="i32",
    total="i64",
    CN="i64",
    C="i32",
)
_FWD_PTRS = {"x_ptr", "p_ptr", "y_ptr", "part_ptr"}
_BWD_PTRS = {"x_ptr", "p_ptr", "go_ptr", "gl_ptr", "gi_ptr", "gp_ptr"}
_INV_PTRS = {"y_ptr", "p_ptr", "x_ptr", "part_ptr"}


#: Spilled bytes per kernel that ``main`` accepts: at 48-128 registers ptxas spills 4-16
#: bytes in a few coupling variants (float32 and float64 inverses, the float32 backward, at
#: 256 x 1, 16 x 16 and 1 x 256 tiles); anything more fails, such as the layer norm's 48-440
#: bytes at 255 registers before ``_net.ln_warps``, or the 60-76 bytes of float64 tiles of 4
#: elements per thread (``_tuning.FLOAT64_MAX_PER_THREAD``).
SPILL_TOLERANCE_BYTES = 16


def spill_bytes(line: str) -> int:
    """The spilled bytes of one of :class:`_Builder`'s lines."""
    import re

    return int(re.search(r"(\d+) bytes spilled", line).group(1))


def ptxas_usage(ptx: str, arch: int, fp_fusion: bool = True) -> tuple[int, int]:
    """(registers per thread, bytes of spill stores) of a kernel's PTX, from ``ptxas -v`` of
    Triton's bundled ptxas for ``sm_<arch>`` (the options Triton compiles with; without
    ``fp_fusion``, ``--fmad=false``)."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2"]
        cmd += [] if fp_fusion else ["--fmad=false"]
        cmd += [f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", f"{src}.o"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output: {log[-500:]}")
    return int(regs.group(1)), int(spills.group(1))


class _Builder:
    """Compiles kernel variants for one GPU target and collects a line per kernel."""

    def __init__(self, arch: int, verbose: bool):
        import triton
        from triton.backends.compiler import GPUTarget

        from . import _coupling as c

        if not isinstance(c._fwd_kernel, triton.runtime.jit.JITFunction) or hasattr(
            c._fwd_kernel, "interpreter_builder"
        ):
            raise RuntimeError("unset TRITON_INTERPRET to compile the kernels ahead of time")
        self.target = GPUTarget("cuda", arch, 32)
        self.verbose = verbose
        self.done: list[str] = []

    def __call__(self, fn, ptr_names, ptr_type, constexprs, name, num_warps=tuning.NUM_WARPS):
        import triton
        from triton.compiler import ASTSource

        signature = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg in ptr_names:
                signature[arg] = ptr_type
            else:
                signature[arg] = _SCALARS[arg]
        src = ASTSource(
            fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}
        )
        start = time.perf_counter()
        kernel = triton.compile(src, target=self.target, options={"num_warps": num_warps})
        assert kernel.asm.get("cubin"), name
        regs, spills = ptxas_usage(
            kernel.asm["ptx"], self.target.arch, kernel.metadata.enable_fp_fusion
        )
        line = (
            f"{name}: ok ({time.perf_counter() - start:.1f}s, {regs} registers, "
            f"{spills} bytes spilled, shared {kernel.metadata.shared})"
        )
        self.done.append(line)
        if self.verbose:
            print(line, flush=True)


def _build_coupling_kernels(build: _Builder, dt: str, pattern: int, tile: tuple, num_warps: int):
    """The coupling's five kernels (forward, backward of the forward and of the inverse, Newton
    and bisection inverse) for one dtype, pattern and (BLOCK_B, BLOCK_N) tile."""
    from . import _coupling as c

    ptr = f"*{dt}"
    tiny = 1.1920928955078125e-07 if dt == "fp32" else 2.220446049250313e-16
    cfg = dict(SMOOTH=True, PATTERN=pattern, BLOCK_B=tile[0], BLOCK_N=tile[1])
    tag = f"{dt} pattern={pattern} tile={tile[0]}x{tile[1]} warps={num_warps}"
    build(c._fwd_kernel, _FWD_PTRS, ptr, cfg, f"fwd {tag}", num_warps)
    for inverse in (False, True):
        build(
            c._bwd_kernel,
            _BWD_PTRS,
            ptr,
            dict(cfg, INVERSE=inverse),
            f"bwd inverse={inverse} {tag}",
            num_warps,
        )
    for newton in (False, True):
        build(
            c._inv_kernel,
            _INV_PTRS,
            ptr,
            dict(cfg, NEWTON=newton, TINY=tiny),
            f"inv newton={newton} {tag}",
            num_warps,
        )


def compile_all(
    arch: int = 90,
    dtypes=("fp32", "fp64"),
    patterns=(0, 1, 2),
    tiles=((1, 256), (256, 1), (16, 16)),
    verbose: bool = True,
) -> list[str]:
    """Every coupling kernel for each dtype, pattern and tile (at the default warps), and the
    networks' kernels; returns a line per kernel."""
    build = _Builder(arch, verbose)
    for dt in dtypes:
        for pattern in patterns:
            for tile in tiles:
                _build_coupling_kernels(build, dt, pattern, tile, tuning.NUM_WARPS)
        _build_net_kernels(build, f"*{dt}", dt)
    return build.done


def compile_candidates(arch: int = 90, verbose: bool = True) -> list[str]:
    """The coupling kernels (checkerboard) at every tile that tuning may choose
    (``_tuning.candidates``): float32 and float64 at a 1 x block tile (large N) and float32
    at a (block / 16) x 16 tile (N of 16 or less), each on its candidate's warps; returns a
    line per kernel."""
    import torch

    build = _Builder(arch, verbose)
    for block, num_warps in tuning.candidates(torch.float32):
        _build_coupling_kernels(build, "fp32", 1, (1, block), num_warps)
        _build_coupling_kernels(build, "fp32", 1, (block // 16, 16), num_warps)
    for block, num_warps in tuning.candidates(torch.float64):
        _build_coupling_kernels(build, "fp64", 1, (1, block), num_warps)
    return build.done


def _build_net_kernels(build, ptr: str, dt: str) -> None:
    """The networks' kernels (_net.py): the elementwise ones at their block, the layer norm
    at the tiles of a few channel counts (1, 96: a CIFAR net, 1024: the largest)."""
    from . import _net as n

    block = dict(BLOCK_SIZE=n.BLOCK)
    build(n._concat_elu_fwd_kernel, {"x_ptr", "y_ptr"}, ptr, block, f"concat_elu fwd {dt}")
    build(
        n._concat_elu_bwd_kernel, {"x_ptr", "gy_ptr", "gx_ptr"}, ptr, block, f"concat_elu bwd {dt}"
    )
    build(n._gated_residual_fwd_kernel, {"x_ptr", "h_ptr", "y_ptr"}, ptr, block, f"gres fwd {dt}")
    build(n._gated_residual_bwd_kernel, {"h_ptr", "gy_ptr", "gh_ptr"}, ptr, block, f"gres bwd {dt}")
    for channels in (1, 96, n.MAX_CHANNELS):
        block_c, block_n, _ = n._ln_grid(1, channels, 1 << 20, None)
        tile = dict(BLOCK_C=block_c, BLOCK_N=block_n)
        warps = n.ln_warps(block_c, block_n)
        tag = f"{dt} tile={block_c}x{block_n} warps={warps}"
        fwd_ptrs = {"x_ptr", "w_ptr", "b_ptr", "y_ptr", "mean_ptr", "rstd_ptr", "eps_ptr"}
        build(n._layer_norm_fwd_kernel, fwd_ptrs, ptr, tile, f"layer_norm fwd {tag}", warps)
        bwd_ptrs = {"x_ptr", "w_ptr", "mean_ptr", "rstd_ptr", "gy_ptr", "gx_ptr", "part_ptr"}
        build(n._layer_norm_bwd_kernel, bwd_ptrs, ptr, tile, f"layer_norm bwd {tag}", warps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vflow.kernels._aot",
        description="Compile every Triton kernel variant for sm_<arch> without a GPU.",
    )
    parser.add_argument("arch", nargs="?", type=int, default=90, help="CUDA arch (default 90)")
    parser.add_argument("--quick", action="store_true", help="only the riskiest variants")
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="the coupling kernels at every tile the tile tuning may choose (fp32 checkerboard)",
    )
    args = parser.parse_args(argv)
    if args.candidates:
        lines = compile_candidates(args.arch)
    elif args.quick:  # the variants most likely to break: 1-wide tiles, float64, checkerboard
        lines = compile_all(args.arch, dtypes=("fp32",), patterns=(1,), tiles=((1, 256), (256, 1)))
        lines += compile_all(args.arch, dtypes=("fp64",), patterns=(2,), tiles=((16, 16),))
    else:
        lines = compile_all(args.arch)
    spilled = [spill_bytes(line) for line in lines]
    print(
        f"{len(lines)} kernels compiled for sm_{args.arch}: {sum(b > 0 for b in spilled)} spill "
        f"registers, at most {max(spilled)} bytes"
    )
    over = [line for line, b in zip(lines, spilled, strict=True) if b > SPILL_TOLERANCE_BYTES]
    if over:
        raise SystemExit("kernels that spill more than the tolerance:\n" + "\n".join(over))


if __name__ == "__main__":
    main()
