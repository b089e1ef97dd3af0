"""U-Net lung segmentation from segmentation-models-pytorch (encoder_weights=None)."""

from __future__ import annotations

from cxrscreen.models.registry import register


@register("unet", "segment", 256, "smp U-Net, configurable encoder (default resnet18), 1 output channel")
def build_unet(num_classes: int = 1, in_channels: int = 1, encoder_name: str = "resnet18",
               decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 8)):
    import segmentation_models_pytorch as smp

    return smp.Unet(encoder_name=encoder_name, encoder_weights=None, in_channels=in_channels,
                    classes=num_classes, decoder_channels=tuple(decoder_channels))
