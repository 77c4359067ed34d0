"""Zero-shot rows: the scores stage 1 stored beside a VLM's prompt features, as predictions.

With ``extract.<name>.zeroshot``, the ``semantic`` encoder (mPLUG-Owl2) stores per image the
log-probabilities of Q-Align's five rating words at the answer position (``qalign``) and VQAScore's
P("Yes") for the image's own prompt (``vqascore``); a transformers-backend entry stores ``vqascore``.
Nothing is trained: the Q-Align score is the softmax over the five words times their weights
(5 excellent .. 1 bad, recorded in the store), as Q-Align computes it, and the alignment score is
P("Yes"). ``evaluate`` then scores them like any head (PLCC after the same logistic).
"""

from __future__ import annotations

import numpy as np

from pipeline.store import FeatureStore

OUTPUTS = {"quality": "qalign", "alignment": "vqascore"}  # output -> the store row dataset it reads


class NoZeroShot(ValueError):
    """The store holds no zero-shot outputs."""


def qalign_score(log_probs: np.ndarray, weights: list[float]) -> np.ndarray:
    """Q-Align: softmax over the rating words' log-probabilities (renormalised over five), times weights."""
    shifted = log_probs - log_probs.max(axis=1, keepdims=True)
    p = np.exp(shifted.astype(np.float64))
    return (p / p.sum(axis=1, keepdims=True)) @ np.asarray(weights, np.float64)


def zeroshot_predictions(store: FeatureStore, labelled: list[str]) -> dict[str, np.ndarray]:
    """Per output the store can score and the dataset labels (``labelled``), one value per row."""
    have = {output: name for output, name in OUTPUTS.items() if name in store.names and output in labelled}
    if not have:
        raise NoZeroShot(
            f"{store.path} holds no zero-shot outputs for {labelled}: list them in extract.<name>.zeroshot "
            f"(and re-run its extract stage) or drop {store.path.stem!r} from zeroshot.stores"
        )
    preds = {}
    if "quality" in have:
        preds["quality"] = qalign_score(store.read_all("qalign"), store.provenance["rating_weights"])
    if "alignment" in have:
        preds["alignment"] = store.read_all("vqascore")[:, 0].astype(np.float64)
    return preds
