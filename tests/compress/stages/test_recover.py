"""The recover stage's distillation on models that cache tensors computed from their parameters."""
import torch
import torch.nn as nn

from compress.distill.losses import output_distillation_loss
from compress.stages.recover import RecoverConfig, distill_steps, drop_graph_caches


class CachedBias(nn.Module):
    """timm LeViT / EfficientFormer / TinyViT pattern: in eval mode the gathered attention bias is cached per
    device (`attention_bias_cache`); `train()` clears it when `clear_on_train`."""

    def __init__(self, clear_on_train: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.attention_biases = nn.Parameter(torch.randn(6))
        self.register_buffer("idxs", torch.tensor([5, 4, 3, 2, 1, 0]), persistent=False)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}
        self.last: torch.Tensor | None = None  # a bare cached tensor
        self.clear_on_train = clear_on_train

    def train(self, mode: bool = True):
        super().train(mode)
        if self.clear_on_train and self.attention_bias_cache:
            self.attention_bias_cache = {}
        return self

    def bias(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.attention_biases[self.idxs]
        if str(device) not in self.attention_bias_cache:
            self.attention_bias_cache[str(device)] = self.attention_biases[self.idxs]
        return self.attention_bias_cache[str(device)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = self.attention_biases * 2
        return self.proj(x) + self.bias(x.device) + 0 * self.last


def test_distillation_steps_with_a_cached_attention_bias():
    """Used to fail at step 2 with "Trying to backward through the graph a second time" (levit_128s,
    efficientformer_l1, tiny_vit_5m_224 at the recover stage); the cache must also follow the updated bias."""
    for clear_on_train in (True, False):
        torch.manual_seed(0)
        student, teacher = CachedBias(clear_on_train), CachedBias(clear_on_train)
        batches = [torch.randn(4, 6) for _ in range(2)]
        losses = distill_steps(student, teacher, batches, RecoverConfig(steps=4, lr=1e-2), "classification")
        assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
        student.eval()
        fresh = student.attention_biases[student.idxs].detach()
        with torch.no_grad():
            student(batches[0])
        assert torch.equal(student.attention_bias_cache["cpu"], fresh), "no stale pre-step bias is served"


def test_drop_graph_caches_leaves_parameters_buffers_and_plain_values():
    model = CachedBias(False).eval()
    model(torch.randn(2, 6))
    assert drop_graph_caches(model) == 2
    assert model.attention_bias_cache == {} and model.last.grad_fn is None
    assert isinstance(model.attention_biases, nn.Parameter) and model.idxs.shape == (6,)
    assert drop_graph_caches(model) == 0


def test_teacher_runs_once_per_batch_and_the_steps_are_unchanged():
    """The batches cycle unchanged and the teacher is frozen: its outputs are computed once per batch, and the
    losses are those of a loop that runs the teacher at every step."""
    torch.manual_seed(0)
    teacher, student = nn.Sequential(nn.Linear(6, 5)), nn.Sequential(nn.Linear(6, 5))
    batches = [torch.randn(4, 6) for _ in range(3)]
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    reference = nn.Sequential(nn.Linear(6, 5))
    reference.load_state_dict(student.state_dict())
    losses = distill_steps(student, teacher, batches, RecoverConfig(steps=7, lr=1e-2), "classification")
    assert len(calls) == 3, "one teacher forward per distinct batch"
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2)
    expected = []
    for step in range(7):
        x = batches[step % 3]
        with torch.no_grad():
            target = teacher(x)
        loss = output_distillation_loss(reference(x), target, "classification", RecoverConfig().temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        expected.append(loss.item())
    assert losses == expected
