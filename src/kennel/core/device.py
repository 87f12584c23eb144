"""Where and in what precision a run computes: ``train.device`` and ``train.amp`` resolved for this machine,
and the copies that move tensors there without stalling the host."""

from __future__ import annotations

import torch

from kennel.core.machine import cpu_flags

NATIVE_BF16 = {"avx512_bf16", "amx_bf16"}  # CPU flags of hardware bf16 matrix math
# Images per forward pass on a CPU where no gradient is kept. Eager kernels there run fastest while a batch's
# activations stay in cache: at 224 px in bf16, 8 images a pass run MobileNetV2 2.2x, EfficientNet-B0 1.9x and
# ResNet-18 1.2x faster than 64, with the same logits: bit for bit in batches of 4 to 64 (benchmarks/
# inference_batch.py); a last, smaller batch of 1 or 3 may take other kernels, a float's last digit apart.
CPU_INFERENCE_BATCH = 8


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is not there is an error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise RuntimeError(f"train.device = {name!r}, but no {name} device is available here: use auto or cpu")
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for ``train.amp``; ``auto`` uses bf16 only where the hardware runs it natively."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_flags() & NATIVE_BF16:
        return torch.bfloat16  # ~2x faster than fp32 on AVX512-BF16/AMX; slower than fp32 elsewhere
    return None


def amp_name(dtype: torch.dtype | None) -> str:
    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def inference_batch(device: torch.device, elsewhere: int = 64) -> int:
    """Images per forward pass of an inference-only pass (features, validation, evaluation, predictions): the
    outputs do not depend on it (to a float's last digit), only the speed. On a CPU, ``CPU_INFERENCE_BATCH``; on
    an accelerator, which large batches keep busy, ``elsewhere``."""
    return CPU_INFERENCE_BATCH if device.type == "cpu" else elsewhere


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    # uint8 crosses to the device (4x less than float); channels_last suits convolutions on CPU and GPU.
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if images.ndim == 4 else images


def send(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on ``device`` without stalling the host.

    A copy from pageable memory waits for the GPU to finish all queued work; from pinned memory with
    ``non_blocking`` it is queued like a kernel. The pinned block is not reused before its copy has run (torch's
    pinned-memory cache records the copy), so building a fresh one per call is safe.
    """
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
