"""Smallest end-to-end DeepMinMax run: a frozen torchvision ResNet-18 (random init, nothing downloaded) on
generated images whose colour encodes a 'site' attribute and whose shape encodes the task label. It compares the
trained DeepMinMax heads with the alignment head (`fit_alignment_head`), which removes the site here.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from torch.utils.data import DataLoader, TensorDataset

from dmm_wrap import Attribute, DebiasedEncoder, create_backbone


def make_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task: a bright square in the left or right half. Site: one of three colour tints plus noise."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 2, (n,), generator=g)
    site = torch.randint(0, 3, (n,), generator=g)
    x = 0.3 * torch.randn(n, 3, 32, 32, generator=g)
    for i in range(n):
        col = 4 + 16 * int(label[i]) + int(torch.randint(0, 6, (1,), generator=g))
        row = int(torch.randint(4, 20, (1,), generator=g))
        x[i, :, row:row + 8, col:col + 8] += 2.0
    tint = torch.tensor([[1.0, 0.0, -1.0], [-1.0, 1.0, 0.0], [0.0, -1.0, 1.0]])
    x += tint[site][:, :, None, None]
    return x, label, site


def main() -> None:
    torch.manual_seed(0)
    # 16,384 training images, each read once: what a fitted debiaser leaves is mostly its estimation error, which a
    # probe with enough samples reads, so it is fitted on many more images than the probe gets (README, "Where the
    # quality targets stand"). The task classifier trains on the first 2,048.
    xtr, ytr, str_ = make_images(16384, 0)
    xte, yte, ste = make_images(512, 1)
    xpr, _, spr = make_images(1024, 2)  # the site probe trains here: images neither head was fitted on
    encoder = DebiasedEncoder(create_backbone("torchvision:resnet18"), "layer2",
                              [Attribute("site", "categorical", num_classes=3)], input_size=(3, 32, 32))
    loader = DataLoader(TensorDataset(xtr, str_.float()[:, None]), batch_size=128, shuffle=True)
    history = encoder.fit(loader, epochs=1)
    print(f"trained {history.steps_done} steps; last CLUB estimate {history.debias[-1]:.3f} nats")

    def scores(features) -> tuple[float, float]:
        """Task accuracy of a logistic regression trained on the training images; site accuracy of a fresh MLP probe
        trained on the probe images (on the training images it could learn what the head did to them)."""
        train, probe, test = features(xtr[:2048]), features(xpr), features(xte)
        task = LogisticRegression(max_iter=3000).fit(train, ytr[:2048]).score(test, yte)
        leak = MLPClassifier((128,), max_iter=500, random_state=0).fit(probe, spr).score(test, ste)
        return task, leak

    # The alignment head: the same frozen backbone (same seed), h_theta a fitted alignment applied with the site
    # predicted from Z instead of a trained MLP. One pass over the data, no training loop; 4 pieces per site, the count
    # chosen on the leakage suite's conv problem (val split), whose sites tint the images as these do.
    torch.manual_seed(0)
    aligned = DebiasedEncoder(create_backbone("torchvision:resnet18"), "layer2",
                              [Attribute("site", "categorical", num_classes=3)], input_size=(3, 32, 32))
    aligned.fit_alignment_head(loader, clusters=4, samples=len(xtr))

    with torch.no_grad():
        raw, dmm, head = scores(encoder.features), scores(encoder), scores(aligned)
    chance = torch.bincount(ste).max().item() / len(ste)
    print(f"{'features':16s} {'task acc':>9s} {'site acc (MLP probe)':>21s}   majority rate {chance:.3f}")
    print(f"{'raw':16s} {raw[0]:9.3f} {raw[1]:21.3f}")
    print(f"{'DeepMinMax':16s} {dmm[0]:9.3f} {dmm[1]:21.3f}")
    print(f"{'alignment head':16s} {head[0]:9.3f} {head[1]:21.3f}")
    encoder.save_pretrained("outputs/quickstart")
    aligned.save_pretrained("outputs/quickstart-aligned")
    print("saved to outputs/quickstart and outputs/quickstart-aligned")


if __name__ == "__main__":
    main()
