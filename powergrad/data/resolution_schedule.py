"""Progressive resizing: the train resolution for an epoch, as ffcv-imagenet schedules it."""
from __future__ import annotations


def train_resolution(epoch: int, img_size: int, min_res: int | None, max_res: int | None,
                     start_ramp: int, end_ramp: int) -> int:
    """min_res up to start_ramp, max_res from end_ramp, a linear ramp in between rounded to a
    multiple of 32 (the stride of a ResNet, so feature maps stay whole); img_size when no
    ramp is configured."""
    if min_res is None or max_res is None:
        return img_size
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    fraction = (epoch - start_ramp) / (end_ramp - start_ramp)
    return int(round((min_res + fraction * (max_res - min_res)) / 32)) * 32
