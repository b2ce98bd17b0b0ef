"""The five corruptions against independent computations: Pillow's BOX resize for pixelate,
hand-computed brightness and contrast on tiny images, the noise's std, severity order, seeding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bnexp.data import corruptions as C


def grey_images(n=16, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth images (a 4 x 4 grid upsampled): on pixel noise, pixelate at 23 px can move an image
    # more than at 21 px (28 / 21 = 4 / 3 aligns the boxes); on Fashion-MNIST it is monotone
    x = torch.rand(n, 1, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_each_severity_moves_the_images_further_from_clean(name):
    x = grey_images()
    dist = [(C.corrupted(x, "test", name, s).float() - x.float()).abs().mean().item() for s in range(1, 6)]
    assert dist[0] > 0.1 and all(a < b for a, b in zip(dist, dist[1:])), dist


def test_pixelate_at_factor_one_is_the_identity_and_matches_pillows_box_resize():
    x = grey_images(4)
    assert torch.equal(C.corrupt(x, "pixelate", 1, level=1.0), x)
    for severity in range(1, 6):
        c = C.SEVERITY["pixelate"][severity - 1]
        got = C.corrupt(x, "pixelate", severity)
        for img, out in zip(x, got):  # make_cifar_c.py: resize((int(32 c),) * 2, BOX), then back, BOX
            pil = Image.fromarray(img[0].numpy()).resize((int(28 * c),) * 2, Image.BOX).resize((28, 28), Image.BOX)
            diff = np.abs(np.asarray(pil).astype(int) - out[0].numpy().astype(int))
            assert diff.max() <= 2, (severity, diff.max())  # Pillow rounds after each pass


def test_brightness_and_contrast_match_a_hand_computation_on_a_tiny_image():
    x = torch.tensor([[[[0, 100], [200, 250]]]], dtype=torch.uint8)
    # grey: V is the pixel; V + 0.2 * 255 clipped at 255 (black becomes grey as well)
    bright = C.corrupt(x, "brightness", 4)
    assert bright.flatten().tolist() == [51, 151, 251, 255]
    # contrast 0.15 about the image mean 137.5
    low = C.corrupt(x, "contrast", 5)
    want = [round((v - 137.5) * 0.15 + 137.5) for v in (0, 100, 200, 250)]
    assert low.flatten().tolist() == want
    # an RGB pixel: V = max = 100 -> 100 + 0.05 * 255, hue and saturation kept (the triple scaled)
    rgb = torch.tensor([50, 100, 20], dtype=torch.uint8).view(1, 3, 1, 1)
    scale = (100 + 0.05 * 255) / 100
    assert C.corrupt(rgb, "brightness", 1).flatten().tolist() == [round(50 * scale), round(100 * scale),
                                                                  round(20 * scale)]


def test_noise_has_the_std_of_its_severity_and_is_seeded_per_corruption_and_severity():
    flat = torch.full((64, 1, 28, 28), 128, dtype=torch.uint8)
    for severity, c in enumerate(C.SEVERITY["noise"], start=1):
        delta = C.corrupted(flat, "test", "noise", severity, seed=3).float() - 128
        assert delta.std().item() == pytest.approx(c * 255, rel=0.02)
        assert abs(delta.mean().item()) < 0.2
    again = C.corrupt(flat, "noise", 2, C.corruption_generator(3, "noise", 2, "cpu"))
    assert torch.equal(again, C.corrupted(flat, "test", "noise", 2, seed=3))  # same set, not call order
    assert not torch.equal(again, C.corrupted(flat, "test", "noise", 2, seed=4))
    assert C.corrupted(flat, "test", "noise", 2, seed=3) is C.corrupted(flat, "test", "noise", 2, seed=3)


def test_an_unknown_corruption_names_the_allowed_ones():
    with pytest.raises(ValueError, match="noise, blur, contrast, brightness, pixelate"):
        C.corrupt(grey_images(1), "fog", 1)
