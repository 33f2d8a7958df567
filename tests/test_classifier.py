"""train_classifier's distillation term: it pulls a student towards the teacher's outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress.examples.classifier import train_classifier
from jaxcompress.examples.data import load_digits
from jaxcompress.examples.models import LeNet300100


def _kl(model, teacher, student, x):
    t = jax.nn.log_softmax(model.apply({"params": teacher}, x))
    s = jax.nn.log_softmax(model.apply({"params": student}, x))
    return float(jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1)))


def test_pure_distillation_moves_the_student_to_the_teacher():
    images, labels = load_digits(split="train")
    model = LeNet300100()
    x = jnp.zeros((1, 64))
    teacher = model.init(jax.random.key(0), x)["params"]
    student = model.init(jax.random.key(1), x)["params"]
    # Labels that disagree with the teacher: with distill_weight=1 they must not matter.
    wrong = np.zeros_like(labels)
    kwargs = dict(optimizer=optax.adam(1e-3), epochs=2, seed=0, teacher=teacher)
    taught, _ = train_classifier(model, student, images, wrong, distill_weight=1.0, **kwargs)
    also, _ = train_classifier(model, student, images, labels, distill_weight=1.0, **kwargs)
    before, after = _kl(model, teacher, student, images), _kl(model, teacher, taught, images)
    assert after < 0.5 * before
    jax.tree.map(np.testing.assert_array_equal, taught, also)
    # With weight 0 the teacher is ignored: the plain cross-entropy run.
    plain, _ = train_classifier(model, student, images, labels, optimizer=optax.adam(1e-3),
                                epochs=1, seed=0)  # fmt: skip
    zero, _ = train_classifier(model, student, images, labels, optimizer=optax.adam(1e-3),
                               epochs=1, seed=0, teacher=teacher, distill_weight=0.0)  # fmt: skip
    jax.tree.map(np.testing.assert_allclose, plain, zero)


@pytest.mark.parametrize("bad", [{"distill_weight": 1.5}, {"temperature": 0.0}])
def test_bad_distillation_options(bad):
    model = LeNet300100()
    params = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
    images, labels = np.zeros((64, 64), np.float32), np.zeros(64, np.int32)
    with pytest.raises(ValueError, match=next(iter(bad))):
        train_classifier(model, params, images, labels, optimizer=optax.sgd(0.1), epochs=1,
                         seed=0, teacher=params, **bad)  # fmt: skip
