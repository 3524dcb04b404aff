"""granularity='loss' on batches of which only the last reaches a unit (helper-142)."""
import pytest

from qround import GridSpec, QroundError
from qround.activations import insert_act_quantizers
from qround.granularity import select_units

from .test_reconstruct_checks import _Routed, _routed_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_search_on_all_but_the_batch_that_reaches_a_unit_is_refused_naming_search_batches():
    net, batches = _Routed(), _routed_batches()
    batches[1][:, 0] = -1.0                 # only the last batch reaches b
    q = insert_act_quantizers(net, None, 3, calib_batches=batches,
                              weights=GridSpec(bits=2, symmetric=False))
    with pytest.raises(QroundError, match=r"units \['b'\] are not called on the first "
                                          "search_batches=2 calibration batches"):
        select_units(net, q, batches, "loss", k=1, base="layer", search_batches=2)
    selection = select_units(net, q, batches, "loss", k=1, base="layer", search_batches=3)
    assert [u.name for u in selection.base_units] == ["a", "b", "out"]
