"""A tiny user dataset for the tests of fastkd.fit: one-channel 4×4 images whose class (of 4) is the brightest
quadrant, learnable in a few steps by any small network."""
import torch


class Squares(torch.utils.data.Dataset):
    classes = list(range(4))

    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 4
        self.x = torch.rand(n, 1, 4, 4, generator=g)
        for i, c in enumerate(self.y.tolist()):
            r, q = divmod(c, 2)
            self.x[i, 0, 2 * r:2 * r + 2, 2 * q:2 * q + 2] += 1

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])
