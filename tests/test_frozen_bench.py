"""bench.frozen: the steps it times are the ones it names: the train stage's with the stem bias
frozen, with its first one or two blocks frozen too, finetune's with everything but the head
frozen (the times are the bench's to print)."""
import torch

from bench import frozen


def test_the_benched_steps_freeze_what_the_recipes_freeze() -> None:
    torch.manual_seed(0)
    images, labels = torch.randn(600, 3, 32, 32), torch.randint(0, 10, (600,))
    runs = frozen.trainings(images, labels)
    for training in runs.values():
        assert training.skip_frozen
        training.start_groups()
        training.train_step(*next(iter(training.loader)))
    with_grad = {name: {n for n, p in t.model.named_parameters() if p.grad is not None}
                 for name, t in runs.items()}
    assert "whiten.bias" not in with_grad["train"] and "groups.0.conv1.weight" in with_grad["train"]
    assert with_grad["finetune"] == {"head.weight"}
    for blocks in (1, 2):
        stopped = {n for n, _ in runs[f"train, {blocks} block(s) frozen"].model.named_parameters()
                   if n.startswith(("whiten.", *(f"groups.{b}." for b in range(blocks))))}
        assert with_grad[f"train, {blocks} block(s) frozen"] == with_grad["train"] - stopped
        assert f"groups.{blocks}.conv1.weight" in with_grad[f"train, {blocks} block(s) frozen"]
