"""Progress bars of the stages (tqdm; ``config.progress=False`` turns them off).

>>> from experiments.configs import tiny
>>> with progress_bar(tiny.get_config(), total=3, desc="steps") as tick:
...     tick()
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def progress_bar(config, total: int, desc: str, initial: int = 0):
    if not config.progress:
        yield lambda n=1: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, initial=initial, leave=False, dynamic_ncols=True)
    try:
        yield bar.update
    finally:
        bar.close()
