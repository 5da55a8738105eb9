"""Mean-teacher update of BCP's stage 2: ``teacher <- decay * teacher + (1 - decay) * student``."""
import torch
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel


def _wrapper_layers(network: nn.Module):
    """The network, then each module wrapped by DDP and/or ``torch.compile`` (any nesting order); the plain one last."""
    yield network
    while isinstance(network, (DistributedDataParallel, OptimizedModule)):
        network = network.module if isinstance(network, DistributedDataParallel) else network._orig_mod
        yield network


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module behind DDP and/or ``torch.compile`` wrappers (in any nesting order)."""
    *_, plain = _wrapper_layers(network)
    return plain


def is_compiled(network: nn.Module) -> bool:
    """Whether ``torch.compile`` wrapped the network, possibly inside or around DDP."""
    return any(isinstance(layer, OptimizedModule) for layer in _wrapper_layers(network))


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """In-place EMA of every floating-point parameter and buffer of ``student`` into ``teacher``.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are copied. Both networks may be wrapped in DDP
    and/or ``OptimizedModule``; the teacher keeps its own dtype (fp32), whatever autocast did to the student.
    """
    if not 0 <= decay <= 1:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    # named_parameters/buffers list each tensor once; state_dict() repeats shared modules (nnU-Net's decoder holds
    # the encoder), which would apply the update several times to the same tensor
    teacher, student = unwrap_network(teacher), unwrap_network(student)
    student_tensors = {**dict(student.named_parameters()), **dict(student.named_buffers())}
    averaged, targets = [], []
    for name, t in [*teacher.named_parameters(), *teacher.named_buffers()]:
        s = student_tensors[name]  # no detach: under no_grad it would only dispatch one operator per tensor
        if t.is_floating_point():
            averaged.append(t)
            targets.append(s.to(t.dtype))
        else:
            t.copy_(s)
    if averaged:  # one multi-tensor kernel instead of one per tensor (the optimizers' foreach path)
        torch._foreach_lerp_(averaged, targets, 1 - decay)
