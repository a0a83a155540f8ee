"""P-Net over a uint8 pyramid level, rearranged for speed with the same arithmetic.

P-Net's trunk starts with conv1 (3×3, 3 -> 10 channels) at full resolution, a PReLU and a 2×2
max-pool: three passes over a 10-channel full-resolution map, which cost more than the rest of the
net. Here they are one stride-2 convolution with a 4×4 kernel and 40 output channels: four copies
of conv1, each shifted to one of the pool's four positions, so that each output pixel holds the
four conv1 values its pool window takes. The PReLU runs on those, and the pool is the maximum over
the four groups. Every conv1 value is the same dot product as in the net (summed in a different
order), and the maximum picks the same values, so the output is the net's to float rounding
(|Δ| ≈ 1e-6 on the logits). The input normalisation ``(x - 127.5) * 0.0078125`` is folded into the
first convolution's weights and bias.

The pool rounds up (``ceil_mode``): when conv1's map has an odd height or width the last window
holds one row or column; the level is padded and the padded group is replaced by the real one
before the maximum. The same fix, made per level, lets several small levels share one call:
stacked at even rows of one canvas, each level's kept outputs see only its own pixels.
"""
import math

import torch
import torch.nn.functional as F

from adaface.threads import map_native

from . import openmp

STRIP_PIXELS = 200_000  # input pixels per strip: the largest intermediate map is 8 MB
STACKED_LEVEL_PIXELS = 20_000  # levels (or bands) this small run stacked with others ...
CANVAS_PIXELS = 50_000  # ... in canvases of at most this many pixels
POOL_OFFSETS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (dy, dx) of the four groups, in channel order


def pnet_rows(height: int) -> int:
    """Rows of P-Net's output map for a level (or band) ``height`` pixels high."""
    return math.ceil((height - 2) / 2) - 4


def pooled_conv1(pnet: torch.nn.Module):
    """conv1 as the 40-channel stride-2 4×4 convolution described above, with the normalisation
    folded in: (weight 40×3×4×4, bias 40, PReLU slopes 40), all float32."""
    conv, slopes = pnet.features.conv1, pnet.features.prelu1.weight
    scaled = conv.weight * 0.0078125  # (x - 127.5) * 2**-7 = x * 2**-7 - 127.5 * 2**-7
    bias = conv.bias - 127.5 * scaled.sum(dim=(1, 2, 3))
    weight = torch.zeros(len(POOL_OFFSETS), *scaled.shape[:2], 4, 4)
    for group, (dy, dx) in enumerate(POOL_OFFSETS):
        weight[group, :, :, dy:dy + 3, dx:dx + 3] = scaled
    groups = len(POOL_OFFSETS)
    return weight.flatten(0, 1).contiguous(), bias.repeat(groups), slopes.repeat(groups)


class PNetPass:
    """P-Net over uint8 levels (one, or several at once with ``many``), with its two heads fused
    into one 1×1 convolution of 5 channels (the face logit and the 4 box offsets).

    The score is the reference's: a softmax of the face logit over the map's width. Large levels
    run in strips (``pieces``), which keep the intermediate maps small enough for glibc to
    recycle them: with larger ones every strip maps fresh pages and zero-fills them (on a 480×720
    level, 200k-pixel strips take half the time of one 345k-pixel pass).
    """

    def __init__(self, pnet: torch.nn.Module):
        features = pnet.features
        self.device = features.conv1.weight.device
        self.conv1 = pooled_conv1(pnet)
        self.rest = [(features.conv2.weight, features.conv2.bias, features.prelu2.weight),
                     (features.conv3.weight, features.conv3.bias, features.prelu3.weight)]
        self.head_weight = torch.cat([pnet.conv4_1.weight[1:2], pnet.conv4_2.weight])  # 5×32×1×1
        self.head_bias = torch.cat([pnet.conv4_1.bias[1:2], pnet.conv4_2.bias])

    def __call__(self, level: torch.Tensor, threshold: float = None):
        """1×3×h×w uint8 level -> (score h'×w' float32, offsets h'×w'×4 float32), h' = ``pnet_rows(h)``;
        with a ``threshold``, the cells that pass it instead (see ``many``)."""
        return self.many([level], threshold)[0]

    def many(self, levels: list, threshold: float = None, workers: int = 1) -> list:
        """P-Net over several 1×3×h×w uint8 levels (or bands): one (score, offsets) per level,
        or with a ``threshold`` one (rows, cols, scores, offsets N×4) tuple of tensors for the
        cells whose score passes it, row-major; then only the face logit is computed everywhere
        and the box offsets at those cells alone.

        The work is cut into pieces (see ``pieces``), run by ``workers`` native threads with one
        OpenMP thread each (``openmp.one_thread``): on 2 cores that makes P-Net 10 to 25% faster
        than one thread at a time with a team of two. On a GPU, one thread runs them in turn.
        """
        jobs = sorted(self.pieces(levels), key=lambda job: -job[0].shape[2] * job[0].shape[3])
        if workers > 1 and (self.device.type != "cpu" or not openmp.available()):
            workers = 1

        def run(job):
            pixels, regions, _ = job
            if workers == 1:
                return self._run(pixels, regions, threshold)
            with openmp.one_thread(), torch.inference_mode():
                return self._run(pixels, regions, threshold)

        parts = [[] for _ in levels]
        for (_, _, places), found in zip(jobs, map_native(run, jobs, workers)):
            for (level, first_row), cells in zip(places, found):
                if threshold is not None:
                    cells = (cells[0] + first_row, *cells[1:])
                parts[level].append((first_row, cells))
        return [tuple(torch.cat(part) for part in zip(*[cells for _, cells in sorted(level, key=lambda p: p[0])]))
                for level in parts]

    @staticmethod
    def pieces(levels: list) -> list:
        """The levels cut into P-Net's pieces of work: [(1×3×H×W uint8 canvas, regions as in
        ``canvas``, [(level index, first output row)] per region)].

        Levels of up to ``STACKED_LEVEL_PIXELS`` are stacked into canvases of up to
        ``CANVAS_PIXELS``, which saves the per-call cost of the many small levels (on a 1200×800
        photo's 12 smallest levels, 3 ms instead of 6); larger levels are cut into strips of at
        most ``STRIP_PIXELS`` input pixels, overlapping by 10 rows (stacking them costs more in
        padding than it saves).
        """
        jobs, stack, rows, width = [], [], 0, 0
        for i in sorted(range(len(levels)), key=lambda i: -levels[i].shape[3]):
            height, level_width = levels[i].shape[2:]
            if height * level_width > STACKED_LEVEL_PIXELS:
                jobs.extend(canvas([strip]) + ([(i, first_row)],) for first_row, strip in _strips(levels[i]))
                continue
            padded = height + height % 2, level_width + level_width % 2
            if stack and (rows + padded[0]) * width > CANVAS_PIXELS:
                jobs.append(canvas([levels[k] for k in stack]) + ([(k, 0) for k in stack],))
                stack, rows = [], 0
            if not stack:
                width = padded[1]
            stack.append(i)
            rows += padded[0]
        if stack:
            jobs.append(canvas([levels[k] for k in stack]) + ([(k, 0) for k in stack],))
        return jobs

    def _run(self, pixels: torch.Tensor, regions: list, threshold=None) -> list:
        """P-Net over a 1×3×H×W uint8 canvas holding levels at ``regions`` (top, height, width):
        one result per region (see ``many``), as if each level had run alone."""
        x = self._pooled(pixels, regions)
        for weight, bias, slopes in self.rest:
            x = F.prelu(F.conv2d(x, weight, bias), slopes)
        if threshold is None:
            head = F.conv2d(x, self.head_weight, self.head_bias)[0]
            return [(torch.softmax(logits[0], dim=-1), logits[1:].permute(1, 2, 0))
                    for logits in _regions(head, regions)]
        face = F.conv2d(x, self.head_weight[:1], self.head_bias[:1])[0]
        found = []
        for (top, _, _), logits in zip(regions, _regions(face, regions)):
            score = torch.softmax(logits[0], dim=-1)
            rows, cols = torch.nonzero(score > threshold, as_tuple=True)
            features = x[0, :, top // 2 + rows, cols].T  # cells × 32
            offsets = F.linear(features, self.head_weight[1:, :, 0, 0], self.head_bias[1:])
            found.append((rows, cols, score[rows, cols], offsets))
        return found

    def _pooled(self, pixels: torch.Tensor, regions: list) -> torch.Tensor:
        """conv1 -> PReLU -> 2×2 max-pool (ceil mode) of each region of a 1×3×H×W uint8 canvas
        (H and W even, regions at even rows): 1×10×(H/2-1)×(W/2-1)."""
        x = pixels.to(dtype=torch.float32, memory_format=torch.channels_last)
        weight, bias, slopes = self.conv1
        y = F.prelu(F.conv2d(x, weight, bias, stride=2), slopes)
        for top, height, width in regions:
            first, rows, cols = top // 2, math.ceil((height - 2) / 2), math.ceil((width - 2) / 2)
            if height % 2:  # the last window has no second row: groups (1, dx) repeat (0, dx)
                y[:, 20:40, first + rows - 1, :cols] = y[:, 0:20, first + rows - 1, :cols]
            if width % 2:  # nor a second column: groups (dy, 1) repeat (dy, 0)
                y[:, 10:20, first:first + rows, cols - 1] = y[:, 0:10, first:first + rows, cols - 1]
                y[:, 30:40, first:first + rows, cols - 1] = y[:, 20:30, first:first + rows, cols - 1]
        return torch.maximum(torch.maximum(y[:, 0:10], y[:, 10:20]), torch.maximum(y[:, 20:30], y[:, 30:40]))


def _strips(level: torch.Tensor) -> list:
    """A 1×3×h×w level as horizontal strips of at most ``STRIP_PIXELS`` input pixels, overlapping
    by 10 rows (an output row sees 12 input rows), so that their outputs are those of one pass:
    [(first output row, 1×3×h'×w strip)]."""
    height, width = level.shape[2:]
    out_rows = pnet_rows(height)
    step = max(1, STRIP_PIXELS // (2 * width))
    strips = []
    for start in range(0, out_rows, step):
        stop = min(out_rows, start + step)
        bottom = height if stop == out_rows else 2 * stop + 10
        strips.append((start, level[:, :, 2 * start:bottom]))
    return strips


def _regions(head: torch.Tensor, regions: list) -> list:
    """Each region's part of a C×H'×W' output map (its P-Net rows and columns)."""
    return [head[:, top // 2:top // 2 + pnet_rows(height), :pnet_rows(width)] for top, height, width in regions]


def canvas(levels: list):
    """Stack 1×3×h×w uint8 levels top to bottom, each at an even row and padded to even sides
    (the padding is never read into a kept output): (1×3×H×W uint8 canvas, [(top, h, w)])."""
    regions, top = [], 0
    for level in levels:
        height, width = level.shape[2:]
        regions.append((top, height, width))
        top += height + height % 2
    width = max(w + w % 2 for _, _, w in regions)
    if len(levels) == 1 and (top, width) == tuple(levels[0].shape[2:]):
        return levels[0], regions
    pixels = torch.zeros((1, top, width, 3), dtype=torch.uint8, device=levels[0].device)
    for level, (row, height, level_width) in zip(levels, regions):
        pixels[0, row:row + height, :level_width] = level[0].permute(1, 2, 0)
    return pixels.permute(0, 3, 1, 2), regions
