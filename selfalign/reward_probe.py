"""The `probe` reward model of an evaluation: Bradley-Terry on frozen embeddings, fitted with scikit-learn."""

from __future__ import annotations

import numpy as np
import polars as pl
from pydantic import Field

from .embeddings import pair_text
from .config_base import Strict


class ProbeSettings(Strict):
    """A Bradley-Terry model on frozen features: logistic regression on feature differences, no intercept."""

    c: float = Field(1.0, gt=0, le=1e6, description="scikit-learn's C (inverse L2 strength) of the regression")
    prompt_turns: int | None = Field(1, ge=0, description="how many of the prompt's last messages are embedded "
                                                         "with the response (null: all of them)")
    max_chars: int = Field(2000, ge=16, description="the embedded text's last N characters")


class ProbeModel:
    """Bradley-Terry on frozen features: P(a preferred to b) = sigmoid(w . (phi(a) - phi(b))), fitted by
    scikit-learn's logistic regression on the differences of training pairs, each also shown reversed (so the
    two classes are balanced and the fit has no intercept to learn)."""

    def __init__(self, settings: ProbeSettings, vectors: dict[str, np.ndarray]):
        self.settings, self.vectors = settings, vectors

    def text(self, prompt, response: str) -> str:
        return pair_text(prompt, response, self.settings.prompt_turns, self.settings.max_chars)

    def texts(self, frame: pl.DataFrame) -> list[str]:
        return [self.text(p, answer) for p, c, r in frame.select("prompt", "chosen", "rejected").iter_rows()
                for answer in (c, r)]

    def differences(self, frame: pl.DataFrame) -> np.ndarray:
        rows = [self.vectors[self.text(p, c)] - self.vectors[self.text(p, r)]
                for p, c, r in frame.select("prompt", "chosen", "rejected").iter_rows()]
        return np.vstack(rows).astype(np.float64)

    def scores(self, train: pl.DataFrame, held_out: pl.DataFrame, seed: int) -> np.ndarray:
        """w . (phi(chosen) - phi(rejected)) of every held-out pair: > 0 means the human-chosen answer wins."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        diffs = self.differences(train)
        x = np.vstack([diffs, -diffs])
        y = np.concatenate([np.ones(len(diffs)), np.zeros(len(diffs))])
        scaler = StandardScaler(with_mean=False).fit(x)  # the data is symmetric: its mean is 0 already
        model = LogisticRegression(C=self.settings.c, fit_intercept=False, max_iter=5000, random_state=seed)
        model.fit(scaler.transform(x), y)
        return model.decision_function(scaler.transform(self.differences(held_out)))


def correctness(scores: np.ndarray) -> np.ndarray:
    """1 where the human-chosen answer scores higher, 0 where lower, 1/2 for a tie."""
    return np.where(scores > 0, 1.0, np.where(scores < 0, 0.0, 0.5))
