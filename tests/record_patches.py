"""torchrun entry of tests/test_multiprocess.py: ``medsyn`` with every training patch a rank draws
appended to $MEDSYN_TEST_SEEN/rank<RANK>.txt as "dataset-seed index case image-sum"."""
import os
from pathlib import Path

from medsyn_site.diffusion import patches

_getitem = patches.PatchDataset.__getitem__


def _recorded(self, index):
    item = _getitem(self, index)
    with open(Path(os.environ["MEDSYN_TEST_SEEN"]) / f"rank{os.environ['RANK']}.txt", "a") as f:
        f.write(f"{self.seed} {index} {item['case']} {float(item['image'].sum()):.6f}\n")
    return item


patches.PatchDataset.__getitem__ = _recorded

if __name__ == "__main__":
    from medsyn_site.cli import main

    main()
