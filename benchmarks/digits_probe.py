"""Do EfficientNet-Lite0's frozen features carry its ImageNet pre-training on the digits? (the
quick suite's problem, ``digits-efficientnet``)

A logistic regression on the pooled output of the frozen part plus the pre-trained conv_head /
bn1 (the tuned layers at their starting point), trained on the first 1,400 digits and scored on
the other 397, at 32 px (the problem's default) and 64 px.

    python benchmarks/digits_probe.py
"""

from __future__ import annotations

import torch
from sklearn.linear_model import LogisticRegression

from zoptim.problems.vision import DigitsEfficientNet


def main() -> None:
    for size in (32, 64):
        problem = DigitsEfficientNet(image_size=size)
        model = problem.make_model(seed=0)
        with torch.no_grad():
            h = model.act(model.bn1(model.conv_head(problem.features))).mean(dim=(2, 3)).numpy()
        y = problem.y.numpy()
        acc = LogisticRegression(max_iter=2000).fit(h[:1400], y[:1400]).score(h[1400:], y[1400:])
        print(f"image_size {size}: frozen map {tuple(problem.features.shape[1:])}, held-out probe accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
