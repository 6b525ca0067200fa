"""The sequence mesh: a named ``"sp"`` axis over the devices asked for, and a clear error otherwise."""

import jax
import pytest
from sp_testing import mesh

from jaxserve.parallel.mesh import SP_AXIS, sequence_mesh


def test_mesh_has_one_sequence_axis_over_the_devices():
    m = mesh(8)
    assert m.axis_names == (SP_AXIS,) == ("sp",)
    assert m.shape[SP_AXIS] == 8
    assert list(m.devices) == jax.devices("cpu")[:8]
    assert sequence_mesh(jax.devices("cpu"), 3).shape[SP_AXIS] == 3


@pytest.mark.parametrize("size", [0, 9])
def test_a_size_outside_the_devices_is_refused(size):
    with pytest.raises(ValueError, match=r"sequence-parallel size must be in \[1, 8\]"):
        sequence_mesh(jax.devices("cpu")[:8], size)


def test_mesh_for_goes_on_the_devices_given():
    from jaxserve.parallel.tensor_parallel import mesh_for

    cpus = jax.devices("cpu")[:8]
    assert mesh_for(1, 1) is None
    assert list(mesh_for(2, 2, cpus[4:8]).devices.flat) == cpus[4:8]
    assert list(mesh_for(1, 1, cpus[5:6]).devices.flat) == [cpus[5]]
