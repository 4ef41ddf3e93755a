"""Convert ImageNet VGG16 weights for SSD's backbone:
`python -m experiments.convert_vgg16 SOURCE OUTPUT.npz`.

SOURCE is torchvision's vgg16 state dict or ssd.pytorch's vgg16_reducedfc.pth, as a .pth (needs
PyTorch) or an .npz of the same keys. Train with `--backbone-weights OUTPUT.npz`. See
ssd_jax/convert.py for the layer mapping, the fc6/fc7 reduction and the pixel normalization.
"""
import sys

from ssd_jax.convert import main

if __name__ == "__main__":
    try:
        main()
    except (ImportError, OSError, ValueError) as error:
        sys.exit(f"error: {error}")
