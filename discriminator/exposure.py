"""The global exposure changes the discriminator assumes a real test set spans beyond its few shots.

Training's photometric augmentation draws from these ranges (`discriminator.data.photometric`), and
the normal-shot memory stores each shot at the ends of the gain range (`discriminator.memory`), so
both agree on what "the same surface under another exposure" means.
"""

GAMMA_RANGE = (0.7, 1.4)
GAIN_RANGE = (0.75, 1.3)
OFFSET_RANGE = (-0.08, 0.08)  # of the full range
