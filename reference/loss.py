"""MultiBox training objective, SSD paper section 2.2, "Training objective" and
"Hard negative mining".

    L(x, c, l, g) = (L_conf(x, c) + alpha * L_loc(x, l, g)) / N            (eq. 1)

N is the number of matched (positive) default boxes in the batch. L_loc (eq. 2)
is the smooth L1 loss between the predicted and the target offsets of the
positive boxes; L_conf (eq. 3) is the softmax cross-entropy of the positives and
of the negatives kept by hard negative mining: per image, the negatives with the
highest background loss, at most `neg_pos_ratio` (3 in the paper) per positive.
"""
import numpy as np

from reference.validation import check_multibox_inputs


def multibox_loss(loc_pred, conf_logits, loc_target, labels, neg_pos_ratio=3, alpha=1.0) -> dict:
    """SSD loss of a batch (eq. 1-3) with hard negative mining.

    Args:
      loc_pred: [B, P, 4] float predicted offsets (encoded, see reference.encoding).
      conf_logits: [B, P, C + 1] float class logits, entry 0 is background.
      loc_target: [B, P, 4] float target offsets; only rows of positive priors are used.
      labels: [B, P] int matched class per prior, 0 background, 1..C objects.
      neg_pos_ratio: integer >= 0 (3.0 is accepted); image i keeps the
        min(neg_pos_ratio * num_pos_i, num_neg_i) negatives with the highest
        background loss -log softmax(conf_logits)[0]. Which of several equally
        hard negatives is kept does not change the sum.
      alpha: non-negative weight of the localization term.

    Returns:
      dict with float `loss` = conf + alpha * loc, `loc` = L_loc / N,
      `conf` = L_conf / N and int `num_pos` = N. All terms are divided by
      max(N, 1): a batch without positives mines no negatives (their number is
      a multiple of the positives) and has loss 0.
    """
    loc_pred, conf_logits, loc_target, labels = check_multibox_inputs(
        loc_pred, conf_logits, loc_target, labels, neg_pos_ratio, alpha)
    neg_pos_ratio = int(neg_pos_ratio)
    positive = labels > 0
    num_pos = int(positive.sum())

    offsets = loc_pred[positive].astype(np.float64) - loc_target[positive]
    loc = smooth_l1(offsets).sum()

    log_probs = log_softmax(conf_logits.astype(np.float64))
    cross_entropy = -np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    conf = 0.0
    # A negative's cross-entropy is its background loss, the score it is mined by.
    for image_ce, image_positive in zip(cross_entropy, positive):
        hard_negatives = mine_hard_negatives(image_ce, image_positive, neg_pos_ratio)
        conf += image_ce[image_positive].sum() + image_ce[hard_negatives].sum()

    n = max(num_pos, 1)
    loc, conf = float(loc) / n, float(conf) / n
    return dict(loss=conf + alpha * loc, loc=loc, conf=conf, num_pos=num_pos)


def mine_hard_negatives(background_loss, positive, neg_pos_ratio) -> np.ndarray:
    """Indices of the negatives to train on in one image.

    Args:
      background_loss: [P] float -log softmax(logits)[0] per prior (for a
        negative prior this is its cross-entropy).
      positive: [P] bool.
      neg_pos_ratio: negatives kept per positive.

    Returns:
      int indices of the min(neg_pos_ratio * num_pos, num_neg) negatives with
      the highest background loss.
    """
    negatives = np.flatnonzero(~positive)
    num_hard = min(neg_pos_ratio * int(positive.sum()), negatives.size)
    hardest_first = np.argsort(-background_loss[negatives], kind="stable")
    return negatives[hardest_first[:num_hard]]


def smooth_l1(x) -> np.ndarray:
    """Fast R-CNN's smooth L1 (beta 1): 0.5 x^2 where |x| < 1, else |x| - 0.5, elementwise."""
    x = np.abs(x)
    return np.where(x < 1.0, 0.5 * x * x, x - 0.5)


def log_softmax(logits) -> np.ndarray:
    """log softmax over the last axis, shifted by the max so exp never overflows."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
