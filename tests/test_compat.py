"""Every private attribute of another library that hf_ring_attention touches still exists in the
installed versions (see hf_ring_attention/_compat.py)."""

import pytest

from hf_ring_attention._compat import PROBES


@pytest.mark.parametrize("name", list(PROBES))
def test_private_attribute_still_exists(name):
    assert PROBES[name](), (
        f"the installed version no longer has {name}; update hf_ring_attention/_compat.py for it"
    )
