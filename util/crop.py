"""ADM centre crop (Dhariwal & Nichol, guided-diffusion), used for training data and FID
reference images alike."""
import numpy as np
from PIL import Image


def center_crop_arr(pil_image, image_size):
    """PIL image -> square PIL image of side `image_size`.

    Halve with a BOX filter while the short side is at least twice the target (cheap and
    alias-free), resize the short side to the target with BICUBIC, then crop the centre."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top: top + image_size, left: left + image_size])
