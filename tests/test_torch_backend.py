"""The PyTorch backend's torch.compile scope per family (compilation itself is lazy: nothing runs here)."""
from __future__ import annotations

from diffusers import FluxTransformer2DModel, UNet2DConditionModel

from pipelines.backends.torch_backend import compile_denoiser
from pipelines.registry import resolve_spec


def _compiled(module) -> bool:
    return module._compiled_call_impl is not None


def test_sdxl_compiles_the_whole_unet():
    # Blocks-only compile left SDXL's launch-bound ResNet/conv part eager and gained nothing on the GPU.
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), sample_size=8, attention_head_dim=8)
    compile_denoiser(unet, resolve_spec("sdxl-base-1.0"), None)
    assert _compiled(unet)


def test_flux_compiles_each_repeated_block_and_not_the_whole_model():
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                   axes_dims_rope=(2, 2, 4))
    compile_denoiser(model, resolve_spec("flux.1-dev"), None)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    assert blocks and all(_compiled(b) for b in blocks)
    assert not _compiled(model)
    assert not _compiled(model.x_embedder)
