"""Scores of predictions against labels (accuracy, F1, MCC, Pearson, Spearman) and of seeds (mean, median,
std), with NumPy alone."""
from __future__ import annotations

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS


def default_metric(task: str) -> str:
    return "accuracy" if task == "classification" else "pearson"


def f1(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    """Binary: F1 of class 1 (GLUE's MRPC and QQP); more classes: the unweighted mean over classes (macro)."""
    def one(c):
        tp = np.sum((predictions == c) & (labels == c))
        denominator = np.sum(predictions == c) + np.sum(labels == c)
        return 0.0 if denominator == 0 else 2.0 * tp / denominator

    return float(one(1)) if num_labels == 2 else float(np.mean([one(c) for c in range(num_labels)]))


def mcc(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    """Matthews correlation (Gorodkin's multi-class form; CoLA's metric); 0 when a marginal is constant."""
    confusion = np.zeros((num_labels, num_labels), dtype=np.float64)
    np.add.at(confusion, (labels, predictions), 1)
    correct, total = np.trace(confusion), confusion.sum()
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    numerator = correct * total - predicted_counts @ true_counts
    denominator = np.sqrt((total ** 2 - predicted_counts @ predicted_counts) * (total ** 2 - true_counts @ true_counts))
    return 0.0 if denominator == 0 else float(numerator / denominator)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64) - np.mean(x), np.asarray(y, np.float64) - np.mean(y)
    denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return 0.0 if denominator == 0 else float(np.sum(x * y) / denominator)


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span (as scipy.stats.rankdata)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.concatenate([first[1:], [len(x)]]) - 1
    out = np.empty(len(x), np.float64)
    out[order] = (first[group] + last[group]) / 2.0 + 1.0
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(ranks(x), ranks(y))


def score(task: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Every metric of `task` for model outputs ([n, num_labels] logits, or [n, 1] for regression)."""
    if task == "regression":
        predictions = outputs[:, 0]
        return {"pearson": pearson(predictions, labels), "spearman": spearman(predictions, labels),
                "mse": float(np.mean((predictions - labels) ** 2))}
    predictions, num_labels = np.argmax(outputs, axis=-1), outputs.shape[-1]
    return {"accuracy": float(np.mean(predictions == labels)), "f1": f1(predictions, labels, num_labels),
            "mcc": mcc(predictions, labels, num_labels)}


def summary(values: list[float]) -> dict[str, float]:
    """mean, median and the sample standard deviation (ddof 1; 0 for a single seed) of per-seed scores."""
    values = np.asarray(values, np.float64)
    return {"mean": float(np.mean(values)), "median": float(np.median(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
