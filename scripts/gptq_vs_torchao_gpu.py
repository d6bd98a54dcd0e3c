"""Compare qatlab's GPTQ (CPU, from scratch) with torchao's ``torchao.prototype.gptq`` on a CUDA GPU.

Usage (needs a CUDA device; torchao 0.18)::

    python scripts/gptq_vs_torchao_gpu.py

What it does, on random correlated calibration inputs and random weights of a few
Linear shapes:

1. **int8 per-row** (``Int8WeightOnlyConfig(granularity=PerRow())``, always available):
   torchao's ``gptq_quantize`` on the GPU against :func:`qatlab.gptq.gptq_quantize_weight`
   (``bits=8, group_size=None``) on the CPU, same Hessian, same damping, one block of all
   columns (torchao fixes a per-row scale from the first block's columns, so a smaller block
   would make it a different grid). Codes must agree on at least 99 % of the weights
   (float32 round-off differs between the GPU and the CPU and can flip a code that sits on a
   .5, which then changes the rest of its row), scales exactly.
2. **int4 group-wise** (``Int4WeightOnlyConfig(group_size=...)``, only when torchao's
   ``mslk`` dependency is installed): torchao's asymmetric int4 grid with zero points is
   not qatlab's symmetric one, so codes are not compared; both must beat their own
   round-to-nearest on the layer's output error ``mean_x || x (W - W_hat)^T ||^2``.

It prints one line per case and a final verdict (exit code 0 = AGREE, 1 = DISAGREE,
2 = cannot run here).
"""

import sys

import torch


def _inputs(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) @ torch.randn(k, k, generator=g) / k ** 0.5


def _rtn_asym_int4(w, group_size):
    """Round-to-nearest on torchao's int4 grid (mslk's ``int4_row_quantize_zp``), dequantized."""
    out, k = w.shape
    g = w.reshape(out, k // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-6) / 15
    q = ((g - lo) / scale).round().clamp(0, 15)
    return (q * scale + lo).reshape(out, k)


def main():
    if not torch.cuda.is_available():
        print("VERDICT: cannot run: no CUDA device (torchao's GPTQ asserts CUDA)")
        return 2
    try:
        from torchao.prototype.gptq.api import GPTQConfig, gptq_quantize
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
        from torchao.quantization.granularity import PerRow
    except ImportError as e:
        print(f"VERDICT: cannot run: torchao's GPTQ prototype is not importable ({e})")
        return 2
    from qatlab.gptq import gptq_quantize_weight, hessian_from_inputs, reconstruction_error

    ok = True
    shapes = [(64, 128), (256, 512), (512, 1024)]
    for i, (out, k) in enumerate(shapes):
        x = _inputs(4 * k, k, i)
        w = torch.randn(out, k, generator=torch.Generator().manual_seed(100 + i)) / k ** 0.5
        h = hessian_from_inputs(x)
        cfg = GPTQConfig(step="convert", base_config=Int8WeightOnlyConfig(granularity=PerRow()),
                         gptq_quantize_block_size=k, percdamp=0.01)
        ref = gptq_quantize(h.clone().cuda(), w.clone().cuda(), cfg)
        ours = gptq_quantize_weight(w, h, bits=8, group_size=None, block_size=k, percdamp=0.01)
        same = (ours.codes == ref.qdata.cpu()).float().mean().item()
        scale_equal = torch.equal(ours.scale, ref.scale.cpu().float().reshape(out, 1))
        good = same >= 0.99 and scale_equal
        ok &= good
        print(f"int8 per-row {out}x{k}: codes equal on {same:.4%}, scales equal: {scale_equal}, "
              f"error ours {ours.error:.4g} / RTN {ours.rtn_error:.4g} -> {'ok' if good else 'MISMATCH'}")

    try:
        import mslk  # noqa: F401
        have_int4 = True
    except ImportError:
        have_int4 = False
        print("int4 group-wise: skipped (torchao's int4 GPTQ needs the mslk package, not installed)")
    if have_int4:
        for i, (out, k) in enumerate(shapes):
            gs = 128 if k % 128 == 0 else 64
            x = _inputs(4 * k, k, 10 + i)
            w = torch.randn(out, k, generator=torch.Generator().manual_seed(200 + i)) / k ** 0.5
            h = hessian_from_inputs(x)
            cfg = GPTQConfig(step="convert", base_config=Int4WeightOnlyConfig(group_size=gs),
                             gptq_quantize_block_size=max(gs, 256 // gs * gs), percdamp=0.01)
            try:
                ref = gptq_quantize(h.clone().cuda(), w.clone().cuda().to(torch.bfloat16), cfg)
                w_ref = ref.dequantize().float().cpu()
            except Exception as e:  # noqa: BLE001 - report and go on: the int8 comparison still stands
                print(f"int4 groups of {gs}, {out}x{k}: torchao's int4 GPTQ failed: {type(e).__name__}: {e}")
                continue
            e_ref = reconstruction_error(w, w_ref, h)
            e_ref_rtn = reconstruction_error(w, _rtn_asym_int4(w, gs), h)
            ours = gptq_quantize_weight(w, h, bits=4, group_size=gs, block_size=256, percdamp=0.01)
            good = ours.error <= ours.rtn_error and e_ref <= e_ref_rtn * 1.05
            ok &= good
            print(f"int4 groups of {gs}, {out}x{k}: torchao GPTQ/RTN error {e_ref / e_ref_rtn:.3f}, "
                  f"ours GPTQ/RTN {ours.error / ours.rtn_error:.3f} -> {'ok' if good else 'MISMATCH'}")

    print(f"VERDICT: {'AGREE' if ok else 'DISAGREE'}: qatlab.gptq vs torchao.prototype.gptq on {torch.cuda.get_device_name()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
