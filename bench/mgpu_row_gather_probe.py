"""Probe for fusing the MoE dispatch gather into the Hopper BF16 GEMMs (issue 20, item 2): can a Mosaic GPU kernel
on Hopper gather rows by index straight into the swizzled shared-memory tiles WGMMA reads, and how fast?

What Pallas Mosaic GPU offers (jax 0.11.2 and 0.12.1, found by lowering for CUDA on a CPU machine):
- ``copy_gmem_to_smem(x.at[idx_vector], ...)`` lowers to TMA ``tile::gather4`` — Blackwell (sm_100) only;
- there is no non-bulk ``cp.async`` (per-thread 16-byte copies, what Hopper MoE kernels gather with);
- a one-row TMA into a tiled (8, 64) + 128-byte-swizzled tile (the layout WGMMA reads) is refused at lowering
  ("slice start and size divisible by the tile size (8)"); loading GMEM rows into registers at a dynamic row
  fails layout inference;
- a one-row TMA (box [1, 64]) into an *untiled* swizzled buffer [16, 8, 64] lowers (and into a (1, 64)-tiled one),
  but WGMMA takes neither as an operand (layout inference fails on ``reshape(128, 64)`` and on the (1, 64) tiling),
  so a fused gather needs a re-layout through registers per tile. The bytes of that buffer are laid out as the
  tiled (8, 64) + swizzle-128 tile of [128, 64] iff the TMA unit swizzles by shared-memory address (not by row
  within the box) — what this probe checks on the GPU, besides the bandwidth.

The kernel gathers ``x[idx]`` ([M, K] BF16, M a multiple of 128, K of 64) with 128 one-row TMAs per [128, 64] tile
into that buffer and stores the tile back with one [16, 8, 64] TMA (two buffers in flight per CTA, one CTA per SM).
If the result equals ``x[idx]`` the row-TMA gather makes WGMMA-ready tiles, and the bandwidth says whether it can
feed the grouped GEMM's prologue (the forward reads 128 × 64 × 2 B per K step per CTA).

    python bench/mgpu_row_gather_probe.py [--json OUT.json]      # on CPU: tiny shapes in the interpreter
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dsv3_jax.kernels._backend import on_gpu
from dsv3_jax.kernels.fp8_gemm_mgpu import _interpret_params, _mgpu, _num_sms

ROWS, SLAB = 128, 64  # a WGMMA operand tile: 128 rows × 64 BF16 (one 128-byte swizzle row)


def row_gather(x: jax.Array, idx: jax.Array, interpret: bool = False) -> jax.Array:
    """``x[idx]`` ([N, K] BF16 rows by idx [M] int32 → [M, K]) through one-row TMAs into swizzled shared memory."""
    plgpu = _mgpu()
    M, K = idx.shape[0], x.shape[1]
    if M % ROWS or K % SLAB or x.dtype != jnp.bfloat16:
        raise ValueError(f"row gather probe: idx [{M}] (a multiple of {ROWS}), x {x.shape} {x.dtype} (BF16, K a "
                         f"multiple of {SLAB})")
    items = (M // ROWS) * (K // SLAB)

    def body(idx_gmem, x_gmem, o_gmem):  # o [M/8, 8, K]
        @functools.partial(pl.run_scoped,
                           smem=plgpu.SMEM((2, ROWS // 8, 8, SLAB), jnp.bfloat16,
                                           transforms=(plgpu.SwizzleTransform(128),)),
                           bar=plgpu.Barrier(num_arrivals=ROWS, num_barriers=2))
        def _scope(smem, bar):
            pid, ncta = lax.axis_index("cta"), lax.axis_size("cta")

            def item(i, carry):
                lin = pid + i * ncta
                t, j = lin // (K // SLAB), lin % (K // SLAB)
                slot = lax.rem(i, 2)
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # this slot's previous store has read it

                def one(r, c):
                    row = idx_gmem[t * ROWS + r]
                    plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(row, 1), pl.ds(j * SLAB, SLAB)],
                                            smem.at[slot, r // 8, pl.ds(r % 8, 1)], bar.at[slot])
                    return c

                lax.fori_loop(0, ROWS, one, 0, unroll=8)
                plgpu.barrier_wait(bar.at[slot])
                plgpu.copy_smem_to_gmem(smem.at[slot],
                                        o_gmem.at[pl.ds(t * (ROWS // 8), ROWS // 8), :, pl.ds(j * SLAB, SLAB)])
                return carry

            lax.fori_loop(0, (items - pid + ncta - 1) // ncta, item, 0)
            plgpu.wait_smem_to_gmem(0)

    f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((M // 8, 8, K), x.dtype),
                     grid=(2 if interpret else _num_sms(),), grid_names=("cta",),
                     **({"interpret": _interpret_params()} if interpret else {}))
    return f(idx, x).reshape(M, K)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    interpret = not on_gpu()
    # the bench's dispatch: 8192 tokens × 6 copies into the aligned layout's 57,344 rows, d = 2048
    N, M, K = (8192, 57344, 2048) if not interpret else (64, 256, 128)
    kx, ki = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (N, K), jnp.bfloat16)
    idx = jax.random.randint(ki, (M,), 0, N, jnp.int32)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shape": f"x[{N},{K}][idx[{M}]]"}
    try:
        fn = jax.jit(functools.partial(row_gather, interpret=interpret))
        got = fn(x, idx)
        ref = jnp.take(x, idx, axis=0)
        res["exact"] = bool(jnp.array_equal(got, ref))
        res["rows_wrong"] = int(jnp.sum(jnp.any(got != ref, axis=1)))
        if not interpret:
            from bench.kernels import bench
            byts = 2 * M * K * 2  # read + write
            t = bench(fn, x, idx)
            t_xla = bench(jax.jit(lambda x, i: jnp.take(x, i, axis=0)), x, idx)
            res.update(ms=t * 1e3, gbps=byts / t / 1e9, xla_take_ms=t_xla * 1e3, xla_take_gbps=byts / t_xla / 1e9)
    except Exception as e:  # noqa: BLE001 - the probe's answer may be "does not compile"
        res["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    print("RESULT", json.dumps(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
