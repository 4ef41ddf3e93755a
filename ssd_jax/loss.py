"""MultiBox loss with hard negative mining (SSD paper eq. 1-3), jit-able twin of
`reference.loss`: the per-image mining loop becomes a rank computed for the
whole batch at once.
"""
import functools

import jax
import jax.numpy as jnp

from reference.validation import check_multibox_inputs, check_neg_pos_ratio
from ssd_jax._validation import Shapes, check_scalar, is_concrete


def multibox_loss(loc_pred, conf_logits, loc_target, labels, neg_pos_ratio=3, alpha=1.0) -> dict:
    """SSD loss of a batch (eq. 1-3) with hard negative mining.

    Args:
      loc_pred: [B, P, 4] float predicted offsets.
      conf_logits: [B, P, C + 1] float class logits, entry 0 is background
        (computed in float32 whatever the input dtype).
      loc_target: [B, P, 4] float target offsets; only rows of positive priors are used.
      labels: [B, P] int matched class per prior, 0 background, 1..C objects.
      neg_pos_ratio: static integer >= 0 (3.0 is accepted); image i keeps the
        min(neg_pos_ratio * num_pos_i, num_neg_i) negatives with the highest
        background loss.
      alpha: non-negative weight of the localization term (may be traced).

    Returns:
      dict of scalars: `loss` = conf + alpha * loc, `loc` = L_loc / N,
      `conf` = L_conf / N (float32) and `num_pos` = N (int32), divided by
      max(N, 1): without positives no negatives are mined and the loss is 0
      with zero, finite gradients. Differentiable w.r.t. loc_pred and
      conf_logits; the choice of negatives is not differentiated.

    Shapes and dtypes are checked on every call, under jit too; concrete inputs
    are also validated as in the reference (ValueError: non-finite values,
    labels out of range or not integers). Inside jit those value checks are
    skipped; labels are cast to int32. Python lists are accepted.
    """
    # neg_pos_ratio is a static Python number, so it is checked even under jit.
    neg_pos_ratio = check_neg_pos_ratio(neg_pos_ratio)
    shapes = Shapes()
    conf_logits = shapes.check("conf_logits", conf_logits, "B P K")
    if shapes.size("K") < 2:
        raise ValueError(f"conf_logits needs C + 1 >= 2 entries (background and at least one "
                         f"class) on its last axis, got shape {conf_logits.shape}")
    loc_pred = shapes.check("loc_pred", loc_pred, "B P 4")
    loc_target = shapes.check("loc_target", loc_target, "B P 4")
    labels = shapes.check("labels", labels, "B P", kind="int")
    check_scalar("alpha", alpha)
    if is_concrete(loc_pred, conf_logits, loc_target, labels, alpha):
        check_multibox_inputs(loc_pred, conf_logits, loc_target, labels, neg_pos_ratio, alpha)
    return _multibox_loss(loc_pred, conf_logits, loc_target, labels.astype(jnp.int32),
                          neg_pos_ratio, alpha)


@functools.partial(jax.jit, static_argnames="neg_pos_ratio")
def _multibox_loss(loc_pred, conf_logits, loc_target, labels, neg_pos_ratio, alpha):
    positive = labels > 0
    num_pos = positive.sum(dtype=jnp.int32)

    loc_per_prior = smooth_l1(loc_pred - loc_target).sum(axis=-1)
    loc = jnp.where(positive, loc_per_prior, 0.0).sum()

    log_probs = jax.nn.log_softmax(conf_logits.astype(jnp.float32), axis=-1)
    cross_entropy = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    hard_negative = mine_hard_negatives(-log_probs[..., 0], positive, neg_pos_ratio)
    conf = jnp.where(positive | hard_negative, cross_entropy, 0.0).sum()

    n = jnp.maximum(num_pos, 1).astype(jnp.float32)
    loc, conf = loc / n, conf / n
    return dict(loss=conf + alpha * loc, loc=loc, conf=conf, num_pos=num_pos)


def mine_hard_negatives(background_loss, positive, neg_pos_ratio):
    """Hard negative mask of a batch.

    Args:
      background_loss: [B, P] float -log softmax(logits)[0] per prior.
      positive: [B, P] bool.
      neg_pos_ratio: negatives kept per positive.

    Returns:
      [B, P] bool, True for the min(neg_pos_ratio * num_pos_i, num_neg_i)
      negatives of image i with the highest background loss. Positives rank
      after every negative, so the rank test alone caps the count at num_neg_i.
    """
    mining_score = jnp.where(positive, -jnp.inf, jax.lax.stop_gradient(background_loss))
    hardest_first = jnp.argsort(mining_score, axis=-1, descending=True, stable=True)
    num_hard = neg_pos_ratio * positive.sum(axis=-1, keepdims=True)
    # Each prior's rank is its position in hardest_first: scattering "position < num_hard"
    # back to the priors gives the mask without a second argsort (a sort costs ~4 ms per
    # 8 x 1524 scores on a CPU core, the scatter a fraction of that).
    # Per image (vmap): a scatter with a batch dimension stays split over the devices of a
    # data-parallel step, where one indexed by (row, prior) pairs was gathered onto each.
    chosen = jnp.arange(mining_score.shape[-1]) < num_hard  # [B, P] in hardest-first order
    unsort = jax.vmap(lambda order, values: jnp.zeros_like(values).at[order].set(
        values, unique_indices=True))
    return ~positive & unsort(hardest_first, chosen)


def smooth_l1(x):
    """Fast R-CNN's smooth L1 (beta 1): 0.5 x^2 where |x| < 1, else |x| - 0.5, elementwise."""
    x = jnp.abs(x)
    return jnp.where(x < 1.0, 0.5 * x * x, x - 0.5)
