"""Register ponderlm with transformers' Auto* classes without importing transformers eagerly.

``import ponderlm`` must not pay for transformers (seconds) when it is not used, yet
``AutoModelForCausalLM.from_pretrained(dir)`` must work after ``import ponderlm`` whichever of
the two was imported first. The work is done by :mod:`ponderlm._autoregister`, the hook that an
installed ponderlm also runs at every interpreter start (``ponderlm-autoregister.pth``): the
``ponderlm`` model type is known as soon as transformers' Auto classes are imported, and
:mod:`ponderlm.hf.modeling` (torch, transformers' modeling code) is imported only when a ponderlm
directory is actually loaded.
"""

from __future__ import annotations


def install() -> None:
    from ponderlm import _autoregister

    _autoregister.install()
