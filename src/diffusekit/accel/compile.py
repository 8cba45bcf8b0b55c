"""torch.compile (TorchInductor) of the U-Net, one graph per stage, compiled in place.

Each U-Net stage (every input block, the middle block, every output block, the timestep embedding and the
output head) is compiled with `nn.Module.compile`, which keeps the module objects and their state-dict keys
and makes any path through the U-Net use compiled code: the plain forward, and DeepCache's shallow path,
which calls only some of the stages. Compiling per stage instead of the whole forward costs a little
cross-stage fusion (the stages end at the skip concatenations anyway) and keeps graphs small.

On CPU inductor generates C++ and needs a C++ compiler; `compile_unavailable()` says why compiling cannot
work here, and `compile_unet` raises AccelError with that reason instead of failing at the first step.
Compilation itself happens on the first call of each stage (tens of seconds at SD size; again for every new
input shape, e.g. another batch size or image size), so the first image of a run is slower.
"""

from __future__ import annotations

from torch import nn

from diffusekit.models.unet import UNetModel

from .errors import AccelError

__all__ = ["compile_unavailable", "compile_unet", "unet_stages"]


def compile_unavailable(device_type: str = "cpu") -> str | None:
    """Why torch.compile with inductor cannot run here, or None when it can."""
    try:
        import torch._dynamo as dynamo
    except ImportError as e:  # a build without dynamo
        return f"this torch build has no torch._dynamo ({e})"
    if not dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version (torch._dynamo.is_dynamo_supported())"
    if device_type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - any failure to find a compiler means "unavailable"
            return f"inductor needs a C++ compiler on CPU and found none ({e}); install g++ or set CXX"
    return None


def unet_stages(unet: UNetModel) -> list[nn.Module]:
    """The modules compiled one graph each: time_embed, label_emb, every block, the output head."""
    stages: list[nn.Module] = [unet.time_embed]
    if unet.label_emb is not None:
        stages.append(unet.label_emb)
    return [*stages, *unet.input_blocks, unet.middle_block, *unet.output_blocks, unet.out]


def compile_unet(unet: UNetModel, *, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile every stage of `unet` in place with torch.compile; returns how many stages were compiled.

    `backend` "inductor" is the fast one; "eager" traces with dynamo but runs the original kernels (a cheap
    check of the wiring). `mode` is torch.compile's (None, "reduce-overhead", "max-autotune").
    """
    if backend == "inductor":
        reason = compile_unavailable(unet.time_embed[0].weight.device.type)
        if reason is not None:
            raise AccelError(f"--compile is unavailable: {reason}")
    stages = unet_stages(unet)
    if any(getattr(s, "_compiled_call_impl", None) is not None for s in stages):
        raise AccelError("this U-Net is already compiled")
    for stage in stages:
        stage.compile(backend=backend, mode=mode)
    return len(stages)
